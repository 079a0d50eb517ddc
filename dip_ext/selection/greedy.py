"""Greedy budgeted selection: drop the dimensions that cost the least loss per parameter saved.

Units are prunable dimensions with a score (estimated loss increase if dropped). Every unit belongs to a group;
a group drives one or more (layer, set) slots whose widths shrink by one when one of its units is dropped:
DISP uses one group per slot (every set independent); the dimension-dependent baseline ties every hidden-width
set of every layer to one group. The parameter count is a polynomial in the slot widths (Budget.kept_linear),
so the parameters one unit pays for change as widths shrink: costs are recomputed (by autograd) every chunk.
"""

from __future__ import annotations

import torch

from ..masks import STRUCTURES, DispMasks, ModelDims
from .budget import Budget


class GroupSpace:
    """Slots (layer, set) and groups of slots; ``incidence[g, k]`` = 1 if group g drives slot k."""

    def __init__(self, dims: ModelDims, groups: list[list[tuple[int, str]]]):
        self.dims = dims
        self.slots = [(i, s) for i in range(dims.num_layers) for s in STRUCTURES]
        pos = {slot: k for k, slot in enumerate(self.slots)}
        self.incidence = torch.zeros(len(groups), len(self.slots), dtype=torch.float64)
        for g, members in enumerate(groups):
            for slot in members:
                self.incidence[g, pos[slot]] = 1
        if not torch.all(self.incidence.sum(0) == 1):
            raise ValueError("every (layer, set) slot must belong to exactly one group")
        self.groups = groups

    def widths(self, slot_widths: torch.Tensor) -> list[dict]:
        """Per-layer dicts of slot widths (tensor entries keep autograd)."""
        n = len(STRUCTURES)
        return [{s: slot_widths[i * n + j] for j, s in enumerate(STRUCTURES)} for i in range(self.dims.num_layers)]


def _slot_costs(space: GroupSpace, budget: Budget, slot_widths: torch.Tensor) -> tuple[torch.Tensor, float]:
    w = slot_widths.clone().requires_grad_(True)
    kept = budget.kept_linear(space.widths(w))
    (grad,) = torch.autograd.grad(kept, w)
    return grad.detach(), float(kept.detach())


def greedy_select(space: GroupSpace, budget: Budget, unit_group: torch.Tensor, unit_index: torch.Tensor,
                  unit_score: torch.Tensor, multiple_of: int = 1) -> DispMasks:
    """Drops units until ``budget`` is met; returns the kept index sets.

    ``unit_group[u]`` (int64) is the group of unit u, ``unit_index[u]`` the dimension it is within its slots,
    ``unit_score[u]`` (float64) its loss-increase estimate. With ``multiple_of`` > 1 every group keeps a
    multiple of that many units: widths are rounded down, then whole chunks of units are added back by best
    score per parameter while the budget allows.
    """
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    n_groups = space.incidence.shape[0]
    group_size = torch.bincount(unit_group, minlength=n_groups).double()
    alive = torch.ones(unit_score.numel(), dtype=torch.bool)
    target = budget.target_linear

    def slot_widths(counts: torch.Tensor) -> torch.Tensor:
        return counts @ space.incidence

    counts = group_size.clone()
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

    # round widths down to multiples, then give back whole chunks (single units when multiple_of is 1: the
    # last dropped chunk may have overshot) while the budget allows
    alive = _round_to_multiple(space, budget, unit_group, unit_score, alive, multiple_of, target)

    return _to_masks(space, unit_group, unit_index, alive)


def _round_to_multiple(space, budget, unit_group, unit_score, alive, m, target):
    n_groups = space.incidence.shape[0]
    order = torch.argsort(unit_score, descending=True, stable=True)
    ranked = [order[unit_group[order] == g] for g in range(n_groups)]  # best first inside each group
    sizes = torch.bincount(unit_group, minlength=n_groups)
    counts = (torch.bincount(unit_group[alive], minlength=n_groups) // m) * m
    blocked = torch.zeros(n_groups, dtype=torch.bool)
    while True:  # add back whole chunks of m units, best score per parameter first, while the budget allows
        costs, kept = _slot_costs(space, budget, counts.double() @ space.incidence)
        group_cost = (space.incidence @ costs).clamp_min(1e-9)
        gains = torch.full((n_groups,), -1.0, dtype=torch.float64)
        for g in range(n_groups):
            add = min(m, int(sizes[g] - counts[g]))
            if add > 0 and not blocked[g]:
                gains[g] = float(unit_score[ranked[g][counts[g]:counts[g] + add]].sum()) / (group_cost[g] * add)
        g = int(torch.argmax(gains))
        if gains[g] < 0:
            break
        trial = counts.clone()
        trial[g] += min(m, int(sizes[g] - counts[g]))
        if float(budget.kept_linear(space.widths(trial.double() @ space.incidence))) > target:
            blocked[g] = True  # this chunk does not fit; smaller chunks of other groups still may
            continue
        counts = trial
    out = torch.zeros_like(alive)
    for g in range(n_groups):
        out[ranked[g][:counts[g]]] = True
    return out


def _to_masks(space: GroupSpace, unit_group, unit_index, alive) -> DispMasks:
    layers = [{} for _ in range(space.dims.num_layers)]
    for g, members in enumerate(space.groups):
        kept = torch.sort(unit_index[alive & (unit_group == g)]).values
        for i, s in members:
            layers[i][s] = kept
    return DispMasks(layers)
