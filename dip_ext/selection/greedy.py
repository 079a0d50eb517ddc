"""Greedy budgeted selection: drop the dimensions that cost the least loss per parameter saved.

Units are prunable dimensions with a score (estimated loss increase if dropped). Every unit belongs to a group;
a group drives one or more (layer, set) slots (:mod:`dip_ext.selection.slots`) whose widths shrink by one when
one of its units is dropped: DISP uses one group per slot (every set independent); the dimension-dependent
baseline ties every hidden-width set of every layer to one group. The parameter count is a polynomial in the
slot widths (:meth:`Budget.kept_linear`), so the parameters one unit pays for change as widths shrink: costs are
recomputed (by autograd) every chunk. Widths are rounded to ``multiple_of`` by
:func:`dip_ext.selection.budget.fit_multiple` (the one rounding policy).
"""

from __future__ import annotations

import torch

from typing import Optional

from ..masks import KV_GROUPS, DispMasks, ModelDims, as_space
from ..space import PrunableSpace
from .budget import Budget, fit_multiple, unit_step
from .slots import per_layer

__all__ = ["GroupSpace", "greedy_select"]


class GroupSpace:
    """Slots (layer, set) and groups of slots; ``incidence[g, k]`` = 1 if group g drives slot k (float64).

    ``space``: the structures pruned (e.g. ``Budget.space``; a :class:`~dip_ext.masks.ModelDims` stands for the
    built-in sets without KV groups). Every member of a group must be a slot of it; a group is whole-unit (rounded
    singly) when its structures are."""

    def __init__(self, space: PrunableSpace | ModelDims, groups: list[list[tuple[int, str]]]):
        space = space.space().required() if isinstance(space, ModelDims) else as_space(space)
        self.space = space
        self.slots = space.slots()
        pos = {slot: k for k, slot in enumerate(self.slots)}
        self.incidence = torch.zeros(len(groups), len(self.slots), dtype=torch.float64)
        for g, members in enumerate(groups):
            for slot in members:
                if slot not in pos:
                    raise ValueError(f"group {g} names {slot}, not a (layer, structure) slot of {space}")
                self.incidence[g, pos[slot]] = 1
        if not torch.all(self.incidence.sum(0) == 1):
            raise ValueError("every (layer, set) slot must belong to exactly one group")
        self.groups = groups

    def widths(self, slot_widths: torch.Tensor) -> list[dict]:
        """Per-layer dicts of slot widths (tensor entries keep autograd)."""
        return per_layer(slot_widths, self.space)

    def group_widths(self, counts: torch.Tensor) -> list[dict]:
        """Per-layer slot widths (float64 0-d tensors) when group g keeps ``counts[g]`` units."""
        return self.widths(counts.double() @ self.incidence)


def _slot_costs(space: GroupSpace, budget: Budget, slot_widths: torch.Tensor) -> tuple[torch.Tensor, float]:
    w = slot_widths.clone().requires_grad_(True)
    kept = budget.kept_linear(space.widths(w))
    (grad,) = torch.autograd.grad(kept, w)
    return grad.detach(), float(kept.detach())


def greedy_select(space: GroupSpace, budget: Budget, unit_group: torch.Tensor, unit_index: torch.Tensor,
                  unit_score: torch.Tensor, multiple_of: int = 1,
                  dropped: Optional[torch.Tensor] = None) -> DispMasks:
    """Drops units until ``budget`` is met; returns the kept index sets.

    ``unit_group[u]`` (int64) is the group of unit u, ``unit_index[u]`` the dimension it is within its slots,
    ``unit_score[u]`` (float64) its loss-increase estimate. Chunks of units with the lowest score per parameter
    are dropped until the budget is met; then :func:`~dip_ext.selection.budget.fit_multiple` rounds the group
    widths down to multiples of ``multiple_of`` and gives back whole chunks (single units when it is 1: the
    last dropped chunk may have overshot) by best score per parameter while the budget allows. Every group
    keeps its best-scoring units. ``dropped`` (bool, one per unit): units dropped before the greedy starts
    (a KV-cache target's groups); the groups of ``kv_groups`` slots are then never raised again. Groups of
    whole-unit structures (KV groups, experts) are rounded singly, KV groups to ``budget.heads_multiple_of``
    (``multiple_of`` does not apply to them).
    ValueError for mismatched unit tensors or
    ``multiple_of`` < 1.
    """
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an integer >= 1, got {multiple_of!r}")
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a Budget, got {type(budget).__name__}")
    n = unit_score.numel()
    if unit_group.shape != (n,) or unit_index.shape != (n,) or unit_score.dim() != 1:
        raise ValueError("unit_group, unit_index and unit_score must be 1-D tensors of one length")
    n_groups = space.incidence.shape[0]
    alive = torch.ones(unit_score.numel(), dtype=torch.bool)
    if dropped is not None:
        alive &= ~dropped
    target = budget.target_linear

    def slot_widths(counts: torch.Tensor) -> torch.Tensor:
        return counts @ space.incidence

    counts = torch.bincount(unit_group[alive], minlength=n_groups).double()
    costs, kept = _slot_costs(space, budget, slot_widths(counts))
    while kept > target:
        group_cost = (space.incidence @ costs).clamp_min(1e-9)
        ratio = unit_score / group_cost[unit_group]
        ratio[~alive] = float("inf")
        # drop a chunk sized to about a quarter of the remaining excess (at least one unit)
        mean_cost = float(group_cost[unit_group[alive]].mean())
        chunk = max(1, min(int(alive.sum()) - 1, int((kept - target) / max(mean_cost, 1.0) / 4)))
        drop = torch.topk(ratio, chunk, largest=False).indices
        alive[drop] = False
        counts -= torch.bincount(unit_group[drop], minlength=n_groups).double()
        costs, kept = _slot_costs(space, budget, slot_widths(counts))
        if not alive.any():
            break

    order = torch.argsort(unit_score, descending=True, stable=True)
    ranked = [order[unit_group[order] == g] for g in range(n_groups)]  # best first inside each group
    sizes = torch.bincount(unit_group, minlength=n_groups)

    def gain(counts: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """Score per parameter of each group's next ``add`` units (the costs at the current widths)."""
        costs, _ = _slot_costs(space, budget, counts.double() @ space.incidence)
        group_cost = (space.incidence @ costs).clamp_min(1e-9)
        out = torch.full((n_groups,), -1.0, dtype=torch.float64)
        for g in range(n_groups):
            a = int(add[g])
            if a > 0:
                out[g] = float(unit_score[ranked[g][counts[g]:counts[g] + a]].sum()) / (group_cost[g] * a)
        return out

    # the one rounding policy; with multiple_of 1 it gives back the single units the last chunk overshot by
    counts = torch.bincount(unit_group[alive], minlength=n_groups)
    heads = torch.tensor([any(s == KV_GROUPS for _, s in members) for members in space.groups])
    steps = torch.tensor([unit_step(space.space.structure(*members[0]), multiple_of, budget.heads_multiple_of)
                          for members in space.groups], dtype=torch.int64)
    limit = torch.where(heads, counts, sizes) if dropped is not None else sizes
    counts = fit_multiple(budget, space.group_widths, counts, sizes, steps, gain, limit=limit)
    return _to_masks(space, unit_index, ranked, counts)


def _to_masks(space: GroupSpace, unit_index, ranked, counts) -> DispMasks:
    layers = [{} for _ in range(space.space.num_layers)]
    for g, members in enumerate(space.groups):
        kept = torch.sort(unit_index[ranked[g][:counts[g]]]).values
        for i, s in members:
            layers[i][s] = kept
    return DispMasks(layers)
