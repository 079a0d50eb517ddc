"""Distillation losses: KL of next-token distributions (Hinton et al. 2015), LM loss, hidden-state matching.

Every loss is a SUM over the window's predicted tokens (or its layers × tokens) in float32; the trainer divides
by the global number of predicted tokens of the optimizer step, so gradient accumulation and data-parallel ranks
give the mean of one big batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["kl_sum", "topk_kl_sum", "lm_sum", "hidden_sum", "window_objective"]


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


def topk_kl_sum(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """:func:`kl_sum` against a teacher known only by its top-k (:mod:`.teacher_cache`): Σ over positions of the KL
    between the teacher's and the student's distributions at T coarsened to k + 1 outcomes (the teacher's k most
    likely tokens, and "any other token"), times T².

    ``student_logits`` ``[b, s, vocab]``; ``values`` ``[b, s-1, k]`` the teacher's tempered logits z = logits / T
    of its top-k tokens ``indices`` ``[b, s-1, k]`` (int64), ``lse`` ``[b, s-1]`` logsumexp of z over the whole
    vocabulary, so the k probabilities are the teacher's exact ones and the rest bucket holds what they leave.
    By the data-processing inequality this is at most the full KL; it equals it when the rest bucket is a single
    token (k = vocab − 1). Returns a 0-d float32 tensor (grad flows to the student only)."""
    if values.shape != indices.shape or values.shape[:2] != lse.shape:
        raise ValueError(f"top-k values {tuple(values.shape)}, indices {tuple(indices.shape)} and normaliser "
                         f"{tuple(lse.shape)} do not match")
    if tuple(student_logits.shape[:2]) != (values.shape[0], values.shape[1] + 1):
        raise ValueError(f"student logits {tuple(student_logits.shape)} do not match top-k targets of "
                         f"{values.shape[0]} windows × {values.shape[1]} predicted positions")
    t = float(temperature)
    s = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1)
    log_q = s.gather(-1, indices)
    # the student's mass outside the teacher's top-k, summed in log space (stable when it is tiny)
    log_q_rest = torch.logsumexp(s.scatter(-1, indices, float("-inf")), dim=-1)
    with torch.no_grad():
        log_p = values.float() - lse.float().unsqueeze(-1)
        p = log_p.exp()
        p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    kl = (p * (log_p - log_q)).sum() + (torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest).sum()
    return kl * (t * t)


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
                     hidden_weight: float, teacher_topk=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed objective of one micro-batch and its parts (floats, sums over predicted tokens).

    ``student_out`` / ``teacher_out``: model outputs with ``logits`` (and ``hidden_states`` when
    ``hidden_weight`` > 0; ``teacher_out`` may be None when only the LM loss is used). ``teacher_topk``: the
    teacher's cached top-k targets (:class:`~.teacher_cache.TopKTargets`) in place of ``teacher_out``: the KL
    term is then :func:`topk_kl_sum` (no hidden-state term: the cache holds logits only)."""
    parts: dict[str, float] = {}
    total: Optional[torch.Tensor] = None
    if teacher_topk is not None:
        if hidden_weight > 0:
            raise ValueError("the hidden-state loss needs the teacher's hidden states, which a top-k cache does "
                             "not hold")
        total = topk_kl_sum(student_out.logits, teacher_topk.values, teacher_topk.indices, teacher_topk.lse,
                            temperature)
        parts["kl"] = float(total.detach())
    elif teacher_out is not None:
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
