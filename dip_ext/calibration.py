"""The calibration pass: run the frozen model over calibration blocks and accumulate what selection needs.

Per decoder layer and each structure of the family's prunable space (:class:`~dip_ext.space.PrunableSpace`,
its optional structures included; a layer may have other structures than the next) it accumulates
- activation statistics of the prunable inputs (``dip_ext.ops.calibration_stats``: count, per-channel sum and
  sum of squares in fp64) at the normalized attention input, the attention output projection's input, the
  normalized MLP input and the MLP down projection's input (:data:`STAT_POINTS`), in the layers that have the
  structure whose mask point each shares;
- first-order Fisher scores: with a mask fixed at 1 on every prunable dimension, ``g = ∂L/∂m`` per calibration
  window, score ``Σ g²`` per dimension (per unit of a whole-unit structure: per KV group, the group's mask on its
  query heads' columns at the attention output projection's input; for a structure scored by column, Gemma3's
  groups, ``Σ g²`` over the unit's columns, each masked alone) (the diagonal empirical Fisher: the expected
  loss increase of dropping that dimension is ≈ ½·score). The tied score of the dimension-dependent baseline (one
  mask shared by every hidden-axis set of every layer) is accumulated alongside: ``Σ (Σ_sets g)²``.

The pass checkpoints every few windows and resumes (nothing is lost on interruption); its result is saved with
safetensors and reusable.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist
from .compaction import require_dense
from .files import fingerprint_differences
from .families import adapter_for
from .masking import MaskedModel
from .masks import STRUCTURE_SPACE, STRUCTURES
from .model_state import frozen, model_device, model_digest
from .ops import CalibrationStats, calibration_stats
from .space import HIDDEN_AXIS, PrunableSpace
from .tokens import check_windows
from .training import CheckpointFormat, digest

#: activation statistics points: name -> the structure whose (first) mask point's module input it describes
STAT_POINTS = {"attn_in": "attn_in", "attn_proj_in": "attn_out", "mlp_in": "mlp_in", "mlp_mid": "mlp_mid"}
#: the built-in layout's hidden-axis sets (the dimension-dependent baseline ties them across every layer)
HIDDEN = tuple(s for s in STRUCTURES if STRUCTURE_SPACE[s] == HIDDEN_AXIS)
#: a calibration result on disk (also the pass's checkpoint): the training kit's checkpoint format (version 4:
#: the fingerprint records the model's prunable space and scores follow each layer's structures)
FORMAT = CheckpointFormat("dip_ext.calibration", 4, "calibration file",
                          remedy="delete it (the calibration pass runs again) or run without resume")
#: readable names of the fingerprint's entries, for a refused resume
_LABELS = {"space": "the model's prunable space (another model)",
           "weights": "the model's weights digest (other weights: another model of the same shape, or another dtype)",
           "blocks": "the digest of the windows done (other token windows: another text, seq_len or window count)"}


@dataclass
class CalibrationResult:
    """Fisher scores and activation statistics of one model on ``windows`` calibration windows.

    ``space``: the family's full prunable space of the model (optional structures such as ``kv_groups`` included):
    what was scored, layer by layer."""

    space: PrunableSpace
    windows: int = 0
    #: scores[i][s]: float64 [size of s in layer i] — Σ_windows (∂L/∂m)² per dimension (per group for
    #: ``kv_groups``), for every structure of layer i (:func:`scored`)
    scores: list[dict[str, torch.Tensor]] = field(default_factory=list)
    #: float64 [space.hidden] — Σ_windows (Σ_{layers, hidden-axis sets} ∂L/∂m)²: the dimension-dependent (tied)
    #: score
    tied_hidden: Optional[torch.Tensor] = None
    #: stats[point][i]: activation statistics (STAT_POINTS), None in a layer without the point's structure; a
    #: point no layer has is absent
    stats: dict[str, list[Optional[CalibrationStats]]] = field(default_factory=dict)
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
    def empty(cls, space: PrunableSpace) -> "CalibrationResult":
        """No windows yet: zero scores of every layer's structures of ``space``, no statistics."""
        z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        return cls(space, 0, [{s: z(space.size(i, s)) for s in names} for i, names in enumerate(scored(space))],
                   z(space.hidden), {}, [])

    # ---- persistence (safetensors + JSON, no pickle) -------------------------------------------------------
    def fingerprint(self) -> dict:
        """What a resume must match: the model's prunable space and weights digest, the digest of the windows done
        and the settings that shaped the pass."""
        return {"space": self.space.as_dict(), "weights": self.model_sha,
                "blocks": self.blocks_sha, "settings": self.settings}

    def save(self, path) -> None:
        """Writes ``path`` (a .safetensors file of :data:`FORMAT`) atomically."""
        tensors = {f"scores.{i}.{s}": t for i, layer in enumerate(self.scores) for s, t in layer.items()}
        tensors["tied_hidden"] = self.tied_hidden
        for point, per_layer in self.stats.items():
            for i, st in enumerate(per_layer):
                if st is not None:
                    for k, v in st.state_dict().items():
                        tensors[f"stats.{point}.{i}.{k}"] = v.reshape(-1) if k == "count" else v
        FORMAT.write(path, tensors, {"fingerprint": self.fingerprint(), "windows": self.windows,
                                     "losses": self.losses})

    @classmethod
    def load(cls, path) -> "CalibrationResult":
        """The result :meth:`save` wrote; ValueError for an unreadable, foreign or older file (naming its format)."""
        return cls.from_file_content(*FORMAT.read(path))

    @classmethod
    def from_file_content(cls, tensors: dict, meta: dict) -> "CalibrationResult":
        """The result of a file's ``(tensors, meta)`` as :meth:`CheckpointFormat.read` returns them."""
        fp = meta["fingerprint"]
        space = PrunableSpace.from_dict(fp["space"])
        res = cls(space, int(meta["windows"]),
                  [{s: tensors[f"scores.{i}.{s}"] for s in names} for i, names in enumerate(scored(space))],
                  tensors["tied_hidden"], {}, list(meta["losses"]), fp["blocks"], fp["weights"], fp["settings"])
        layers = range(space.num_layers)
        for point in STAT_POINTS:
            if any(f"stats.{point}.{i}.sum" in tensors for i in layers):
                res.stats[point] = [CalibrationStats.from_state_dict(
                    {k: tensors[f"stats.{point}.{i}.{k}"] for k in ("count", "sum", "sumsq")})
                    if f"stats.{point}.{i}.sum" in tensors else None for i in layers]
        return res


