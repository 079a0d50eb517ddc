"""Parameter budgets: what "prune R %" means, the kept-parameter count of a set of widths, and the one budget
fitter every selection method rounds its widths with.

``ratio`` is the fraction of parameters removed, of the decoder linears by default (``ratio_of="decoder_linear"``)
or of all parameters (``ratio_of="total"``; embeddings, norms and lm_head are kept, so only the decoder linears
can pay for it). Widths may be ints or (differentiable) tensors: the count is a polynomial in the widths,
non-decreasing in every width.

Rounding to ``multiple_of`` (the one policy, :func:`fit_multiple`). A method first chooses widths that meet the
budget. The allowed widths of a set of full size ``n`` are the multiples of ``m = multiple_of`` and ``n`` itself
(a set kept whole stays whole, also when ``n`` is not a multiple). Then:

1. every width goes DOWN to ``floor(w / m) * m`` (``n`` stays ``n``): the budget stays met, since the count
   only grows with the widths;
2. whole chunks are added back: repeatedly, the set (or group of sets) the method prefers most (``priority``:
   one-shot and dependent by Fisher score per parameter of the chunk's dims, the hypernetwork export by their
   mean mask score) gains its next ``min(m, n - w)`` best-ranked dims, if the budget allows it; a chunk that
   would exceed the target is skipped for good and the next preferred one tried, until no chunk fits.

So the result never exceeds the target and no single further chunk would fit: the budget is met as closely as
the granularity allows, which is what a user asking for R % removed wants. Within a set, the kept dimensions
are always the set's best-ranked ones. With ``multiple_of == 1`` step 1 changes nothing and step 2 gives back
single dimensions while any fits (the greedy selection's own last step); the hypernetwork export skips the
policy at ``multiple_of == 1`` so that its result stays one global threshold on the mask scores.

Whole-unit sets (KV groups, experts) are not rounded to ``multiple_of``: their step is one unit, or for KV groups
``Budget.heads_multiple_of`` (the same policy with that step: a layer keeps a multiple of it or all of its groups,
so tensor parallelism over that many ranks can split every layer's heads).
"""

from __future__ import annotations

import math
import warnings

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..compaction import require_dense
from ..families import adapter_for
from ..masks import KV_GROUPS
from ..params import dense_linear_params, kv_cache_bytes, param_report
from ..space import PrunableSpace
from .kv_target import most_groups_kept
from .slots import per_layer

__all__ = ["RATIO_OF", "Budget", "check_ratio", "heads_by_default", "widths_of", "round_down", "raise_widths",
           "fit_multiple", "fit_layer_widths", "unit_steps", "unit_step"]

RATIO_OF = ("decoder_linear", "total")

#: per-group preference for a raise: a ``[n_groups]`` tensor, or a function of the current counts and of each
#: group's next raise size returning one (higher is raised first)
Priority = Union[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float in (0, 1); ValueError otherwise."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}") from None
    if not 0.0 < r < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (the fraction of parameters removed), got {ratio}")
    return r


