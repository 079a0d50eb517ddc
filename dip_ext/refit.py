"""Least-squares refit of the weights that read a pruned input: an optional stage between selection and compaction.

DISP removes input columns: of q/k/v (``attn_in``), of the MLP's first projections (``mlp_in``) and of its last
projection (``mlp_mid``). Left as they are, the kept columns compute what they computed in the dense model and
the removed columns' share of the output is simply lost. The refit gives the kept columns ``K`` of each such
weight ``W [out, in]`` the values that best reproduce, on calibration text, what the whole row computed:

    W'_K = argmin_V  Σ_t w_t ‖W x_t − V x_t[K]‖²  +  δ ‖V − W_K‖²
         = (W G[:, K] + δ W_K) (G[K, K] + δ I)⁻¹ ,      G = Σ_t w_t x_t x_tᵀ ,  δ = damping · mean diag G[K, K]

- ``x_t`` is the layer's input on calibration token ``t`` in the *masked* model (every earlier mask applied, and
  for the MLP's last projection this layer's ``mlp_in`` as well), i.e. what the compacted model will feed the
  weight. With the dense model's inputs instead, the refit tunes the weights to activations that no longer
  occur once earlier blocks are pruned.
- ``w_t = 1/‖x_t‖²``: every token counts by its relative error. Unweighted, a handful of attention-sink tokens
  whose activations are orders of magnitude above the median decide the fit and the refit makes the model worse.
- δ pulls the fit toward the original weights where the calibration text says little (a ridge toward ``W_K``
  rather than toward zero, which would shrink every weight).

Biases are left alone: the target and the fit carry the same bias, so the least-squares error is the one of
the linear part. Attention heads and block outputs (``attn_out``, ``mlp_out``) are not refitted: removing an
output row is not something the remaining weights of that row can make up for.

Which weights and how much damping is not one answer for all masks, so :func:`choose_refit`
(``RefitConfig(refit="auto")``, the default) scores :data:`CANDIDATES` and no refit by the LM loss on held-out
calibration windows and keeps the best (benchmarks/RESULTS.md has what each choice did on the default model).

The Gram matrices are float64 ``[in, in]`` per layer and structure (``8 * in²`` bytes each, ``in`` the structure's
size in the family's prunable space); layers are taken in groups that fit ``max_gram_bytes``, one pass over the
calibration windows per group. A layer whose space lacks one of the refitted structures (a layer without
``mlp_mid``) is left as it is for that structure.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist
from .compaction import require_dense
from .config import RefitConfig
from .eval import mean_window_loss
from .families import adapter_for
from .masking import MaskedModel
from .masks import DispMasks
from .model_state import frozen, model_device
from .ops import CalibrationStats, calibration_stats
from .tokens import check_windows

#: the structures whose index sets select input columns of weights (the ones a refit can compensate)
INPUT_STRUCTURES = ("attn_in", "mlp_in", "mlp_mid")
#: a fixed refit's defaults (``RefitConfig(refit="on")``): the MLP's last projection alone, damping 1
DEFAULT_STRUCTURES = ("mlp_mid",)
DEFAULT_DAMPING = RefitConfig().refit_damping
#: what :func:`choose_refit` tries by default (besides no refit)
CANDIDATES = tuple((structures, damping) for structures in (("mlp_mid",), INPUT_STRUCTURES)
                   for damping in (0.1, 1.0, 10.0))

__all__ = ["INPUT_STRUCTURES", "CANDIDATES", "RefitResult", "RefitCandidate", "check_damping", "collect_input_grams",
           "refit_weights", "refit_pruned_inputs", "masked_loss", "choose_refit", "run_refit"]


@dataclass
class RefitCandidate:
    """One setting :func:`choose_refit` scored: the refitted structures (None: no refit), damping, held-out loss."""

    structures: Optional[list[str]]
    damping: Optional[float]
    val_loss: float


@dataclass
class RefitResult:
    """What a refit did: ``weights`` refitted (0 when no refit won), ``passes`` over ``tokens`` calibration tokens,
    the ``structures`` and ``damping`` used (None when no refit won), and, when scored on held-out windows, the
    loss before and after (``val_loss``) and every ``candidates``' score. ``mode``: the RefitConfig mode."""

    weights: int
    passes: int
    tokens: int
    damping: Optional[float]
    structures: Optional[list[str]]
    mode: str = "on"
    val_loss: Optional[tuple[float, float]] = None
    candidates: list[RefitCandidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-safe record for the report (``val_loss`` and ``candidates`` only when scored)."""
        out = {"weights": self.weights, "passes": self.passes, "tokens": self.tokens, "damping": self.damping,
               "structures": self.structures, "mode": self.mode}
        if self.val_loss is not None:
            out["val_loss"] = list(self.val_loss)
            out["candidates"] = [asdict(c) for c in self.candidates]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RefitResult":
        """The result :meth:`to_dict` recorded."""
        val_loss = data.get("val_loss")
        return cls(**{**data, "val_loss": tuple(val_loss) if val_loss is not None else None,
                      "candidates": [RefitCandidate(**c) for c in data.get("candidates", [])]})

    def markdown_lines(self) -> list[str]:
        """The report's lines on this refit."""
        if self.structures is None:
            loss = f" (loss {self.val_loss[0]:.4f})" if self.val_loss is not None else ""
            return ["", f"Refit ({self.mode}): no refit scored better on the held-out calibration windows than "
                        f"none{loss}; the weights are the dense model's."]
        scored = ""
        if self.val_loss is not None:
            scored = (f"; held-out calibration loss {self.val_loss[0]:.4f} → {self.val_loss[1]:.4f}, the best of "
                      f"{len(self.candidates)} choices")
        return ["", f"Refit ({self.mode}): {self.weights} weights reading a pruned input "
                    f"({', '.join(self.structures)}) refitted by least squares on {self.tokens:,} calibration "
                    f"tokens, damping {self.damping:g}{scored}."]


def check_damping(damping) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < float("inf"):
        raise ValueError(f"refit: damping must be a finite number > 0, got {damping!r}")


def _check(model: nn.Module, masks: DispMasks, blocks: torch.Tensor, damping: float, batch_size: int,
           structures: Sequence[str] = INPUT_STRUCTURES) -> None:
    if isinstance(structures, str) or not structures or any(s not in INPUT_STRUCTURES for s in structures):
        raise ValueError(f"refit: structures must be a non-empty list of {', '.join(INPUT_STRUCTURES)}, "
                         f"got {structures!r}")
    if not isinstance(masks, DispMasks):
        raise TypeError(f"refit: masks must be DispMasks, got {type(masks).__name__}")
    require_dense(model, "the refit")
    check_windows(blocks, "refit: blocks")
    check_damping(damping)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"refit: batch_size must be a positive int, got {batch_size!r}")


