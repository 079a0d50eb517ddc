"""Deterministic masks from hypernetwork logits that meet a parameter budget (never samples noise).

Every prunable dimension is ranked by its score ``logit + offset`` (descending; ties by slot order, then index)
and the longest prefix of that ranking whose kept decoder-linear parameters fit the budget is kept: one global
threshold on the score, placed so the export meets the target to within the next dimension (near 0 once
training has converged). DESIGN.md §1: the official export adds Gumbel noise; this one is deterministic.
With ``multiple_of > 1`` the prefix's widths are rounded by :func:`dip_ext.selection.budget.fit_multiple`
(the one rounding policy: down to multiples, then whole chunks added back while any fits), chunks preferred by
the mean score of the dimensions they add.

KV groups (``budget.heads``): the logits hold each layer's ``kv_groups`` too, and a group is one more unit of the
ranking (its parameters: its query heads' and KV head's rows and o_proj columns). With a KV-cache target
(``budget.kv_groups_kept``) the groups of lowest score are dropped first until at most that many are kept, on the
step of ``budget.heads_multiple_of`` (:func:`~dip_ext.selection.kv_target.kv_target_drops`, as one-shot does), and the
parameter threshold is then placed among the remaining dimensions; the rounding to ``multiple_of`` never applies to
whole-unit structures (KV groups, experts: they are raised singly, KV groups in steps of
``budget.heads_multiple_of`` and never past what the KV target left). A layer keeping no group keeps no attention,
and an attention without output keeps no group. The slots, their widths and their steps are those of
``budget.space`` (its layers may hold different structures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ...masks import KV_GROUPS, DispMasks
from ..budget import Budget, fit_multiple, unit_steps
from ..kv_target import kv_target_drops
from ..slots import per_layer

__all__ = ["ExportInfo", "export_masks"]


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export_masks` did: kept / target decoder-linear parameters and ratios, the score threshold
    between the last kept and the first dropped dimension of the ranking, how many dimensions that prefix holds
    (of ``total_dims``; ``dims_above_zero`` score above 0) and the ``multiple_of`` the widths were rounded to.
    With ``budget.heads``: ``kept_kv_groups`` (over all layers; None otherwise) and ``target_kv_groups`` (the KV
    target's most groups kept; None without one)."""

    kept_decoder_linear: int
    target_decoder_linear: int
    kept_ratio: float
    target_ratio: float
    threshold: float
    kept_dims: int
    total_dims: int
    dims_above_zero: int
    multiple_of: int
    kept_kv_groups: Optional[int] = None
    target_kv_groups: Optional[int] = None


