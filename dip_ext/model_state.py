"""A model as the stages see it: held still while they read it (eval mode, no parameter gradients, restored
afterwards), its device, and a cheap fingerprint of its weights for checkpoints."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["frozen", "model_device", "model_digest"]


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


def model_digest(model: nn.Module, samples: int = 64) -> str:
    """A cheap fingerprint of ``model``'s weights: sha256 over every parameter's name, dtype, shape and
    ``samples`` evenly spaced values (as float32). Two checkpoints of one architecture differ in it unless
    their weights agree at every sampled position. An FSDP-sharded parameter contributes its local shard, so
    compare digests only between runs with the same placement.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "to_local"):  # a DTensor shard of an FSDP model
            t = t.to_local()
        flat = t.reshape(-1)
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        if flat.numel() and flat.device.type != "meta":
            idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), dtype=torch.float64,
                                 device=flat.device).long()  # float32 rounds n - 1 up to n past 2**24
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
