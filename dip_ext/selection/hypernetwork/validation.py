"""Early stopping: score exports on held-out windows and keep the best one (and its logits) across resumes."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ...eval import mean_window_loss
from ...masking import MaskedModel
from ..budget import Budget
from .export import export_masks

__all__ = ["BestExport", "validation_loss"]


class BestExport:
    """The best-scoring export so far on the validation windows: its step, loss and the logits behind it.

    ``scores`` is the flat slot-order float32 logit vector, so the returned masks are re-exported from exactly
    the hypernetwork output that was scored. Saved in checkpoints (:meth:`meta`, :meth:`tensors`) so a resumed
    run keeps the best of the steps before the interruption. Ties keep the earlier step (the warm start).
    """

    def __init__(self):
        self.step: Optional[int] = None
        self.loss = math.inf
        self.scores: Optional[torch.Tensor] = None
        self.history: list[tuple[int, float]] = []

    def offer(self, step: int, loss: float, scores: torch.Tensor) -> None:
        """Records ``loss`` of the export of the flat logits ``scores`` at ``step``; keeps them if best."""
        self.history.append((step, loss))
        if self.step is None or loss < self.loss:
            self.scores = scores.detach().float().cpu()
            self.step, self.loss = step, loss

    def meta(self) -> dict:
        return {"best_step": self.step, "best_val_loss": self.loss if self.step is not None else None,
                "val_history": self.history}

    def tensors(self) -> dict:
        return {} if self.scores is None else {"best.scores": self.scores}

    @classmethod
    def from_checkpoint(cls, tensors: dict, meta: dict) -> "BestExport":
        """The state :meth:`meta` / :meth:`tensors` saved; ValueError for an inconsistent checkpoint."""
        best = cls()
        if meta.get("best_step") is not None:
            if "best.scores" not in tensors:
                raise ValueError("hypernetwork checkpoint records a best step but holds no best.scores")
            best.step, best.loss = int(meta["best_step"]), float(meta["best_val_loss"])
            best.scores = tensors["best.scores"].float()
            best.history = [(int(a), float(b)) for a, b in meta.get("val_history", [])]
        return best


@torch.no_grad()
def validation_loss(logits, masked: MaskedModel, model: nn.Module, windows: torch.Tensor, budget: Budget, *,
                    offset: float, multiple_of: int, device, batch: int = 8) -> float:
    """Mean LM loss per token over ``windows`` of ``model`` under the masks :func:`export_masks` makes of
    ``logits``; the same number (and so the same best step) on every rank (:func:`dip_ext.eval.mean_window_loss`).
    FloatingPointError if it is not finite."""
    masks, _ = export_masks(logits, budget, offset=offset, multiple_of=multiple_of)
    masked.set_masks(masks)
    value = mean_window_loss(model, windows, batch_size=batch, device=device)
    if not math.isfinite(value):
        raise FloatingPointError(f"validation loss of the exported masks is {value}")
    return value