@dataclass
class Budget:
    """The kept decoder-linear parameter target for one model and one ratio (counts are parameters), and what may
    pay for it: with ``heads`` whole KV groups compete with the other dimensions; ``kv_ratio`` (which implies
    ``heads``) also asks that at least that fraction of the KV-cache bytes per token be removed, met by keeping at
    most ``kv_groups_kept`` groups over all layers (every group caches the same bytes). ``heads_multiple_of``: with
    ``heads``, each layer keeps a multiple of that many KV groups or all of them (the rounding step of the groups)."""

    config: object
    ratio: float
    ratio_of: str
    dense_linear: int
    dense_total: int
    target_linear: int  # decoder-linear parameters to keep
    heads: bool = False
    kv_ratio: Optional[float] = None
    kv_groups_kept: Optional[int] = None  # the most KV groups kept over all layers (None: no KV target)
    heads_multiple_of: int = 1

    @classmethod
    def for_model(cls, model: nn.Module, ratio: float, ratio_of: str = "decoder_linear", *, heads: bool = False,
                  kv_ratio: Optional[float] = None, heads_multiple_of: int = 1) -> "Budget":
        """The budget of removing ``ratio`` of the ``ratio_of`` parameters of the dense ``model``; ``heads`` lets KV
        groups compete, ``kv_ratio`` (a fraction in (0, 1)) adds the KV-cache target and turns ``heads`` on;
        ``heads_multiple_of`` (an int >= 1) is the step kept KV groups are rounded to per layer.
        ValueError for a ratio out of range, a compacted model, heads asked of a family without KV groups, a
        ``heads_multiple_of`` below 1, or a family whose ``linear_params`` does not count what the dense model stores;
        UserWarning for heads on a model with one KV group per layer (a group is then a whole attention)."""
        ratio = check_ratio(ratio)
        if ratio_of not in RATIO_OF:
            raise ValueError(f"ratio_of must be one of {RATIO_OF}, got {ratio_of!r}")
        require_dense(model, "a parameter budget")
        rep = param_report(model)
        _check_counts_match(model, rep.dense_decoder_linear)
        removed = ratio * (rep.dense_decoder_linear if ratio_of == "decoder_linear" else rep.dense_total)
        if removed >= rep.dense_decoder_linear:
            raise ValueError(f"removing {100 * ratio:.1f} % of all parameters needs more than every decoder-linear "
                             f"parameter ({rep.dense_decoder_linear:,} of {rep.dense_total:,})")
        kept_groups = None
        if isinstance(heads_multiple_of, bool) or not isinstance(heads_multiple_of, int) or heads_multiple_of < 1:
            raise ValueError(f"heads_multiple_of must be an integer >= 1, got {heads_multiple_of!r}")
        if kv_ratio is not None:
            try:
                kv_ratio = check_ratio(kv_ratio)
            except ValueError:
                raise ValueError(f"kv_ratio must be in (0, 1) (the fraction of KV-cache bytes removed), got "
                                 f"{kv_ratio!r}") from None
            heads = True
        if heads:
            space = adapter_for(model).space(model.config)
            if not space.has(KV_GROUPS):
                raise ValueError(f"{type(model).__name__}: its family declares no KV groups, so heads cannot be "
                                 "pruned (drop --prune-heads / --kv-ratio)")
            total = _total_groups(space)
            if kv_ratio is not None:
                kept_groups = math.floor((1 - kv_ratio) * total + 1e-9)
            if _one_group_per_layer(space):
                warnings.warn(f"{type(model).__name__} has one KV group per layer (multi-query attention): every "
                              "group dropped removes a whole layer's attention, which can cost far more quality than "
                              "pruning the same parameters elsewhere", stacklevel=2)
        budget = cls(model.config, ratio, ratio_of, rep.dense_decoder_linear, rep.dense_total,
                     int(round(rep.dense_decoder_linear - removed)), bool(heads), kv_ratio, kept_groups,
                     heads_multiple_of)
        if kept_groups is not None:
            budget._check_kv_target()
        return budget

    def _check_kv_target(self) -> None:
        """ValueError when the KV-cache target alone removes more parameters than the ratio asks: keeping every
        other dimension and the allowed groups spread evenly over the layers with KV groups, a layer's count a
        multiple of ``heads_multiple_of`` or all of them (what keeps the most), stays under the parameter target."""
        spread = self.space.full_widths()
        holders = [w for w in spread if KV_GROUPS in w]
        for w, n in zip(holders, most_groups_kept([w[KV_GROUPS] for w in holders], self.kv_groups_kept,
                                                  self.heads_multiple_of)):
            w[KV_GROUPS] = n
        most = float(self.kept_linear(spread))
        if most < self.target_linear:
            floor = 1 - most / self.dense_linear
            raise ValueError(f"kv_ratio {self.kv_ratio:g} alone removes {100 * floor:.1f} % of the decoder-linear "
                             f"parameters, more than the {100 * (1 - self.target_ratio):.1f} % that ratio "
                             f"{self.ratio:g} asks for: raise --ratio or lower --kv-ratio")

    @cached_property
    def space(self) -> PrunableSpace:
        """The structures masks meeting this budget hold: the family's prunable space, with ``kv_groups`` only with
        ``heads``. Built on the first read and kept (the space is immutable; it reflects ``config`` and ``heads``
        as they were then)."""
        return adapter_for(self.config).space(self.config).select([KV_GROUPS] if self.heads else [])

    @property
    def total_groups(self) -> int:
        """KV groups over all layers of the dense model (0 for a family without them)."""
        return _total_groups(adapter_for(self.config).space(self.config))

    def kept_linear(self, widths: Sequence[dict]):
        """Decoder-linear parameters stored at these per-layer widths (ints or tensors)."""
        adapter = adapter_for(self.config)
        total = 0
        for i, w in enumerate(widths):
            total = total + sum(adapter.linear_params(self.config, w, layer=i).values())
        return total

    def kept_ratio(self, widths: Sequence[dict]):
        """kept / dense decoder-linear parameters (the quantity the target ``1 - removed`` is met on)."""
        return self.kept_linear(widths) / self.dense_linear

    @property
    def target_ratio(self) -> float:
        return self.target_linear / self.dense_linear

    def describe(self, widths: Sequence[dict], itemsize: int = 2) -> dict:
        """What these per-layer widths keep and remove: decoder-linear parameters (counts and fractions) and the
        KV-cache bytes per token (dense and kept, at ``itemsize`` bytes per value)."""
        kept = int(self.kept_linear(widths))
        removed = self.dense_linear - kept
        return {"kept_decoder_linear": kept, "removed_decoder_linear": removed,
                "removed_fraction_decoder_linear": removed / self.dense_linear,
                "removed_fraction_total": removed / self.dense_total,
                "kv_cache_bytes_per_token_dense": kv_cache_bytes(self.config, itemsize=itemsize),
                "kv_cache_bytes_per_token_kept": kv_cache_bytes(self.config, list(widths), itemsize)}


