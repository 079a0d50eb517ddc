"""Learned DISP masks: the paper's hypernetwork (Gao et al., NeurIPS 2024), trained against a frozen model.

Modules, one job each: :mod:`.network` (the hypernetwork), :mod:`.export` (deterministic masks meeting the
budget), :mod:`.losses` (one step's losses, gradient averaging across ranks), :mod:`.schedule` (learning rates
and which checkpoints a schedule may continue), :mod:`.validation` (early stopping's score), :mod:`.checkpoint`
(format and fingerprint), :mod:`.trainer` (:class:`Trainer`), :mod:`.config` (:class:`HypernetworkConfig`) and
:mod:`.method` (the registered :class:`Hypernetwork` method). The data order, optimizer state, best-state
tracking and checkpoint file mechanics are the training kit's (:mod:`dip_ext.training`). With a budget that prunes
KV groups (``Budget.for_model(..., heads=True)`` or ``kv_ratio=``) the network has a ``kv_groups`` head per layer
and the losses and the export count the groups (and meet the KV-cache target).
"""

from __future__ import annotations

from .checkpoint import CHECKPOINT_NAME, read_checkpoint
from .config import HypernetworkConfig
from .export import ExportInfo, export_masks
from .method import Hypernetwork
from .network import HyperNetwork
from .schedule import LR_SCHEDULES, LrSchedule, check_lr_schedule, scheduled_lr
from .trainer import StepLog, Trainer

__all__ = ["Trainer", "StepLog", "HypernetworkConfig", "Hypernetwork", "HyperNetwork", "export_masks", "ExportInfo",
           "CHECKPOINT_NAME", "read_checkpoint", "LR_SCHEDULES", "LrSchedule", "check_lr_schedule",
           "scheduled_lr"]
