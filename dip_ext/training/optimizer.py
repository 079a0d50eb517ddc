"""An optimizer's state as flat named tensors and back: what a checkpoint stores of it, without pickle."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

__all__ = ["optimizer_state", "load_optimizer_state"]

PREFIX = "opt."


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``(tensors, groups)``: every per-parameter state entry as the CPU tensor ``opt.<param index>.<key>``
    (numbers become 0-d tensors) and the param groups as JSON-safe dicts (tuples as lists, parameters as their
    indices). :func:`load_optimizer_state` restores both exactly. CPU tensors are the optimizer's own (no copy:
    write them, do not keep them while it steps)."""
    sd = optimizer.state_dict()
    tensors = {f"{PREFIX}{i}.{key}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu()
               for i, state in sd["state"].items() for key, v in state.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                         groups: Optional[list[dict]] = None) -> None:
    """Restores :func:`optimizer_state`'s output into ``optimizer`` (built over the same parameters, in the same
    order); entries of ``tensors`` without the ``opt.`` prefix are ignored. The state moves to each parameter's
    device (``Optimizer.load_state_dict``). ``groups`` None keeps the optimizer's own hyper-parameters (a loop
    that sets them itself, e.g. the learning rate from its schedule at every step); otherwise they are restored
    (what a learning-rate scheduler keeps there), lists back to tuples where the optimizer has tuples."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(PREFIX):
            i, key = name[len(PREFIX):].split(".", 1)
            state.setdefault(int(i), {})[key] = value
    current = optimizer.state_dict()["param_groups"]
    if groups is None:
        groups = current
    else:
        if len(groups) != len(current):
            raise ValueError(f"the saved optimizer state has {len(groups)} parameter groups, this optimizer "
                             f"{len(current)}")
        groups = [{k: (tuple(v) if isinstance(mine.get(k), tuple) else v) for k, v in g.items()}
                  for g, mine in zip(groups, current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
