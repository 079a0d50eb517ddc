"""One-shot selection from calibration scores: DISP (independent sets) and the dimension-dependent baseline."""

from __future__ import annotations

import time

import torch

from ..calibration import HIDDEN, CalibrationResult
from ..masks import KV_GROUPS, DispMasks, uniform_dims
from .base import SelectionInputs, SelectionResult
from .budget import Budget
from .kv_target import kv_target_drops
from .greedy import GroupSpace, greedy_select


def oneshot_masks(calib: CalibrationResult, budget: Budget, multiple_of: int = 1) -> DispMasks:
    """DISP one-shot: every (layer, set) chooses its own dimensions by Fisher score per parameter saved
    (:func:`~dip_ext.selection.greedy.greedy_select`; widths rounded by the one budget fitter).

    With ``budget.heads`` every layer's KV groups compete too (a group's score: the Fisher score of its mask on
    its query heads' outputs); with a KV-cache target (``budget.kv_groups_kept``) the groups of lowest score are
    dropped first until at most that many are kept (every group caches the same bytes per token), on the step of
    ``budget.heads_multiple_of`` (:func:`~dip_ext.selection.kv_target.kv_target_drops`), then the parameter budget is
    met as without it. ValueError when the calibration has no group scores."""
    space = budget.space
    if budget.heads and not any(KV_GROUPS in layer for layer in calib.scores):
        raise ValueError("pruning KV groups needs their calibration scores, and this calibration has none (a "
                         "family without KV groups, or a calibration file of an older dip_ext: run it again)")
    missing = [(i, s) for i, s in space.slots() if i >= len(calib.scores) or s not in calib.scores[i]]
    if missing:
        raise ValueError(f"the calibration has no scores for {missing[0]} (of another model, or of an older "
                         "dip_ext: run it again)")
    groups = [[slot] for slot in space.slots()]
    unit_group, unit_index, unit_score = [], [], []
    for g, [(i, s)] in enumerate(groups):
        score = calib.scores[i][s]
        unit_group.append(torch.full((score.numel(),), g, dtype=torch.long))
        unit_index.append(torch.arange(score.numel()))
        unit_score.append(score)
    unit_group, unit_index, unit_score = torch.cat(unit_group), torch.cat(unit_index), torch.cat(unit_score).double()
    dropped = None
    if budget.kv_groups_kept is not None:  # one group per slot here: a unit's group is its slot
        kv_slots = torch.tensor([s == KV_GROUPS for _, s in space.slots()])
        dropped = kv_target_drops(unit_score, unit_group, kv_slots, budget.kv_groups_kept, budget.heads_multiple_of)
    return greedy_select(GroupSpace(space, groups), budget, unit_group, unit_index, unit_score,
                         multiple_of, dropped=dropped)


def dependent_masks(calib: CalibrationResult, budget: Budget, multiple_of: int = 1) -> DispMasks:
    """Dimension-dependent baseline: ONE embedding subset shared by every block's input and output (what
    regular structured pruning does to the residual stream), with a per-layer choice of MLP channels. Scores:
    ``calib.tied_hidden`` for the shared subset, ``calib.scores[i]["mlp_mid"]`` per layer."""
    if budget.heads:
        raise ValueError("the dimension-dependent baseline (--method dependent) does not prune KV groups: drop "
                         "--prune-heads / --kv-ratio, or use --method oneshot")
    dims = uniform_dims(budget.space)
    if dims is None:
        raise ValueError("the dimension-dependent baseline (--method dependent) needs the five DISP sets in every "
                         "layer; this model's family declares a space of its own: use --method oneshot")
    groups = [[(i, s) for i in range(dims.num_layers) for s in HIDDEN]]
    groups += [[(i, "mlp_mid")] for i in range(dims.num_layers)]
    unit_group = [torch.zeros(dims.hidden, dtype=torch.long)]
    unit_index = [torch.arange(dims.hidden)]
    unit_score = [calib.tied_hidden]
    for i in range(dims.num_layers):
        unit_group.append(torch.full((dims.ffn,), 1 + i, dtype=torch.long))
        unit_index.append(torch.arange(dims.ffn))
        unit_score.append(calib.scores[i]["mlp_mid"])
    return greedy_select(GroupSpace(dims, groups), budget, torch.cat(unit_group), torch.cat(unit_index),
                         torch.cat(unit_score).double(), multiple_of)


class _FromScores:
    """A method that picks masks from the calibration scores alone (no training, no options)."""

    name = ""
    options_class = None
    pick = staticmethod(oneshot_masks)
    prunes_heads = False

    def uses_validation(self, options) -> bool:
        return False

    def select(self, inputs: SelectionInputs, options=None) -> SelectionResult:
        if not isinstance(inputs, SelectionInputs):
            raise ValueError(f"inputs must be SelectionInputs, got {type(inputs).__name__}")
        if options is not None:
            raise ValueError(f"method {self.name!r} has no options, got {type(options).__name__}")
        t0 = time.perf_counter()
        masks = self.pick(inputs.calibration, inputs.budget, inputs.multiple_of)
        return SelectionResult(self.name, masks, seconds=time.perf_counter() - t0)


class OneShot(_FromScores):
    """DISP one-shot selection (:func:`oneshot_masks`): Fisher scores, one global budget, no training."""

    name = "oneshot"
    pick = staticmethod(oneshot_masks)
    prunes_heads = True


class Dependent(_FromScores):
    """The dimension-dependent baseline (:func:`dependent_masks`): one embedding subset shared by every block."""

    name = "dependent"
    pick = staticmethod(dependent_masks)