def _check(logits, budget, offset, multiple_of) -> None:
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a Budget, got {type(budget).__name__}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an integer >= 1, got {multiple_of!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if not isinstance(logits, Sequence) or len(logits) == 0:
        raise ValueError("logits must be a non-empty list of per-layer {structure: tensor} dicts")


@torch.no_grad()
def export_masks(logits: Sequence[dict[str, torch.Tensor]], budget: Budget, *, offset: float = 3.0,
                 multiple_of: int = 1) -> tuple[DispMasks, ExportInfo]:
    """DispMasks from mask logits that meet ``budget`` (see the module docstring).

    ``logits[i][s]``: a 1-D float tensor of the full width of layer ``i``'s structure ``s`` (any device), for every
    slot of ``budget.space`` (``kv_groups`` too with ``budget.heads``; other entries are ignored). The kept count
    is at most ``budget.target_linear``; with ``multiple_of == 1`` adding the next-ranked dimension would exceed
    it, with ``multiple_of > 1`` adding any set's next chunk would (whole-unit structures, KV groups, are raised
    singly, or ``budget.heads_multiple_of`` at a time). With a KV-cache target at most ``budget.kv_groups_kept``
    groups are kept.
    Within a set the highest-scoring dims are kept. A block whose output set is empty keeps no inputs either.
    ValueError for NaN / inf logits (training diverged), a missing entry (``kv_groups`` logits for a budget with
    heads) or one of another width, the wrong number of layers, a bad ``multiple_of``, ``offset`` or ``budget``.
    """
    _check(logits, budget, offset, multiple_of)
    space = budget.space
    if len(logits) != space.num_layers:
        raise ValueError(f"logits have {len(logits)} layers but the budget's model has {space.num_layers}")
    if budget.heads and not any(KV_GROUPS in layer for layer in logits):
        raise ValueError("the budget prunes KV groups but the logits have no kv_groups entry (a hypernetwork "
                         "without heads=True?)")
    slots = space.slots()
    sizes = space.slot_sizes()
    parts = []
    for (i, s), n in zip(slots, sizes.tolist()):
        if s not in logits[i]:
            raise ValueError(f"logits[{i}] has no {s!r} entry (the budget prunes {list(space.names(i))} there)")
        part = logits[i][s].detach().float().cpu().reshape(-1)
        if part.numel() != n:
            raise ValueError(f"logits[{i}][{s!r}] has {part.numel()} entries, the structure's width is {n}")
        parts.append(part)
    scores = torch.cat(parts) + offset
    if not torch.isfinite(scores).all():
        raise ValueError("mask logits contain NaN or inf (training diverged?)")
    groups = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    order = torch.sort(scores, descending=True, stable=True).indices
    is_kv = torch.tensor([s == KV_GROUPS for _, s in slots])  # per slot
    kv_cap = budget.kv_groups_kept
    if kv_cap is not None:
        # The KV-cache target first: the lowest-scoring groups are dropped (never kept below), on the step.
        eligible = ~kv_target_drops(scores, groups, is_kv, kv_cap, budget.heads_multiple_of)
        order = order[eligible[order]]

    def widths_at(k: int) -> torch.Tensor:
        return torch.bincount(groups[order[:k]], minlength=sizes.numel())

    def as_layers(w: torch.Tensor) -> list[dict]:
        return per_layer(w.tolist(), space)

    def kept(k: int) -> int:
        return int(budget.kept_linear(as_layers(widths_at(k))))

    lo, hi = 0, order.numel()  # invariant: kept(lo) <= target (or lo == 0), kept(hi + 1) > target
    if kept(hi) <= budget.target_linear:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kept(mid) <= budget.target_linear:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    ranked = [torch.sort(part, descending=True, stable=True) for part in torch.split(scores, sizes.tolist())]

    def mean_gain(counts: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        return torch.tensor([float(r.values[c:c + a].mean()) if a > 0 else -math.inf
                             for r, c, a in zip(ranked, counts.tolist(), add.tolist())], dtype=torch.float64)

    widths = widths_at(k)
    if multiple_of > 1 or (budget.heads and budget.heads_multiple_of > 1):
        # (with both steps 1 the export stays one global threshold: no single dims added past the prefix)
        # KV groups step by heads_multiple_of and, under a KV target, are never raised past the prefix.
        limit = torch.where(is_kv, widths, sizes) if kv_cap is not None else sizes
        widths = fit_multiple(budget, as_layers, widths, sizes,
                              unit_steps(space, multiple_of, budget.heads_multiple_of), mean_gain, limit=limit)
    out = [{} for _ in range(space.num_layers)]
    for (i, s), r, w in zip(slots, ranked, widths.tolist()):
        out[i][s] = r.indices[:w].sort().values
    for layer in out:
        _drop_moot(layer)
    masks = DispMasks(out)
    kept_linear = int(budget.kept_linear(masks.widths()))
    last = float(scores[order[k - 1]]) if k > 0 else float("inf")
    nxt = float(scores[order[k]]) if k < order.numel() else float("-inf")
    threshold = (last + nxt) / 2 if math.isfinite(last + nxt) else (nxt if k == 0 else last)
    kept_kv = sum(int(layer[KV_GROUPS].numel()) for layer in masks.layers if KV_GROUPS in layer) \
        if budget.heads else None
    return masks, ExportInfo(kept_linear, budget.target_linear, kept_linear / budget.dense_linear,
                             budget.target_ratio, threshold, k, int(scores.numel()), int((scores > 0).sum()),
                             multiple_of, kept_kv, kv_cap)


def _drop_moot(layer: dict[str, torch.Tensor]) -> None:
    """Empties, in place, the sets of a block whose output set is empty: it contributes nothing, so its input
    sets are moot (and counted as 0). Only the sets the layer holds are touched (a layer may lack a block)."""
    def empty(*names):
        for s in names:
            if s in layer:
                layer[s] = layer[s][:0]

    if KV_GROUPS in layer and layer[KV_GROUPS].numel() == 0:
        empty("attn_out")  # no head left: the attention is removed
    if "attn_out" in layer and layer["attn_out"].numel() == 0:
        empty("attn_in", KV_GROUPS)
    if "mlp_out" in layer and layer["mlp_out"].numel() == 0:
        empty("mlp_in", "mlp_mid")
