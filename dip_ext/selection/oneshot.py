"""One-shot selection from calibration scores: DISP (independent sets) and the dimension-dependent baseline."""

from __future__ import annotations

import time

import torch

from ..calibration import HIDDEN, CalibrationResult
from ..masks import STRUCTURES, DispMasks
from .base import SelectionInputs, SelectionResult
from .budget import Budget
from .greedy import GroupSpace, greedy_select


def oneshot_masks(calib: CalibrationResult, budget: Budget, multiple_of: int = 1) -> DispMasks:
    """DISP one-shot: every (layer, set) chooses its own dimensions by Fisher score per parameter saved."""
    dims = calib.dims
    groups = [[(i, s)] for i in range(dims.num_layers) for s in STRUCTURES]
    unit_group, unit_index, unit_score = [], [], []
    for g, [(i, s)] in enumerate(groups):
        score = calib.scores[i][s]
        unit_group.append(torch.full((score.numel(),), g, dtype=torch.long))
        unit_index.append(torch.arange(score.numel()))
        unit_score.append(score)
    return greedy_select(GroupSpace(dims, groups), budget, torch.cat(unit_group), torch.cat(unit_index),
                         torch.cat(unit_score).double(), multiple_of)


def dependent_masks(calib: CalibrationResult, budget: Budget, multiple_of: int = 1) -> DispMasks:
    """Dimension-dependent baseline: ONE embedding subset shared by every block's input and output (what
    regular structured pruning does to the residual stream), with a per-layer choice of MLP channels."""
    dims = calib.dims
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


class OneShot:
    """DISP one-shot selection (:func:`oneshot_masks`): Fisher scores, one global budget, no training."""

    name = "oneshot"
    options_class = None

    def uses_validation(self, options) -> bool:
        return False

    def select(self, inputs: SelectionInputs, options=None) -> SelectionResult:
        t0 = time.perf_counter()
        masks = oneshot_masks(inputs.calibration, inputs.budget, inputs.multiple_of)
        return SelectionResult(self.name, masks, seconds=time.perf_counter() - t0)


class Dependent:
    """The dimension-dependent baseline (:func:`dependent_masks`): one embedding subset shared by every block."""

    name = "dependent"
    options_class = None

    def uses_validation(self, options) -> bool:
        return False

    def select(self, inputs: SelectionInputs, options=None) -> SelectionResult:
        t0 = time.perf_counter()
        masks = dependent_masks(inputs.calibration, inputs.budget, inputs.multiple_of)
        return SelectionResult(self.name, masks, seconds=time.perf_counter() - t0)
