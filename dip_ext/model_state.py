"""A model as the stages see it: held still while they read it (eval mode, no parameter gradients, restored
afterwards), its device, and a cheap fingerprint of its weights for checkpoints."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

try:  # FSDP2 parameters are DTensors; a torch without them has no sharded models either
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None

__all__ = ["frozen", "model_device", "model_digest", "check_device", "offloaded_modules"]


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


def model_digest(model: nn.Module, samples: int = 256, dtype: Optional[torch.dtype] = None) -> str:
    """A cheap digest of ``model``'s weights: sha256 over every parameter's name, shape, dtype and ``samples``
    evenly spaced values of its flattened tensor (all values when it has fewer); 16 hex characters. ``dtype``:
    the digest of the model cast to it (floating-point parameters; ``model`` itself is left as it is).

    The same on every data-parallel rank (each holds the same weights) and for an FSDP-sharded model (each
    sharded parameter is gathered whole first: a collective every rank runs, in the same order), so a run and
    its resume agree whatever the placement. Not a hash of every weight: models that agree on every sampled
    value are taken for the same.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        if DTensor is not None and isinstance(t, DTensor):
            t = t.full_tensor()
        flat = t.reshape(-1)
        n = flat.numel()
        k = min(n, samples)
        idx = torch.arange(k, dtype=torch.int64, device=flat.device) * n // max(k, 1)
        values = flat[idx].cpu().contiguous()
        if dtype is not None and values.is_floating_point():
            values = values.to(dtype)
        h.update(f"{name}|{tuple(t.shape)}|{values.dtype}|".encode())
        h.update(values.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_device(device: str) -> None:
    """ValueError unless ``device`` names a device torch knows and this machine has (cpu, cuda, cuda:N, ...)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a device torch knows (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "meta":
        raise ValueError(f"device {device!r} holds no data: name a device that computes (cpu, cuda, cuda:1, ...)")
    elif dev.type != "cpu" and not getattr(torch, dev.type, None):
        raise ValueError(f"device {device!r} is not available here")


def offloaded_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose weights are not in ``model`` but elsewhere: the entries accelerate's device map
    puts on "disk" or "meta", and the owners of parameters left on the meta device (weights that accelerate's
    hooks bring in only around each forward). Empty for a model held in memory, FSDP-sharded ones included."""
    device_map = getattr(model, "hf_device_map", None) or {}
    names = [name or "(the whole model)" for name, where in device_map.items() if str(where) in ("disk", "meta")]
    if names:
        return names
    return sorted({name.rpartition(".")[0] or name for name, p in model.named_parameters() if p.device.type == "meta"})


def weight_itemsize(model: nn.Module) -> int:
    """Bytes per value of the model's floating-point weights (what its KV cache holds by default; 2 without any)."""
    return next((p.element_size() for p in model.parameters() if p.is_floating_point()), 2)
