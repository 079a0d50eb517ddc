"""The KV-cache target's part of a selection: which KV groups it drops, and the most groups its cap lets layers keep.

A KV-cache target keeps at most ``cap`` KV groups over all layers (every group caches the same bytes per token).
With a step (``heads_multiple_of``, e.g. the tensor-parallel size) each layer keeps a multiple of the step or all of
its groups, so the target is met on the step instead of being rounded afterwards (which would remove more of the
KV cache, and more attention, than the target asks).
"""

from __future__ import annotations

import math

import torch

__all__ = ["kv_target_drops", "most_groups_kept"]


def kv_target_drops(scores: torch.Tensor, slot: torch.Tensor, kv_slots: torch.Tensor, cap: int,
                    step: int = 1) -> torch.Tensor:
    """The units a KV-cache target drops before the parameter budget is met: bool ``[n_units]``.

    ``scores``: ``[n_units]`` float, higher kept first; ``slot``: ``[n_units]`` int64, each unit's slot;
    ``kv_slots``: ``[n_slots]`` bool, the slots of KV groups (other units are never dropped here). At most ``cap``
    KV groups stay, a slot's lowest-scored first (among equal scores the higher index): with ``step`` 1 the lowest
    over all layers; with ``step`` > 1 each slot keeps a multiple of ``step`` or all, stepping down lowest mean score
    first until at most ``cap`` stay, then giving back steps that fit under ``cap``, best mean score first (so the
    rounding after the target removes no more of the KV cache than it needs)."""
    # every KV unit, lowest score first; among equal scores the higher index (the masks keep the lower one)
    is_kv = kv_slots[slot]
    order = (scores.numel() - 1 - torch.argsort(torch.where(is_kv, scores.double(), math.inf).flip(0), stable=True))
    order, dropped = order[:int(is_kv.sum())], torch.zeros(scores.numel(), dtype=torch.bool)
    if step == 1:
        dropped[order[:max(order.numel() - cap, 0)]] = True
        return dropped
    best_first = {k: order[slot[order] == k].flip(0) for k in torch.nonzero(kv_slots).flatten().tolist()}
    counts = {k: units.numel() for k, units in best_first.items()}

    def mean(k: int, lo: int, hi: int) -> float:
        return float(scores[best_first[k][lo:hi]].double().mean())

    while sum(counts.values()) > cap:
        lower = {k: (c - 1) // step * step for k, c in counts.items()}
        k = min((k for k in counts if counts[k] > 0), key=lambda k: (mean(k, lower[k], counts[k]), k))
        counts[k] = lower[k]
    while True:
        room, raises = cap - sum(counts.values()), {k: min(c + step, best_first[k].numel()) for k, c in counts.items()}
        fits = [k for k in counts if 0 < raises[k] - counts[k] <= room]
        if not fits:
            break
        k = max(fits, key=lambda k: (mean(k, counts[k], raises[k]), -k))
        counts[k] = raises[k]
    for k, units in best_first.items():
        dropped[units[counts[k]:]] = True
    return dropped


def most_groups_kept(full: list[int], cap: int, step: int = 1) -> list[int]:
    """Per layer, the KV groups kept when at most ``cap`` stay over all layers, spread as evenly as the step allows:
    each layer's count a multiple of ``step`` or its ``full`` count (ints >= 0). Round robin from zero, one allowed
    step up per layer per round while the cap has room; with ``step`` 1 every count is ``cap // n`` or one more
    (the first layers get the extra), capped by ``full``."""
    counts, left, grew = [0] * len(full), int(cap), True
    while grew:
        grew = False
        for j, n in enumerate(full):
            up = min(n, counts[j] + step) - counts[j]
            if 0 < up <= left:
                counts[j], left, grew = counts[j] + up, left - up, True
    return counts