def scored(space: PrunableSpace) -> list[tuple[str, ...]]:
    """Per layer, the structures the pass scores: every structure the layer declares, optional ones (KV groups)
    included, in the space's order."""
    return [space.names(i) for i in range(space.num_layers)]


def blocks_sha(blocks: torch.Tensor) -> str:
    """A short fingerprint of token blocks [n, seq_len] (shape and ids)."""
    return digest(str(tuple(blocks.shape)), blocks.to(torch.int64))


def run_calibration(model: nn.Module, blocks: torch.Tensor, *, stats: bool = True, progress: bool = True,
                    checkpoint: Optional[os.PathLike] = None, checkpoint_every: int = 8,
                    placement: Optional[dist.Placement] = None,
                    settings: Optional[Mapping[str, Any]] = None) -> CalibrationResult:
    """Fisher scores (+ activation statistics) of the frozen dense ``model`` over ``blocks`` [n, seq_len].

    One window per forward/backward (the Fisher needs per-window gradients). With ``checkpoint`` (a file path)
    the partial result is saved every ``checkpoint_every`` windows and a rerun resumes from it (ValueError when
    the checkpoint's windows are not the first windows of ``blocks``: another text or window count).
    ``settings``: JSON-safe ``{option name: value}`` of what shaped the pass (the pipeline passes the model, its
    dtype, the text, the window length and counts), stored in the checkpoint; a checkpoint of another run is
    refused naming each entry that differs (each option, the model's prunable space, the weights and window
    digests). Raises ValueError on non-finite activations or loss (names the layer / window).

    Data-parallel (``torch.distributed`` initialised; every rank passes the same blocks): the windows are
    dealt out in rounds of ``world_size`` (rank ``r`` takes window ``k * world_size + r`` of round ``k``),
    and the per-rank partial sums (scores, tied score, activation statistics, per-window losses) are summed
    across ranks before every checkpoint and at the end, so every rank returns the same result: the
    one-process sums, up to the rounding of the different summation order. Only rank 0 reads and writes the
    checkpoint (the others receive what it read); a checkpoint always holds complete, reduced rounds.
    """
    require_dense(model, "the calibration pass")
    check_windows(blocks, "calibration blocks", config=model.config)
    space = adapter_for(model).space(model.config)
    placement = placement or dist.Placement.of(model)
    settings = dict(settings) if settings is not None else None
    result = _start(checkpoint, blocks, space, model_digest(model), settings)  # the digest: the same on every rank
    # With peers, this rank's windows accumulate into `acc` and are folded into `result` at each sync; alone,
    # `acc` IS `result` (the one-process sums stay exactly what they always were).
    acc = result if placement.world_size == 1 else CalibrationResult.empty(space)
    pending_losses: list[tuple[int, float]] = []
    with _stat_hooks(model, result, acc, on=stats):
        _pass(model, blocks, result, acc, pending_losses, placement=placement, checkpoint=checkpoint,
              checkpoint_every=checkpoint_every, progress=progress)
    if result.windows < blocks.shape[0]:
        _sync(result, acc, pending_losses, blocks.shape[0])
    _settle(result, blocks, checkpoint)
    return result


