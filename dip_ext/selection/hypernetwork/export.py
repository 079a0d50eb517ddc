"""Deterministic masks from hypernetwork logits that meet a parameter budget (never samples noise).

Every prunable dimension is ranked by its score ``logit + offset`` (descending; ties by slot order, then index)
and the longest prefix of that ranking whose kept decoder-linear parameters fit the budget is kept: one global
threshold on the score, placed so the export meets the target to within the next dimension (near 0 once
training has converged). DESIGN.md §1: the official export adds Gumbel noise; this one is deterministic.
With ``multiple_of > 1`` the prefix's widths are rounded by :func:`dip_ext.selection.budget.fit_multiple`
(the one rounding policy: down to multiples, then whole chunks added back while any fits), chunks preferred by
the mean score of the dimensions they add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ...masks import STRUCTURES, DispMasks
from ..budget import Budget, fit_multiple
from ..slots import flatten, per_layer

__all__ = ["ExportInfo", "export_masks"]


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export_masks` did: kept / target decoder-linear parameters and ratios, the score threshold
    between the last kept and the first dropped dimension of the ranking, how many dimensions that prefix holds
    (of ``total_dims``; ``dims_above_zero`` score above 0) and the ``multiple_of`` the widths were rounded to."""

    kept_decoder_linear: int
    target_decoder_linear: int
    kept_ratio: float
    target_ratio: float
    threshold: float
    kept_dims: int
    total_dims: int
    dims_above_zero: int
    multiple_of: int


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

    ``logits[i][s]``: a 1-D float tensor of structure ``s``'s full width (any device). The kept count is at
    most ``budget.target_linear``; with ``multiple_of == 1`` adding the next-ranked dimension would exceed it,
    with ``multiple_of > 1`` adding any set's next chunk would.
    Within a set the highest-scoring dims are kept. A block whose output set is empty keeps no inputs either.
    ValueError for NaN / inf logits (training diverged), a bad ``multiple_of``, ``offset`` or ``budget``.
    """
    _check(logits, budget, offset, multiple_of)
    layers = [{s: layer[s].detach().float().cpu().reshape(-1) for s in STRUCTURES} for layer in logits]
    num_layers = len(layers)
    sizes = torch.tensor([layer[s].numel() for layer in layers for s in STRUCTURES], dtype=torch.int64)
    scores = flatten(layers) + offset
    if not torch.isfinite(scores).all():
        raise ValueError("mask logits contain NaN or inf (training diverged?)")
    groups = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    order = torch.sort(scores, descending=True, stable=True).indices

    def widths_at(k: int) -> torch.Tensor:
        return torch.bincount(groups[order[:k]], minlength=sizes.numel())

    def as_layers(w: torch.Tensor) -> list[dict]:
        return per_layer(w.tolist(), num_layers)

    def kept(k: int) -> int:
        return int(budget.kept_linear(as_layers(widths_at(k))))

    lo, hi = 0, scores.numel()  # invariant: kept(lo) <= target (or lo == 0), kept(hi + 1) > target
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
    if multiple_of > 1:  # at 1 the export stays one global threshold: no single dims added past the prefix
        widths = fit_multiple(budget, as_layers, widths, sizes, multiple_of, mean_gain)
    out = []
    for g, (r, w) in enumerate(zip(ranked, widths.tolist())):
        if g % len(STRUCTURES) == 0:
            out.append({})
        out[-1][STRUCTURES[g % len(STRUCTURES)]] = r.indices[:w].sort().values
    for layer in out:
        # A block whose output set is empty contributes nothing: its input sets are moot (and counted as 0).
        if layer["attn_out"].numel() == 0:
            layer["attn_in"] = layer["attn_in"][:0]
        if layer["mlp_out"].numel() == 0:
            layer["mlp_in"], layer["mlp_mid"] = layer["mlp_in"][:0], layer["mlp_mid"][:0]
    masks = DispMasks(out)
    kept_linear = int(budget.kept_linear(masks.widths()))
    last = float(scores[order[k - 1]]) if k > 0 else float("inf")
    nxt = float(scores[order[k]]) if k < scores.numel() else float("-inf")
    threshold = (last + nxt) / 2 if math.isfinite(last + nxt) else (nxt if k == 0 else last)
    return masks, ExportInfo(kept_linear, budget.target_linear, kept_linear / budget.dense_linear,
                             budget.target_ratio, threshold, k, int(scores.numel()), int((scores > 0).sum()),
                             multiple_of)
