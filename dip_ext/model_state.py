"""Holding a model still while a stage reads it: eval mode and no parameter gradients, restored afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["frozen", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def frozen(model: nn.Module, *, grad: bool = False) -> Iterator[nn.Module]:
    """Puts ``model`` in eval mode with ``requires_grad`` off on every parameter; restores both on exit.

    Stages that run the frozen model (calibration, mask learning, refit statistics, evaluation) use this so
    that dropout is off and no parameter gradient is accumulated, and the caller gets its model back as it
    was, also when the stage raises. ``grad=True`` leaves ``requires_grad`` as it is (only the mode changes).
    """
    flags = [] if grad else [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