def _start(checkpoint, blocks: torch.Tensor, space: PrunableSpace, model_sha: str,
           settings: Optional[dict]) -> CalibrationResult:
    """The checkpoint's partial result, checked to be this run's (its windows the first of ``blocks``), or an
    empty one. ValueError naming every fingerprint entry that differs (the settings only when both runs recorded
    some), or when the checkpoint holds more windows than ``blocks``."""
    result = _load_checkpoint(checkpoint)
    if result is None:
        result = CalibrationResult.empty(space)
        result.model_sha, result.settings = model_sha, settings
        return result
    start, n = result.windows, blocks.shape[0]
    now = {"space": _space_entry(space), "weights": model_sha,
           "blocks": blocks_sha(blocks[:start]), "settings": settings}
    saved = {**result.fingerprint(), "space": _space_entry(result.space)}
    keys = {"space", "weights"} | ({"settings"} if settings is not None and result.settings is not None else set())
    if start <= n and not fingerprint_differences(saved, now, keys & {"settings"}, {}):
        keys.add("blocks")  # where the settings differ they explain other windows: named, not the digest's guess
    FORMAT.check_fingerprint(checkpoint, saved, now, keys=keys, labels=_LABELS)
    if start > n:
        raise ValueError(f"{checkpoint}: checkpoint has {start} windows but only {n} were given")
    return result


def _space_entry(space: PrunableSpace) -> str:
    """A space as a refused resume names it: its summary, and a digest of every size (the whole space compared,
    not printed)."""
    return f"{space!r} #{digest(json.dumps(space.as_dict()))}"


