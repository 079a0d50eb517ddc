"""One training step's losses, and their averaging across data-parallel ranks.

Gao et al. (NeurIPS 2024, DISP-LLM eq. 6-8): Gumbel-sigmoid masks (temperature 0.4, offset +3 so masks start
near 1) applied as hard 0/1 samples with a straight-through gradient to the frozen model, minimising

    LM loss + lam * |log r - log p|        (= lam * log(max(r, p) / min(r, p)))

with ``p`` the target kept ratio and ``r`` the kept decoder-linear ratio. Unlike the official code, ``r``'s value
is the one of the DETERMINISTIC mask ``logit + offset > 0`` (what the export keeps; with ``r`` from the noisy
samples the exported mask drifts off the target, DESIGN.md §4), and its gradient is the one of the keep
probability ``sigmoid(logit + offset)`` (what the noisy straight-through gradient is on average for a small
temperature): the paper's push without its noise.

The masks cover the structures of ``budget.space`` (the hypernetwork's space). KV groups (``budget.heads``,
beyond the paper): the hypernetwork also emits the ``kv_groups`` logits of each layer having them; the sampled
group masks are applied by the masked model (each covering its query heads) and ``r`` counts them
(:meth:`Budget.kept_linear` with ``kv_groups`` widths). With a KV-cache target (``budget.kv_groups_kept``) the
budget term gains ``lam * |log k - log q|``: ``k`` the kept fraction of all layers' groups (the deterministic
mask's value, the keep probability's gradient, as for ``r``) and ``q = kv_groups_kept / budget.total_groups``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed as dist
from ...masking import MaskedModel
from ...families import adapter_for
from ...masks import KV_GROUPS
from ..budget import Budget
from ..slots import slot_widths, unflatten
from .network import HyperNetwork

__all__ = ["StepLosses", "step_losses", "dense_log_probs", "average_grads", "check_loss"]


@dataclass
class StepLosses:
    """``lm_loss`` (0-d float32 tensor with grad: the LM loss, or the KL from the dense model with distillation),
    ``budget_loss`` (0-d tensor with grad; with a KV-cache target it includes the KV term), ``kept_ratio`` (the
    deterministic mask's kept decoder-linear ratio), ``expected_ratio`` (the kept ratio expected under the noise)
    and ``kv_kept_ratio`` (the deterministic mask's kept fraction of KV groups; None without ``budget.heads``)."""

    lm_loss: torch.Tensor
    budget_loss: torch.Tensor
    kept_ratio: float
    expected_ratio: float
    kv_kept_ratio: Optional[float] = None


def step_losses(hnet: HyperNetwork, masked: MaskedModel, model: nn.Module, ids: torch.Tensor, budget: Budget,
                gen: torch.Generator, *, lam: float, temperature: float, offset: float,
                distill: bool = False) -> StepLosses:
    """The losses of one step on the token windows ``ids`` ``[batch, seq_len]`` (int64, on the model's device).

    Draws one Gumbel (logistic) noise value per prunable dimension from ``gen`` (a CPU generator, so every
    device and rank draws the same), sets the straight-through sample on ``masked`` and runs ``model``.
    With ``distill`` the loss is the mean per-token KL(dense || masked) of the next-token distributions
    (the teacher computed first with the masks off, under no_grad). ValueError for ``ids`` that are not 2-D int64,
    or a hypernetwork whose space is not ``budget.space``.
    """
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"ids must be a 2-D int64 tensor, got {ids.dim()}-D {ids.dtype}")
    space = budget.space
    if budget.heads != hnet.heads:
        raise ValueError(f"the budget {'prunes' if budget.heads else 'does not prune'} KV groups but the "
                         f"hypernetwork {'has' if hnet.heads else 'has no'} kv_groups head")
    if hnet.space != space:
        raise ValueError(f"the hypernetwork was built for {hnet.space}, the budget prunes {space}")
    teacher = dense_log_probs(masked, model, ids) if distill else None
    flat = hnet.flat_logits() + offset
    u = torch.rand(flat.numel(), generator=gen).clamp_(1e-6, 1 - 1e-6).to(flat.device)
    soft = torch.sigmoid((flat + torch.log(u) - torch.log1p(-u)) / temperature)  # logistic = Gumbel - Gumbel
    sample = (soft > 0.5).to(soft.dtype) + soft - soft.detach()
    masked.set_masks(unflatten(sample, space))
    if teacher is None:
        lm_loss = model(input_ids=ids, labels=ids, use_cache=False).loss.float()
    else:
        student = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        lm_loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")

    keep_p = torch.sigmoid(flat)
    det = (flat > 0).to(flat.dtype) + keep_p - keep_p.detach()
    widths = slot_widths(det, space)
    r = budget.kept_ratio(widths)
    if not isinstance(r, torch.Tensor):  # every block emptied: the count is the int 0
        r = torch.tensor(float(r), device=flat.device)
    budget_loss = lam * (torch.log(r.clamp_min(1e-8)) - math.log(budget.target_ratio)).abs()
    kv_kept = None
    if budget.heads:
        total = budget.total_groups
        groups = torch.stack([w[KV_GROUPS] for w in widths if KV_GROUPS in w])
        k = groups.sum() / total
        kv_kept = float(groups.detach().round().sum()) / total  # exact count
        if budget.kv_groups_kept is not None:
            q = max(budget.kv_groups_kept / total, 1e-8)  # 0 groups: as k's clamp
            budget_loss = budget_loss + lam * (torch.log(k.clamp_min(1e-8)) - math.log(q)).abs()
    with torch.no_grad():
        expected = float(budget.kept_ratio(slot_widths(keep_p, space)))
    return StepLosses(lm_loss, budget_loss, r.item(), expected, kv_kept)


@torch.no_grad()
def dense_log_probs(masked: MaskedModel, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, vocab]`` float32 log-probabilities of the unmasked model (the distillation teacher): every
    structure of the model's family space unset on ``masked``, optional ones included."""
    space = adapter_for(model).space(model.config)
    masked.set_masks([dict.fromkeys(space.names(i)) for i in range(space.num_layers)])
    return F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


def average_grads(hnet: nn.Module, lm_loss: torch.Tensor, world: int) -> torch.Tensor:
    """Averages the hypernetwork gradients over the ranks in place (one collective, the LM loss riding along);
    returns the global mean LM loss (0-d float32).

    Every rank's LM loss is the mean over its equal share of windows of equal length, so the mean of the ranks'
    gradients is the gradient of the global batch's mean loss. The budget term is the same on every rank and
    its gradient survives the averaging unchanged.
    """
    lm = lm_loss.detach().reshape(1).to(torch.float32).clone()
    grads = [p.grad for p in hnet.parameters()]
    dist.all_reduce_sum_(grads + [lm])
    for g in grads:
        if g is not None:
            g.div_(world)
    return (lm / world).reshape(())


def check_loss(loss: torch.Tensor, lm_loss: torch.Tensor, step: int) -> None:
    """FloatingPointError naming the (1-based) step unless ``loss`` is finite."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"hypernetwork loss became {float(loss)} at step {step + 1} "
                                 f"(LM loss {float(lm_loss)}); lower lr or check the model / windows")
