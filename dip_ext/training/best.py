"""Early stopping's memory: the lowest held-out loss so far, the step it came at and the state behind it."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch

__all__ = ["BestState"]

PREFIX = "best."


class BestState:
    """The best of the states offered so far: ``step`` (None before the first kept offer), ``loss`` (``inf``
    then), ``state`` (the ``{name: tensor}`` snapshot taken when it was kept, or None) and ``history`` (every
    ``(step, loss)`` offered, kept or not).

    :meth:`offer` keeps a strictly lower loss: a tie keeps the earlier step (the warm start or the untrained model
    wins it), a NaN is never kept. A checkpoint carries it as :meth:`meta` (JSON) and :meth:`tensors`
    (``best.<name>``) and :meth:`from_checkpoint` reads it back, so a resumed run keeps the best of the steps before
    the interruption.
    """

    def __init__(self):
        self.step: Optional[int] = None
        self.loss = math.inf
        self.state: Optional[dict[str, torch.Tensor]] = None
        self.history: list[tuple[int, float]] = []

    def offer(self, step: int, loss: float,
              snapshot: Optional[Callable[[], dict[str, torch.Tensor]]] = None) -> bool:
        """Records ``loss`` of the state at ``step``; when it is the best so far, keeps it with ``snapshot()``
        (called only then; None keeps no tensors, e.g. when the caller's live state is the one kept). Returns
        whether it was kept."""
        self.history.append((step, loss))
        if not loss < self.loss:
            return False
        self.step, self.loss = step, loss
        self.state = snapshot() if snapshot is not None else None
        return True

    def meta(self) -> dict:
        """The JSON-safe part: ``best_step``, ``best_val_loss`` (None before a kept offer), ``val_history``."""
        return {"best_step": self.step, "best_val_loss": self.loss if self.step is not None else None,
                "val_history": self.history}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The kept snapshot as ``best.<name>`` tensors (none before a kept offer)."""
        return {f"{PREFIX}{k}": v for k, v in (self.state or {}).items()}

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> "BestState":
        """The state :meth:`meta` and :meth:`tensors` saved; ValueError for a checkpoint that records a best step
        but holds none of its tensors."""
        best = cls()
        best.history = [(int(s), float(v)) for s, v in meta.get("val_history", [])]
        if meta.get("best_step") is not None:
            best.state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
            if not best.state:
                raise ValueError(f"the checkpoint records a best step but holds no {PREFIX}* tensors")
            best.step, best.loss = int(meta["best_step"]), float(meta["best_val_loss"])
        return best