@contextmanager
def _stat_hooks(model: nn.Module, result: CalibrationResult, acc: CalibrationResult, *, on: bool) -> Iterator[None]:
    """Forward pre-hooks accumulating the activation statistics of every :data:`STAT_POINTS` input into ``acc``, in
    the layers that have the point's structure (``result`` gets empty statistics first, unless resumed with some);
    removed on exit. Nothing when not ``on``."""
    if not on:
        yield
        return
    adapter, space = adapter_for(model), result.space
    modules = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        points = adapter.mask_points(layer)
        modules.append({p: points[s][0][0] for p, s in STAT_POINTS.items() if s in space.names(i)})

    def empty_stats() -> dict[str, list[Optional[CalibrationStats]]]:
        # widths read from the module the statistics describe: o_proj's input is heads * head_dim wide,
        # which need not be the residual width
        return {p: [CalibrationStats.empty(_input_width(m[p], space.size(i, s))) if p in m else None
                    for i, m in enumerate(modules)]
                for p, s in STAT_POINTS.items() if any(p in m for m in modules)}

    if not result.stats:
        result.stats = empty_stats()
    if acc is not result:
        acc.stats = empty_stats()

    hooks = []
    for i, per_layer in enumerate(modules):
        for p, module in per_layer.items():
            def hook(mod, args, p=p, i=i):
                x = args[0].detach()
                if x.dim() in (2, 3):  # OPT runs its MLP on [tokens, d]
                    # accumulate on the activations' device: no host read per call
                    st = acc.stats[p][i] = acc.stats[p][i].to(x.device)
                    calibration_stats(x, st)
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _pass(model: nn.Module, blocks: torch.Tensor, result: CalibrationResult, acc: CalibrationResult,
          pending_losses: list, *, placement: dist.Placement, checkpoint, checkpoint_every: int,
          progress: bool) -> None:
    """The windows from ``result.windows`` on, in rounds of ``world_size`` (see :func:`run_calibration`), each
    accumulated into ``acc``; every ``checkpoint_every`` windows the ranks sync and rank 0 saves."""
    space, device, world, rank = result.space, model_device(model), placement.world_size, placement.rank
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    ones = [{s: torch.ones(adapter.score_mask_width(layers[i], space.structure(i, s)), device=device,
                           requires_grad=True) for s in names}
            for i, names in enumerate(scored(space))]
    flat = [m for layer in ones for m in layer.values()]
    n, start = blocks.shape[0], result.windows
    with frozen(model), MaskedModel(model, ones):
        bar = tqdm(desc="calibration (Fisher)", disable=not progress or rank != 0, initial=start, total=n)
        for first in range(start, n, world):  # one round: windows first .. first + world - 1
            w = first + rank
            # A sharded (FSDP) model's forward and backward are collectives: a rank without a window in the last
            # round runs one on window 0 anyway (and keeps nothing of it) so that its peers are not left waiting.
            if w >= n and placement.sharded:
                ids = blocks[:1].to(device)
                torch.autograd.grad(model(input_ids=ids, labels=ids).loss, flat)
            if w < n:
                loss = _accumulate(model, blocks[w:w + 1].to(device), flat, acc, w)
                if world == 1:
                    result.losses.append(loss)
                else:
                    pending_losses.append((w, loss))
                bar.set_postfix(loss=f"{loss:.3f}")
            done = min(first + world, n)
            bar.update(done - first)
            if world == 1:
                result.windows = done
            if checkpoint is not None and done // checkpoint_every > first // checkpoint_every:
                _sync(result, acc, pending_losses, done)
                _settle(result, blocks, checkpoint)
        bar.close()


def _accumulate(model: nn.Module, ids: torch.Tensor, flat: list[torch.Tensor], acc: CalibrationResult,
                window: int) -> float:
    """Forward and backward of one window: its squared mask gradients added to ``acc``'s scores (and the tied
    score); returns its loss. ValueError naming the window (or the layer whose activations went non-finite)."""
    loss = model(input_ids=ids, labels=ids).loss
    if not torch.isfinite(loss):
        _check_finite(acc)  # names the first layer whose activations went non-finite
        raise ValueError(f"non-finite loss on calibration window {window}: the model or its input is broken")
    grads = torch.autograd.grad(loss, flat)
    space = acc.space
    tied = torch.zeros(space.hidden, dtype=torch.float64)
    # ``flat`` is every layer's masks in the order of scored(space): the space's slots
    for (i, s), g in zip(space.slots(), grads, strict=True):
        g64 = g.detach().double().cpu()
        units = acc.scores[i][s].numel()
        # a structure scored by column (its mask one entry per column): a unit's score sums its columns'
        acc.scores[i][s] += (g64 * g64).view(units, -1).sum(1) if g64.numel() != units else g64 * g64
        if s in space.axis_names(i, HIDDEN_AXIS):
            tied += g64
    acc.tied_hidden += tied * tied
    return float(loss.detach())


