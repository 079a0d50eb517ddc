"""The slot layout: one (layer, structure) pair per slot, layer-major, each layer's structures in the order its
prunable space lists them (:meth:`dip_ext.space.PrunableSpace.slots`).

For the built-in families slot ``k`` is layer ``k // 5``, structure ``STRUCTURES[k % 5]`` (``l0 attn_in, l0
attn_out, ..., l0 mlp_out, l1 attn_in, ...``), six per layer with ``kv_groups`` last where KV groups are pruned; a
family with a space of its own may give its layers different structures. A slot's width is the size of its set.
Per-slot vectors (mask logits, 0/1 masks, scores) are concatenated in this order into one flat vector; per-slot
scalars (widths) form a vector of one entry per slot. The hypernetwork, its export and the greedy selection all
use this one layout. Every function takes the space of the structures pruned (a
:class:`~dip_ext.space.PrunableSpace`, e.g. ``Budget.space``; a :class:`~dip_ext.masks.ModelDims` stands for its
space without optional structures).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..masks import ModelDims, as_space
from ..space import PrunableSpace

__all__ = ["slots", "slot_sizes", "flatten", "unflatten", "per_layer", "slot_widths"]

SpaceArg = PrunableSpace | ModelDims


def _space(space) -> PrunableSpace:
    if isinstance(space, ModelDims):
        return space.space().required()
    return as_space(space)


def slots(space: SpaceArg) -> list[tuple[int, str]]:
    """``[(layer, structure), ...]`` of every slot, in the layout's order."""
    return _space(space).slots()


def slot_sizes(space: SpaceArg) -> torch.Tensor:
    """``[num_slots]`` int64: the full width of every slot."""
    return _space(space).slot_sizes()


def flatten(layers: Sequence[dict[str, torch.Tensor]], space: SpaceArg) -> torch.Tensor:
    """The per-layer ``{structure: 1-D tensor}`` dicts concatenated in slot order (keeps autograd).

    Inverse: :func:`unflatten`. ValueError if a layer lacks a structure or an entry is not 1-D.
    """
    parts = []
    for i, s in _space(space).slots():
        if i >= len(layers) or s not in layers[i]:
            raise ValueError(f"layers[{i}] has no {s!r} entry")
        t = layers[i][s]
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"layers[{i}][{s!r}] must be a 1-D tensor, got {type(t).__name__}"
                             f"{'' if not isinstance(t, torch.Tensor) else f' of shape {tuple(t.shape)}'}")
        parts.append(t)
    if not parts:
        raise ValueError("layers is empty")
    return torch.cat(parts)


def unflatten(flat: torch.Tensor, space: SpaceArg) -> list[dict[str, torch.Tensor]]:
    """Per-layer ``{structure: view of flat}`` of a flat slot-order vector of ``sum(slot_sizes(space))`` entries."""
    space = _space(space)
    sizes = space.slot_sizes().tolist()
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.numel() != sum(sizes):
        got = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
        raise ValueError(f"flat must be a 1-D tensor of {sum(sizes)} entries for {space}, got {got}")
    return per_layer(torch.split(flat, sizes), space)


def per_layer(values: torch.Tensor | Sequence, space: SpaceArg) -> list[dict]:
    """Per-layer ``{structure: value}`` dicts of a per-slot vector (one entry per slot).

    A tensor keeps its entries as 0-d tensors (autograd flows); a list or tuple keeps its items (e.g. ints).
    """
    space = _space(space)
    layout = space.slots()
    if len(values) != len(layout):
        raise ValueError(f"values must have one entry per slot ({len(layout)}), got {len(values)}")
    out = [{} for _ in range(space.num_layers)]
    for (i, s), v in zip(layout, values):
        out[i][s] = v
    return out


def slot_widths(flat_masks: torch.Tensor, space: SpaceArg) -> list[dict[str, torch.Tensor]]:
    """Per-layer widths (0-d tensors, sums of the masks, autograd kept) of a flat slot-order (soft) mask vector."""
    return [{s: m.sum() for s, m in layer.items()} for layer in unflatten(flat_masks, space)]