def _check_counts_match(model: nn.Module, stored: int) -> None:
    """ValueError unless the family's ``linear_params`` at the dense widths counts what the model's decoder layers
    store: a count that misses a structure would size every budget wrong."""
    adapter = adapter_for(model)
    name = type(adapter).__name__
    try:
        formula = dense_linear_params(model.config, adapter.space(model.config).required().full_widths())
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{name}.linear_params failed at the dense widths ({e!r}): it returns a dict of parameter "
                         "counts per block ({'attn': n, 'mlp': n}) from one layer's widths, which hold that layer's "
                         "structures") from None
    if formula != stored:
        raise ValueError(f"{name}.linear_params counts {formula:,} decoder-linear parameters at the dense widths, but "
                         f"the model's decoder layers store {stored:,}: every budget would be wrong (does it count "
                         "every structure of every layer?)")


def _total_groups(space: PrunableSpace) -> int:
    return sum(space.size(i, KV_GROUPS) for i in range(space.num_layers) if KV_GROUPS in space.names(i))


def _one_group_per_layer(space: PrunableSpace) -> bool:
    return _total_groups(space) == sum(KV_GROUPS in space.names(i) for i in range(space.num_layers))


def heads_by_default(model_or_config) -> bool:
    """Whether whole KV groups compete for the parameter budget of a dense model (or of its config) when the caller
    leaves it to the defaults (``PruneConfig.prune_heads=None``): where its family says so
    (:attr:`~dip_ext.families.base.FamilyAdapter.heads_by_default`: every serving route of the family runs
    per-layer head counts) and its layers hold more than one group each (with one, a dropped group is a layer's
    whole attention: measured to cost more than it saves). UnsupportedModelError for a model of no supported
    family."""
    adapter = adapter_for(model_or_config)
    if not adapter.heads_by_default:
        return False
    space = adapter.space(getattr(model_or_config, "config", model_or_config))
    return space.has(KV_GROUPS) and not _one_group_per_layer(space)