def _settle(result: CalibrationResult, blocks: torch.Tensor, checkpoint) -> None:
    """``result`` made whole after a sync: statistics on the CPU, checked finite, the digest of its windows; then
    saved by rank 0 (every rank waits) when there is a ``checkpoint``."""
    _stats_to_cpu(result)
    _check_finite(result)
    result.blocks_sha = blocks_sha(blocks[:result.windows])
    if checkpoint is not None:
        _save_on_main(result, checkpoint)


def _input_width(module: nn.Module, fallback: int) -> int:
    return module.in_features if isinstance(module, nn.Linear) else fallback


def _load_checkpoint(checkpoint) -> Optional[CalibrationResult]:
    """The checkpoint as rank 0 reads it, on every rank (None when there is none); errors raise on all."""
    if checkpoint is None:
        return None
    loaded = FORMAT.read_if_present(checkpoint)
    return None if loaded is None else CalibrationResult.from_file_content(*loaded)


def _save_on_main(result: CalibrationResult, checkpoint) -> None:
    if dist.is_main():
        result.save(checkpoint)
    dist.barrier()  # nobody runs ahead (and may fail) before the reduced rounds are on disk


def _stats_to_cpu(result: CalibrationResult) -> None:
    """Moves the activation statistics (accumulated on the activations' device) to the CPU, once per sync."""
    result.stats = {p: [None if st is None else st.to("cpu") for st in per_layer]
                    for p, per_layer in result.stats.items()}


def _sync(result: CalibrationResult, acc: CalibrationResult, pending_losses: list, done: int) -> None:
    """Folds every rank's partial sums ``acc`` (reset afterwards) into ``result``, which then covers windows
    ``[0, done)`` on every rank. Alone, ``acc`` is ``result`` and nothing needs folding."""
    _stats_to_cpu(acc)  # every rank reduces CPU tensors of the same layout
    if acc is result:
        result.windows = done
        return
    # every rank has the same space, so the same layers hold statistics (None elsewhere) and the lists align
    stats = [st for point in STAT_POINTS for st in acc.stats.get(point, []) if st is not None]
    tensors = [t for layer in acc.scores for t in layer.values()] + [acc.tied_hidden]
    for st in stats:
        tensors += [st.sum, st.sumsq] + ([st.gram] if st.gram is not None else [])
    counts = torch.tensor([st.count for st in stats], dtype=torch.int64)
    dist.all_reduce_sum_(tensors + [counts])
    for mine, theirs in zip(result.scores, acc.scores):
        for s in mine:
            mine[s] += theirs[s]
            theirs[s].zero_()
    result.tied_hidden += acc.tied_hidden
    acc.tied_hidden.zero_()
    totals = [st for point in STAT_POINTS for st in result.stats.get(point, []) if st is not None]
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
    for i in range(result.space.num_layers):
        for p in (p for p in STAT_POINTS if p in result.stats):
            st = result.stats[p][i]
            if st is not None and not (torch.isfinite(st.sum).all() and torch.isfinite(st.sumsq).all()):
                raise ValueError(f"non-finite calibration activations at layer {i} ({p}): NaN/inf in the model's "
                                 "activations (check the weights / dtype; fp16 may overflow)")
    for i, layer in enumerate(result.scores):
        for s, t in layer.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"non-finite Fisher scores at layer {i} {s}")
