"""Distillation losses: KL of next-token distributions (Hinton et al. 2015), LM loss, hidden-state matching.

Every loss is a SUM over the window's predicted tokens (or its layers × tokens) in float32; the trainer divides
by the global number of predicted tokens of the optimizer step, so gradient accumulation and data-parallel ranks
give the mean of one big batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["kl_sum", "lm_sum", "hidden_sum", "window_objective"]


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Σ over positions of KL(p_teacher ‖ p_student) at ``temperature`` T, times T² (so the gradient's scale does
    not depend on T). Logits ``[batch, seq, vocab]`` of any float dtype (computed in float32); the last position
    predicts nothing and is dropped. Returns a 0-d float32 tensor (grad flows to the student only)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (another vocabulary?)")
    t = float(temperature)
    s = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1)
    with torch.no_grad():
        p = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
    return F.kl_div(s.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="sum") * (t * t)


def lm_sum(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ over positions of the next-token cross-entropy of ``student_logits`` ``[batch, seq, vocab]`` on ``ids``
    ``[batch, seq]`` (float32, 0-d)."""
    return F.cross_entropy(student_logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def hidden_sum(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over decoder layers and positions of ‖h_s − h_t‖² / ‖h_t‖², the relative squared error of each layer's
    residual output (``hidden_states[1:]`` of a Hugging Face model, each ``[batch, seq, d]``), divided by the number
    of layers so its scale matches one per-token loss. Per-token normalisation keeps the few attention-sink tokens,
    whose residual norms are hundreds of times the median, from deciding the fit. Positions as for the KL."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student hidden states but {len(teacher_hidden)} of the teacher")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for hs, ht in zip(student_hidden, teacher_hidden):
        hs, ht = hs[:, :-1].float(), ht[:, :-1].float()
        err = (hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp_min(1e-12)
        total = total + err.sum()
    return total / len(student_hidden)


def window_objective(student_out, teacher_out, ids: torch.Tensor, *, temperature: float, lm_weight: float,
                     hidden_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed objective of one micro-batch and its parts (floats, sums over predicted tokens).

    ``student_out`` / ``teacher_out``: model outputs with ``logits`` (and ``hidden_states`` when
    ``hidden_weight`` > 0; ``teacher_out`` may be None when only the LM loss is used)."""
    parts: dict[str, float] = {}
    total: Optional[torch.Tensor] = None
    if teacher_out is not None:
        total = kl_sum(student_out.logits, teacher_out.logits, temperature)
        parts["kl"] = float(total.detach())
    if lm_weight > 0:
        lm = lm_sum(student_out.logits, ids)
        parts["lm"] = float(lm.detach())
        total = lm_weight * lm if total is None else total + lm_weight * lm
    if hidden_weight > 0:
        hid = hidden_sum(student_out.hidden_states[1:], teacher_out.hidden_states[1:])
        parts["hidden"] = float(hid.detach())
        total = total + hidden_weight * hid
    return total, parts
