"""The calibration pass: run the frozen model over calibration blocks and accumulate what selection needs.

Per decoder layer and prunable structure it accumulates
- activation statistics of every prunable input (``dip_ext.ops.calibration_stats``: count, per-channel sum and
  sum of squares in fp64) at the normalized attention input, the attention output projection's input, the
  normalized MLP input and the MLP down projection's input;
- first-order Fisher scores: with a mask fixed at 1 on every prunable dimension, ``g = ∂L/∂m`` per calibration
  window, score ``Σ g²`` (the diagonal empirical Fisher: the expected loss increase of dropping that dimension
  is ≈ ½·score). The tied score of the dimension-dependent baseline (one mask shared by every hidden-width set
  of every layer) is accumulated alongside: ``Σ (Σ_sets g)²``.

The pass checkpoints every few windows and resumes (nothing is lost on interruption); its result is saved with
safetensors and reusable.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist
from .compaction import require_dense
from .files import atomic_save_safetensors, fingerprint_differences
from .families import adapter_for
from .masking import MaskedModel
from .masks import STRUCTURE_SPACE, STRUCTURES, ModelDims
from .model_state import frozen, model_device, model_digest
from .ops import CalibrationStats, calibration_stats
from .tokens import check_windows

#: activation statistics points: name -> (structure whose mask point it shares, input side)
STAT_POINTS = {"attn_in": "attn_in", "attn_proj_in": "attn_out", "mlp_in": "mlp_in", "mlp_mid": "mlp_mid"}
HIDDEN = tuple(s for s in STRUCTURES if STRUCTURE_SPACE[s] == "hidden")


@dataclass
class CalibrationResult:
    """Fisher scores and activation statistics of one model on ``windows`` calibration windows."""

    dims: ModelDims
    windows: int = 0
    #: scores[i][s]: float64 [width of s] — Σ_windows (∂L/∂m)² per dimension
    scores: list[dict[str, torch.Tensor]] = field(default_factory=list)
    #: float64 [d] — Σ_windows (Σ_{layers, hidden sets} ∂L/∂m)²: the dimension-dependent (tied) score
    tied_hidden: Optional[torch.Tensor] = None
    #: stats[point][i]: activation statistics (STAT_POINTS)
    stats: dict[str, list[CalibrationStats]] = field(default_factory=dict)
    #: loss per window (mean token NLL), for the record
    losses: list[float] = field(default_factory=list)
    #: fingerprint of the ``windows`` token blocks seen (a resume must continue the same windows)
    blocks_sha: Optional[str] = None
    #: fingerprint of the model's weights (:func:`dip_ext.model_state.model_digest`; a resume must use the same)
    model_sha: Optional[str] = None
    #: the run's settings that shaped the pass (``{option: value}``, e.g. the model, dtype, text): a resume with
    #: other settings is refused naming the option that differs
    settings: Optional[dict] = None

    @classmethod
    def empty(cls, dims: ModelDims) -> "CalibrationResult":
        z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        return cls(dims, 0, [{s: z(dims.size(s)) for s in STRUCTURES} for _ in range(dims.num_layers)],
                   z(dims.hidden), {}, [])

    # ---- persistence (safetensors + JSON, no pickle) -------------------------------------------------------
    def save(self, path) -> None:
        """Writes ``path`` (a .safetensors file) atomically; the small metadata rides in its header."""
        tensors = {f"scores.{i}.{s}": t for i, layer in enumerate(self.scores) for s, t in layer.items()}
        tensors["tied_hidden"] = self.tied_hidden
        for point, per_layer in self.stats.items():
            for i, st in enumerate(per_layer):
                for k, v in st.state_dict().items():
                    tensors[f"stats.{point}.{i}.{k}"] = v.reshape(-1) if k == "count" else v
        meta = {"format": "dip_ext.calibration.v1", "windows": str(self.windows), "losses": json.dumps(self.losses),
                "dims": json.dumps([self.dims.num_layers, self.dims.hidden, self.dims.ffn])}
        for key in ("blocks_sha", "model_sha"):
            if getattr(self, key) is not None:
                meta[key] = getattr(self, key)
        if self.settings is not None:
            meta["settings"] = json.dumps(self.settings)
        atomic_save_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path) -> "CalibrationResult":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a readable calibration file ({e})") from None
        if meta.get("format") != "dip_ext.calibration.v1":
            raise ValueError(f"{path}: not a dip_ext calibration file")
        dims = ModelDims(*json.loads(meta["dims"]))
        res = cls(dims, int(meta["windows"]),
                  [{s: tensors[f"scores.{i}.{s}"] for s in STRUCTURES} for i in range(dims.num_layers)],
                  tensors["tied_hidden"], {}, json.loads(meta["losses"]), meta.get("blocks_sha"),
                  meta.get("model_sha"), json.loads(meta["settings"]) if "settings" in meta else None)
        for point in STAT_POINTS:
            if f"stats.{point}.0.sum" in tensors:
                res.stats[point] = [CalibrationStats.from_state_dict(
                    {k: tensors[f"stats.{point}.{i}.{k}"] for k in ("count", "sum", "sumsq")})
                    for i in range(dims.num_layers)]
        return res


def blocks_sha(blocks: torch.Tensor) -> str:
    """A short fingerprint of token blocks [n, seq_len] (shape and ids)."""
    h = hashlib.sha256(str(tuple(blocks.shape)).encode())
    h.update(blocks.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_calibration(model: nn.Module, blocks: torch.Tensor, *, stats: bool = True, progress: bool = True,
                    checkpoint: Optional[os.PathLike] = None, checkpoint_every: int = 8,
                    placement: Optional[dist.Placement] = None,
                    settings: Optional[Mapping[str, Any]] = None) -> CalibrationResult:
    """Fisher scores (+ activation statistics) of the frozen dense ``model`` over ``blocks`` [n, seq_len].

    One window per forward/backward (the Fisher needs per-window gradients). With ``checkpoint`` (a file path)
    the partial result is saved every ``checkpoint_every`` windows and a rerun resumes from it (ValueError when
    the checkpoint's windows are not the first windows of ``blocks``: another text or window count).
    ``settings``: JSON-safe ``{option name: value}`` of what shaped the pass (the pipeline passes the model, its
    dtype, the text, the window length and counts), stored in the checkpoint; a checkpoint of other settings is
    refused naming each option that differs, before the weight and window digests are compared. Raises
    ValueError on non-finite activations or loss (names the layer / window).

    Data-parallel (``torch.distributed`` initialised; every rank passes the same blocks): the windows are
    dealt out in rounds of ``world_size`` (rank ``r`` takes window ``k * world_size + r`` of round ``k``),
    and the per-rank partial sums (scores, tied score, activation statistics, per-window losses) are summed
    across ranks before every checkpoint and at the end, so every rank returns the same result: the
    one-process sums, up to the rounding of the different summation order. Only rank 0 reads and writes the
    checkpoint (the others receive what it read); a checkpoint always holds complete, reduced rounds.
    """
    require_dense(model, "the calibration pass")
    adapter = adapter_for(model)
    check_windows(blocks, "calibration blocks", config=model.config)
    dims = adapter.dims(model.config)
    device = model_device(model)
    placement = placement or dist.Placement.of(model)
    world, rank = placement.world_size, placement.rank
    result = _load_checkpoint(checkpoint)
    model_sha = model_digest(model)  # the same on every rank, whatever the placement
    settings = dict(settings) if settings is not None else None
    if result is None:
        result = CalibrationResult.empty(dims)
        result.model_sha, result.settings = model_sha, settings
    elif result.settings is not None and settings is not None and result.settings != settings:
        raise ValueError(f"{checkpoint}: calibration checkpoint of a run with other settings "
                         f"({fingerprint_differences(result.settings, settings)}); rerun with the same options, "
                         "or without --resume")
    elif result.dims != dims:
        raise ValueError(f"{checkpoint}: calibration checkpoint of another model ({result.dims} vs {dims})")
    elif result.model_sha is not None and result.model_sha != model_sha:
        raise ValueError(f"{checkpoint}: calibration checkpoint made on other weights (model digest "
                         f"{result.model_sha} vs {model_sha} now): another model of the same shape, or the same one "
                         "in another dtype; delete it or run without resume")
    start = result.windows
    if start > blocks.shape[0]:
        raise ValueError(f"{checkpoint}: checkpoint has {start} windows but only {blocks.shape[0]} were given")
    if start and result.blocks_sha is not None and result.blocks_sha != blocks_sha(blocks[:start]):
        # e.g. another --calibration text or window count: summing both would be neither run
        raise ValueError(f"{checkpoint}: calibration checkpoint made on other token windows than the first {start} "
                         "given now (other text, seq_len or window count?); delete it or run without resume")

    # With peers, this rank's windows accumulate into `acc` and are folded into `result` at each sync; alone,
    # `acc` IS `result` (the one-process sums stay exactly what they always were).
    acc = result if world == 1 else CalibrationResult.empty(dims)
    pending_losses: list[tuple[int, float]] = []

    ones = [{s: torch.ones(dims.size(s), device=device, requires_grad=True) for s in STRUCTURES}
            for _ in range(dims.num_layers)]
    flat = [m for layer in ones for m in layer.values()]
    layers = adapter.decoder_layers(model)
    hooks = []
    if stats:
        modules = [{p: adapter.mask_points(layer)[s][0][0] for p, s in STAT_POINTS.items()} for layer in layers]

        def empty_stats() -> dict[str, list[CalibrationStats]]:
            # widths read from the module the statistics describe: o_proj's input is heads * head_dim wide,
            # which need not be the residual width
            return {p: [CalibrationStats.empty(_input_width(m[p], dims.size(STAT_POINTS[p]))) for m in modules]
                    for p in STAT_POINTS}

        if not result.stats:
            result.stats = empty_stats()
        if acc is not result:
            acc.stats = empty_stats()
        for i, layer in enumerate(layers):
            for p in STAT_POINTS:
                module = modules[i][p]

                def hook(mod, args, p=p, i=i):
                    x = args[0].detach()
                    if x.dim() in (2, 3):  # OPT runs its MLP on [tokens, d]
                        # accumulate on the activations' device: no host read per call
                        st = acc.stats[p][i] = acc.stats[p][i].to(x.device)
                        calibration_stats(x, st)
                hooks.append(module.register_forward_pre_hook(hook))

    try:
        with frozen(model), MaskedModel(model, ones):
            n = blocks.shape[0]
            bar = tqdm(desc="calibration (Fisher)", disable=not progress or rank != 0, initial=start, total=n)
            # A sharded (FSDP) model's forward and backward are collectives: a rank without a window in the last
            # round runs one on window 0 anyway (and keeps nothing of it) so that its peers are not left waiting.
            lockstep = placement.sharded
            for first in range(start, n, world):  # one round: windows first .. first + world - 1
                w = first + rank
                if w >= n and lockstep:
                    ids = blocks[:1].to(device)
                    torch.autograd.grad(model(input_ids=ids, labels=ids).loss, flat)
                if w < n:
                    ids = blocks[w:w + 1].to(device)
                    loss = model(input_ids=ids, labels=ids).loss
                    if not torch.isfinite(loss):
                        _check_finite(acc)  # names the first layer whose activations went non-finite
                        raise ValueError(f"non-finite loss on calibration window {w}: the model or its input is "
                                         f"broken")
                    grads = torch.autograd.grad(loss, flat)
                    tied = torch.zeros(dims.hidden, dtype=torch.float64)
                    for k, g in enumerate(grads):
                        i, s = divmod(k, len(STRUCTURES))
                        g64 = g.detach().double().cpu()
                        acc.scores[i][STRUCTURES[s]] += g64 * g64
                        if STRUCTURES[s] in HIDDEN:
                            tied += g64
                    acc.tied_hidden += tied * tied
                    if world == 1:
                        result.losses.append(float(loss.detach()))
                    else:
                        pending_losses.append((w, float(loss.detach())))
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                done = min(first + world, n)
                bar.update(done - first)
                if world == 1:
                    result.windows = done
                if checkpoint is not None and done // checkpoint_every > first // checkpoint_every:
                    _sync(result, acc, pending_losses, done)
                    _stats_to_cpu(result)
                    _check_finite(result)
                    result.blocks_sha = blocks_sha(blocks[:result.windows])
                    _save_on_main(result, checkpoint)
            bar.close()
    finally:
        for h in hooks:
            h.remove()
    if result.windows < blocks.shape[0]:
        _sync(result, acc, pending_losses, blocks.shape[0])
    _stats_to_cpu(result)
    _check_finite(result)
    result.blocks_sha = blocks_sha(blocks[:result.windows])
    if checkpoint is not None:
        _save_on_main(result, checkpoint)
    return result


def _input_width(module: nn.Module, fallback: int) -> int:
    return module.in_features if isinstance(module, nn.Linear) else fallback


def _load_checkpoint(checkpoint) -> Optional[CalibrationResult]:
    """The checkpoint as rank 0 reads it, on every rank (None when there is none); errors raise on all."""
    if checkpoint is None:
        return None
    return dist.read_on_main(lambda: CalibrationResult.load(checkpoint) if Path(checkpoint).is_file() else None)


def _save_on_main(result: CalibrationResult, checkpoint) -> None:
    if dist.is_main():
        result.save(checkpoint)
    dist.barrier()  # nobody runs ahead (and may fail) before the reduced rounds are on disk


def _stats_to_cpu(result: CalibrationResult) -> None:
    """Moves the activation statistics (accumulated on the activations' device) to the CPU, once per sync."""
    result.stats = {p: [st.to("cpu") for st in per_layer] for p, per_layer in result.stats.items()}


def _sync(result: CalibrationResult, acc: CalibrationResult, pending_losses: list, done: int) -> None:
    """Folds every rank's partial sums ``acc`` (reset afterwards) into ``result``, which then covers windows
    ``[0, done)`` on every rank. Alone, ``acc`` is ``result`` and nothing needs folding."""
    _stats_to_cpu(acc)  # every rank reduces CPU tensors of the same layout
    if acc is result:
        result.windows = done
        return
    stats = [st for point in STAT_POINTS for st in acc.stats.get(point, [])]
    tensors = [t for layer in acc.scores for t in layer.values()] + [acc.tied_hidden]
    for st in stats:
        tensors += [st.sum, st.sumsq] + ([st.gram] if st.gram is not None else [])
    counts = torch.tensor([st.count for st in stats], dtype=torch.int64)
    dist.all_reduce_sum_(tensors + [counts])
    for mine, theirs in zip(result.scores, acc.scores):
        for s in STRUCTURES:
            mine[s] += theirs[s]
            theirs[s].zero_()
    result.tied_hidden += acc.tied_hidden
    acc.tied_hidden.zero_()
    totals = [st for point in STAT_POINTS for st in result.stats.get(point, [])]
    for total, st, c in zip(totals, stats, counts.tolist()):
        st.count = c
        total.merge(st)
        st.count = 0
        for t in (st.sum, st.sumsq, st.gram):
            if t is not None:
                t.zero_()
    # per-window losses in window order, as one process would have recorded them
    gathered = sorted(x for part in dist.all_gather_object(list(pending_losses)) for x in part)
    result.losses.extend(loss for _, loss in gathered)
    pending_losses.clear()
    result.windows = done


def _check_finite(result: CalibrationResult) -> None:
    # layer by layer, points in forward order: a NaN spreads downstream, so the first hit is where it started
    for i in range(result.dims.num_layers):
        for p in (p for p in STAT_POINTS if p in result.stats):
            st = result.stats[p][i]
            if not (torch.isfinite(st.sum).all() and torch.isfinite(st.sumsq).all()):
                raise ValueError(f"non-finite calibration activations at layer {i} ({p}): NaN/inf in the model's "
                                 "activations (check the weights / dtype; fp16 may overflow)")
    for i, layer in enumerate(result.scores):
        for s, t in layer.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"non-finite Fisher scores at layer {i} {s}")
