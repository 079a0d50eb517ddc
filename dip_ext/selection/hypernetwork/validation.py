"""Early stopping's score: the held-out loss of an export (the trainer keeps the best in a
:class:`dip_ext.training.BestState`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...eval import mean_window_loss
from ...masking import MaskedModel
from ..budget import Budget
from .export import export_masks

__all__ = ["validation_loss"]


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
