"""Learned DISP masks: the paper's hypernetwork (Gao et al., NeurIPS 2024), trained against a frozen model.

Modules, one job each: :mod:`.network` (the hypernetwork), :mod:`.export` (deterministic masks meeting the
budget), :mod:`.losses` (one step's losses, gradient averaging across ranks), :mod:`.schedule` (learning rates
and which checkpoints a schedule may continue), :mod:`.batches` (data order), :mod:`.validation` (early
stopping), :mod:`.checkpoint` (format and fingerprint), :mod:`.trainer` (:class:`Trainer`), :mod:`.config`
(:class:`HypernetworkConfig`) and :mod:`.method` (the registered :class:`Hypernetwork` method).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ...masks import DispMasks
from ..budget import Budget
from .checkpoint import CHECKPOINT_NAME, read_checkpoint, weights_digest
from .config import HypernetworkConfig
from .export import ExportInfo, export_masks
from .method import Hypernetwork
from .network import HyperNetwork
from .schedule import LR_SCHEDULES, LrSchedule, check_lr_schedule, scheduled_lr
from .trainer import StepLog, Trainer

__all__ = ["Trainer", "StepLog", "HypernetworkConfig", "Hypernetwork", "HyperNetwork", "export_masks", "ExportInfo",
           "CHECKPOINT_NAME", "read_checkpoint", "weights_digest", "LR_SCHEDULES", "LrSchedule", "check_lr_schedule",
           "scheduled_lr", "learn_masks_hypernetwork"]

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(HypernetworkConfig))


def learn_masks_hypernetwork(model: nn.Module, windows: torch.Tensor, budget: Budget,
                             config: Optional[HypernetworkConfig] = None, *, report: Optional[dict] = None,
                             log: Optional[list] = None, **kwargs) -> DispMasks:
    """``Trainer(model, windows, budget, config, **kwargs).run()``'s masks: the former function form, kept for
    callers not yet on :class:`Trainer` (``dip_ext.prune.select_masks``, the benchmarks).

    ``kwargs``: :class:`Trainer`'s keyword arguments (``val_blocks`` is accepted for ``val_windows``), or, when
    ``config`` is None, also :class:`HypernetworkConfig` fields by name (building the config). ``log``: receives
    each step's :class:`StepLog`. ``report``: updated with the export's :class:`ExportInfo` fields and the
    summary (steps, start_step, train_seconds, warm_start; with validation best_step, best_val_loss and
    val_history ``[[step, loss], ...]``). ValueError for an option given both ways or unknown.
    """
    if "val_blocks" in kwargs:
        kwargs["val_windows"] = kwargs.pop("val_blocks")
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
    if config is None:
        config = HypernetworkConfig(**fields)
    elif fields:
        raise ValueError(f"pass options in config or as keywords, not both ({', '.join(sorted(fields))})")
    trainer = Trainer(model, windows, budget, config, **kwargs)
    try:
        masks, summary = trainer.run()
    finally:
        if log is not None:
            log.extend(trainer.log)
    if report is not None:
        report.update(dataclasses.asdict(trainer.export_info))
        report.update({"steps": summary.steps, "start_step": summary.start_step, "train_seconds": summary.seconds,
                       "warm_start": kwargs.get("init_masks") is not None})
        if summary.best_step is not None:
            report.update({"best_step": summary.best_step, "best_val_loss": summary.best_val_loss,
                           "val_history": [list(h) for h in summary.val_history]})
    return masks
