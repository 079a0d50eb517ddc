"""Which parameters a loop trains, and named copies of them: the ``requires_grad`` scope and state snapshots."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["requires_grad_only", "snapshot", "copy_into"]


@contextmanager
def requires_grad_only(model: nn.Module, trainable: Iterable[nn.Parameter] = ()) -> Iterator[nn.Module]:
    """``model`` with exactly the parameters ``trainable`` requiring grad (none by default); every parameter's
    flag is restored on exit, also when the body raises. Scopes nest (an inner one restores what the outer one
    set). Parameters created inside the scope (e.g. adapters that are merged away) are not touched on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def snapshot(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Detached copies ``{name: tensor}`` of ``named`` (e.g. ``module.named_parameters()``), on their devices."""
    return {name: t.detach().clone() for name, t in named}


def copy_into(named: Iterable[tuple[str, torch.Tensor]], tensors: Mapping[str, torch.Tensor],
              prefix: str = "") -> None:
    """Copies ``tensors[prefix + name]`` into each tensor of ``named`` in place, without grad (device and dtype
    are the destination's). ValueError naming the first entry ``tensors`` lacks, before anything is copied."""
    named = list(named)
    missing = next((prefix + name for name, _ in named if prefix + name not in tensors), None)
    if missing is not None:
        raise ValueError(f"the saved state holds no {missing!r}")
    with torch.no_grad():
        for name, t in named:
            t.copy_(tensors[prefix + name])