def widths_of(masks) -> list[dict]:
    """Per-layer widths of a DispMasks or of per-layer dicts of (soft) mask tensors (sum of the mask)."""
    if hasattr(masks, "widths"):
        return masks.widths()
    return [{s: m.sum() for s, m in layer.items() if m is not None} for layer in masks]


def _check_multiple(multiple_of) -> Union[int, torch.Tensor]:
    """An int >= 1, or a 1-D int64 tensor of per-group steps >= 1 (e.g. KV groups rounded singly)."""
    if isinstance(multiple_of, torch.Tensor) and multiple_of.dtype == torch.int64 and multiple_of.dim() == 1:
        if bool((multiple_of < 1).any()):
            raise ValueError("per-group multiple_of entries must be >= 1")
        return multiple_of
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an integer >= 1, got {multiple_of!r}")
    return multiple_of


def _check_counts(counts, sizes) -> None:
    for name, t in (("counts", counts), ("sizes", sizes)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
            raise ValueError(f"{name} must be a 1-D int64 tensor, got {t!r}")
    if counts.shape != sizes.shape:
        raise ValueError(f"counts and sizes must have the same shape, got {tuple(counts.shape)} and "
                         f"{tuple(sizes.shape)}")
    if bool((counts < 0).any()) or bool((counts > sizes).any()):
        raise ValueError("counts must lie in [0, sizes]")


def round_down(counts: torch.Tensor, sizes: torch.Tensor, multiple_of: int) -> torch.Tensor:
    """The lower allowed neighbour of every width: ``floor(w / m) * m``, or ``n`` where ``w == n`` (int64)."""
    m = _check_multiple(multiple_of)
    _check_counts(counts, sizes)
    return torch.where(counts == sizes, sizes, counts // m * m)


def raise_widths(budget: Budget, widths: Callable[[torch.Tensor], Sequence[dict]], start: torch.Tensor,
                 limit: torch.Tensor, step: int, priority: Priority) -> torch.Tensor:
    """Raises group counts from ``start`` toward ``limit`` while ``budget`` allows; returns the counts (int64).

    ``widths(counts)`` maps ``[n_groups]`` int64 counts to the per-layer widths :meth:`Budget.kept_linear`
    counts. Each round raises the group of highest ``priority`` (ties: the lowest index) by
    ``min(step, limit - count)``; a raise that would exceed ``budget.target_linear`` is skipped and that group
    is not raised again (the count only grows, so it would not fit later either). Stops when no group can rise.
    ``start`` must already meet the budget (ValueError otherwise).
    """
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a Budget, got {type(budget).__name__}")
    _check_counts(start, limit)
    step = _check_multiple(step)
    if not callable(priority) and (not isinstance(priority, torch.Tensor) or priority.shape != start.shape):
        raise ValueError(f"priority must be a callable or a tensor of shape {tuple(start.shape)}")
    target = budget.target_linear
    counts = start.clone()
    if float(budget.kept_linear(widths(counts))) > target:
        raise ValueError("the starting widths already exceed the budget")
    blocked = torch.zeros(counts.shape, dtype=torch.bool)
    while True:
        add = torch.clamp(limit - counts, max=step)
        gains = (priority(counts, add) if callable(priority) else priority).to(torch.float64).clone()
        gains[(add <= 0) | blocked] = -math.inf
        g = int(torch.argmax(gains))
        if gains[g] == -math.inf:
            return counts
        trial = counts.clone()
        trial[g] += add[g]
        if float(budget.kept_linear(widths(trial))) > target:
            blocked[g] = True
            continue
        counts = trial


def fit_multiple(budget: Budget, widths: Callable[[torch.Tensor], Sequence[dict]], counts: torch.Tensor,
                 sizes: torch.Tensor, multiple_of: Union[int, torch.Tensor], priority: Priority,
                 limit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """THE rounding policy (see the module docstring): ``counts`` (a method's widths, meeting ``budget``) rounded
    down to allowed widths, then whole chunks of ``multiple_of`` added back in ``priority`` order while any fits.

    ``counts`` / ``sizes``: ``[n_groups]`` int64 widths and full sizes of the groups (a group may drive several
    slots, as the dependent baseline's shared hidden set does); ``widths``: counts -> per-layer widths;
    ``multiple_of``: one step for every group, or ``[n_groups]`` int64 steps (KV groups are rounded singly);
    ``limit``: the most each group may be raised to (default ``sizes``; a KV-cache target caps the KV groups at
    what the method kept). Returns the rounded ``[n_groups]`` int64 counts.
    """
    # a limit below the full size is rounded down too, so that every raise lands on an allowed width
    limit = sizes if limit is None else round_down(limit, sizes, multiple_of)
    return raise_widths(budget, widths, round_down(counts, sizes, multiple_of), limit, multiple_of, priority)


def fit_layer_widths(budget: Budget, widths: Sequence[dict], multiple_of: int,
                     priority: Optional[Sequence[dict]] = None) -> list[dict[str, int]]:
    """:func:`fit_multiple` on per-layer ``{structure: int}`` widths that meet ``budget`` (for callers without
    scores, e.g. random masks of given widths; with ``multiple_of == 1`` single dims are added while any fits).
    ``priority``: per-layer ``{structure: float}`` preferences for the raises (higher first; default: none, so
    raises go in slot order). Whole-unit structures (KV groups, experts) are raised singly, and ``kv_groups`` (when
    ``budget.heads``) keep their group counts as given. Returns per-layer int widths."""
    space = budget.space
    if len(widths) != space.num_layers:
        raise ValueError(f"widths must have {space.num_layers} layers, got {len(widths)}")
    layout = space.slots()
    try:
        counts = torch.tensor([int(widths[i][s]) for i, s in layout], dtype=torch.int64)
        pri = (torch.zeros(counts.shape, dtype=torch.float64) if priority is None else
               torch.tensor([float(priority[i].get(s, 0.0)) for i, s in layout], dtype=torch.float64))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"widths / priority must be per-layer dicts over the space's structures of numbers "
                         f"({e!r}; {space})") from None
    if priority is not None and len(priority) != space.num_layers:
        raise ValueError(f"priority must have {space.num_layers} layers, got {len(priority)}")
    sizes = space.slot_sizes()
    steps = unit_steps(space, multiple_of, budget.heads_multiple_of)
    groups = torch.tensor([s == KV_GROUPS for _, s in layout])
    fitted = fit_multiple(budget, lambda c: per_layer(c.tolist(), space), counts, sizes,
                          steps, pri, limit=torch.where(groups, counts, sizes))
    return per_layer(fitted.tolist(), space)


def unit_steps(space: PrunableSpace, multiple_of: int, heads_multiple_of: int = 1) -> torch.Tensor:
    """Per slot of ``space``, the rounding step (int64): ``heads_multiple_of`` for KV groups, 1 for another
    whole-unit structure (an expert), else ``multiple_of``."""
    return torch.tensor([unit_step(space.structure(i, s), multiple_of, heads_multiple_of)
                         for i, s in space.slots()], dtype=torch.int64)


def unit_step(structure, multiple_of: int, heads_multiple_of: int = 1) -> int:
    """The rounding step of one structure of a space (see :func:`unit_steps`)."""
    if structure.name == KV_GROUPS:
        return heads_multiple_of
    return 1 if structure.whole_units else multiple_of