def _layer_groups(widths: list[dict[str, int]], max_gram_bytes: int) -> list[list[int]]:
    """Consecutive layers whose Gram matrices (float64) together fit ``max_gram_bytes`` (at least one each)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, w in enumerate(widths):
        need = sum(8 * n * n for n in w.values())
        if groups[-1] and used + need > max_gram_bytes:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += need
    return groups


def collect_input_grams(model: nn.Module, masks: DispMasks, blocks: torch.Tensor, *, layers: Optional[list] = None,
                        structures: Sequence[str] = INPUT_STRUCTURES, batch_size: int = 4,
                        progress: bool = True, placement: Optional[dist.Placement] = None,
                        ) -> dict[tuple[int, str], torch.Tensor]:
    """Token-weighted Gram matrices of the inputs that ``masks`` prune, in the masked ``model``.

    Returns ``{(layer, structure): G}`` with ``G`` float64 ``[width, width]`` on the CPU (full width of the
    structure in the layer's prunable space: d for ``attn_in``/``mlp_in``, ffn for ``mlp_mid``),
    ``G = Σ_t x_t x_tᵀ / ‖x_t‖²`` over every token of ``blocks`` ``[n, seq_len]``, ``x_t`` the input of the
    structure's first weight before its mask is multiplied in. ``layers``, ``structures``: only these (default
    all). Structures that keep every column, and those a layer does not have, are skipped (nothing to refit).
    Data-parallel: the windows are dealt out over the ranks and the sums are reduced, so every rank returns the
    same matrices; a sharded (FSDP) model runs the same number of forwards on every rank.
    """
    require_dense(model, "the refit's statistics")
    adapter = adapter_for(model)
    space = adapter.space(model.config)
    masks.validate(space)
    layer_modules = adapter.decoder_layers(model)
    wanted = range(space.num_layers) if layers is None else layers
    device = model_device(model)
    stats: dict[tuple[int, str], CalibrationStats] = {}
    counting = [True]  # False during a sharded run's filler forwards
    hooks = []
    for i in wanted:
        points = adapter.mask_points(layer_modules[i])
        for s in structures:
            if s not in space.names(i) or masks[i][s].numel() == space.size(i, s):
                continue
            stats[(i, s)] = CalibrationStats.empty(space.size(i, s), gram=True, device=device)

            def hook(mod, args, key=(i, s)):
                if not counting[0]:
                    return None
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).float()
                # relative weighting; an all-zero row contributes nothing rather than NaN
                calibration_stats(x / x.norm(dim=1, keepdim=True).clamp_min(1e-12), stats[key])
                return None
            # registered before the MaskedModel's hooks: this sees the input before its own mask is applied
            hooks.append(points[s][0][0].register_forward_pre_hook(hook))
    if not stats:
        for h in hooks:
            h.remove()
        return {}
    # forwards of a sharded model are collectives: every rank runs as many (filler ones are not counted)
    placement = placement or dist.Placement.of(model)
    batches = dist.rank_batches(blocks.shape[0], batch_size, lockstep=placement.sharded)
    try:
        with frozen(model, grad=True), MaskedModel(model, masks), torch.no_grad():
            for batch in tqdm(batches, desc="refit (input statistics)", disable=not progress or not placement.is_main):
                counting[0] = batch is not None
                model(input_ids=blocks[batch if batch is not None else [0]].to(device))
    finally:
        for h in hooks:
            h.remove()
    keys = sorted(stats)
    dist.all_reduce_sum_([stats[k].gram for k in keys])
    grams = {k: stats[k].gram.cpu() for k in keys}
    for (i, s), g in grams.items():
        if not torch.isfinite(g).all():
            raise ValueError(f"refit: non-finite activations at layer {i} ({s}) on the calibration text")
    return grams


def refit_weights(model: nn.Module, masks: DispMasks, grams: dict[tuple[int, str], torch.Tensor], *,
                  damping: float = DEFAULT_DAMPING, structures: Sequence[str] = INPUT_STRUCTURES) -> int:
    """Replaces, in place, the kept input columns of every weight reading a pruned input (see the module doc).

    ``model``: the dense model (not compacted); ``grams`` from :func:`collect_input_grams`; only the weights of
    ``structures`` are refitted. Columns outside the index sets are left as they are (compaction drops them).
    Returns the number of weights refitted.
    """
    adapter = adapter_for(model)
    layer_modules = adapter.decoder_layers(model)
    done = 0
    for (i, s), g in sorted(grams.items()):
        if s not in structures:
            continue
        keep = masks[i][s]
        if keep.numel() == 0 or keep.numel() == g.shape[0]:
            continue  # nothing kept (the weight goes) or nothing removed (nothing to make up for)
        g_kk = g[keep][:, keep]
        delta = damping * float(g_kk.diagonal().mean().clamp_min(1e-30))
        lhs = g_kk + delta * torch.eye(keep.numel(), dtype=torch.float64)
        for module, where in adapter.mask_points(layer_modules[i])[s]:
            weight = module.weight
            w = weight.detach().to("cpu", torch.float64)
            rhs = g[keep] @ w.T + delta * w[:, keep].T  # [|K|, out]
            new = torch.linalg.solve(lhs, rhs).T
            with torch.no_grad():
                weight[:, keep.to(weight.device)] = new.to(weight.dtype).to(weight.device)
            done += 1
    return done


def refit_pruned_inputs(model: nn.Module, masks: DispMasks, blocks: torch.Tensor, *,
                        damping: float = DEFAULT_DAMPING, structures: Sequence[str] = DEFAULT_STRUCTURES,
                        batch_size: int = 4, max_gram_bytes: int = 4 << 30, progress: bool = True,
                        target: Optional[nn.Module] = None,
                        placement: Optional[dist.Placement] = None) -> RefitResult:
    """Collects the input statistics on ``model`` under ``masks`` and refits ``target`` (default ``model``).

    ``blocks`` ``[n, seq_len]``: calibration token windows. ``structures``: whose weights are refitted (default
    the MLP's last projection alone). ``target``: the dense model whose weights change, when it is not ``model``
    itself (a sharded run's rank 0 passes its full copy; other ranks pass None and only help collect). Returns
    a :class:`RefitResult` (unscored: no ``val_loss``).
    """
    _check(model, masks, blocks, damping, batch_size, structures)
    placement = placement or dist.Placement.of(model)
    if target is None and not placement.sharded:  # sharded: ranks > 0 only take part in the forwards
        target = model
    space = adapter_for(model).space(model.config)
    masks.validate(space)
    widths = [{s: space.size(i, s) for s in structures if s in space.names(i)} for i in range(space.num_layers)]
    groups = _layer_groups(widths, max_gram_bytes)
    weights = 0
    for group in groups:
        grams = collect_input_grams(model, masks, blocks, layers=group, structures=structures,
                                    batch_size=batch_size, progress=progress, placement=placement)
        if target is not None:
            weights += refit_weights(target, masks, grams, damping=damping, structures=structures)
        del grams
    return RefitResult(weights=weights, passes=len(groups), tokens=int(blocks.numel()), damping=damping,
                       structures=list(structures))


def masked_loss(model: nn.Module, masks: DispMasks, blocks: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean LM loss of ``model`` under ``masks`` (the compacted model's loss) over ``blocks`` [n, seq_len]
    (split across data-parallel ranks, :func:`dip_ext.eval.mean_window_loss`)."""
    with MaskedModel(model, masks):
        return mean_window_loss(model, blocks, batch_size=batch_size)


def choose_refit(model: nn.Module, masks: DispMasks, blocks: torch.Tensor, val_blocks: torch.Tensor, *,
                 candidates: Sequence[tuple[Sequence[str], float]] = CANDIDATES, batch_size: int = 4,
                 max_gram_bytes: int = 4 << 30, progress: bool = True,
                 placement: Optional[dist.Placement] = None) -> RefitResult:
    """Refits ``model`` in place with the candidate that gives the lowest LM loss on ``val_blocks``, or not at all.

    ``candidates``: ``(structures, damping)`` pairs (default :data:`CANDIDATES`); the statistics are collected
    once on ``blocks`` (all layers at once: their Gram matrices must fit in memory) and every candidate is scored
    by :func:`masked_loss` on the held-out ``val_blocks`` (windows the masks were not chosen on), against no
    refit at all. The original weights of every refittable layer are kept (CPU) meanwhile. Returns a
    :class:`RefitResult` for the chosen candidate (``structures`` None when no refit won) with ``val_loss``
    (before, after) and every candidate's score.
    When the Gram matrices of every layer do not fit ``max_gram_bytes`` (float64, ``8 * in²`` bytes per layer
    and structure), it warns and refits as :func:`refit_pruned_inputs` with its defaults, layer group by
    layer group, unscored. Data-parallel ranks compute the same statistics (reduced) and the same losses, so they
    choose alike; a sharded (FSDP) model is not supported (its ranks hold no whole weights to score): use
    :func:`refit_pruned_inputs`.
    """
    placement = placement or dist.Placement.of(model)
    if placement.sharded:
        raise ValueError("choose_refit needs whole weights on every rank; for a sharded (FSDP) model use "
                         "refit_pruned_inputs (a fixed structures / damping)")
    if not candidates:
        raise ValueError("choose_refit: no candidates")
    for structures, damping in candidates:
        _check(model, masks, blocks, damping, batch_size, structures)
    check_windows(val_blocks, "choose_refit: val_blocks")
    used = sorted({s for structures, _ in candidates for s in structures}, key=INPUT_STRUCTURES.index)
    adapter = adapter_for(model)
    space = adapter.space(model.config)
    if sum(8 * space.size(i, s) ** 2 for i in range(space.num_layers) for s in used if s in space.names(i)) \
            > max_gram_bytes:
        warnings.warn(f"refit: the input statistics of every layer do not fit max_gram_bytes={max_gram_bytes}; "
                      "refitting with the default settings, unscored", stacklevel=2)
        return refit_pruned_inputs(model, masks, blocks, batch_size=batch_size, max_gram_bytes=max_gram_bytes,
                                   progress=progress, placement=placement)
    grams = collect_input_grams(model, masks, blocks, structures=used, batch_size=batch_size, progress=progress,
                                placement=placement)
    layer_modules = adapter.decoder_layers(model)
    weights = {(i, s): [m.weight for m, _ in adapter.mask_points(layer_modules[i])[s]] for i, s in grams}
    originals = {key: [w.detach().to("cpu", copy=True) for w in ws] for key, ws in weights.items()}

    def restore() -> None:
        with torch.no_grad():
            for key, ws in weights.items():
                for w, orig in zip(ws, originals[key]):
                    w.copy_(orig)

    scored = [RefitCandidate(None, None, masked_loss(model, masks, val_blocks))]
    for structures, damping in tqdm(candidates, desc="refit (choosing)", disable=not progress or not placement.is_main):
        refit_weights(model, masks, grams, damping=damping, structures=structures)
        scored.append(RefitCandidate(list(structures), damping, masked_loss(model, masks, val_blocks)))
        restore()
    best = min(scored, key=lambda c: c.val_loss)  # ties: the earlier (no refit first)
    n = 0
    if best.structures is not None:
        n = refit_weights(model, masks, grams, damping=best.damping, structures=best.structures)
    return RefitResult(weights=n, passes=1, tokens=int(blocks.numel()), damping=best.damping,
                       structures=best.structures, mode="auto", val_loss=(scored[0].val_loss, best.val_loss),
                       candidates=scored)


def run_refit(model: nn.Module, masks: DispMasks, windows: torch.Tensor, val_windows: Optional[torch.Tensor],
              mode: str, damping: float = DEFAULT_DAMPING, *, target: Optional[nn.Module] = None,
              progress: bool = True, placement: Optional[dist.Placement] = None) -> Optional[RefitResult]:
    """The refit stage as ``RefitConfig.refit`` names it: ``"off"`` (None), ``"on"`` (:func:`refit_pruned_inputs`
    of the MLP's last projection at ``damping``) or ``"auto"`` (:func:`choose_refit` on ``val_windows``; without
    held-out windows, or on a sharded model whose ranks hold no whole weights to score, it refits as ``"on"``).
    ``target``: see :func:`refit_pruned_inputs` (a sharded run's full copy on rank 0)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"refit mode must be auto, on or off, got {mode!r}")
    if mode == "off":
        return None
    placement = placement or dist.Placement.of(model)
    if mode == "auto" and val_windows is not None and not placement.sharded:
        result = choose_refit(model, masks, windows, val_windows, progress=progress, placement=placement)
    else:
        result = refit_pruned_inputs(model, masks, windows, damping=damping, progress=progress, target=target,
                                     placement=placement)
    result.mode = mode
    return result
