"""The slot layout: one (layer, structure) pair per slot, layer-major in :data:`dip_ext.masks.STRUCTURES` order.

Slot ``k`` is layer ``k // 5``, structure ``STRUCTURES[k % 5]`` (``l0 attn_in, l0 attn_out, ..., l0 mlp_out, l1
attn_in, ...``). Its width is the size of the space the structure indexes (:meth:`ModelDims.size`: the residual
width for the four hidden sets, the MLP width for ``mlp_mid``). Per-slot vectors (mask logits, 0/1 masks,
scores) are concatenated in this order into one flat vector; per-slot scalars (widths) form a vector of
``num_layers * 5`` entries. The hypernetwork, its export and the greedy selection all use this one layout.
Where KV groups are pruned, every function takes ``structures=ALL_STRUCTURES``: six slots per layer, ``kv_groups``
last (its width: the layer's KV groups).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..masks import STRUCTURES, ModelDims

__all__ = ["slots", "slot_sizes", "flatten", "unflatten", "per_layer", "slot_widths"]


def _check_dims(dims) -> None:
    if not isinstance(dims, ModelDims):
        raise ValueError(f"dims must be a dip_ext.masks.ModelDims, got {type(dims).__name__}")


def slots(dims: ModelDims, structures: Sequence[str] = STRUCTURES) -> list[tuple[int, str]]:
    """``[(layer, structure), ...]`` of every slot, in the layout's order."""
    _check_dims(dims)
    return [(i, s) for i in range(dims.num_layers) for s in structures]


def slot_sizes(dims: ModelDims, structures: Sequence[str] = STRUCTURES) -> torch.Tensor:
    """``[num_layers * len(structures)]`` int64: the full width of every slot."""
    _check_dims(dims)
    return torch.tensor([dims.size(s) for s in structures] * dims.num_layers, dtype=torch.int64)


def flatten(layers: Sequence[dict[str, torch.Tensor]], structures: Sequence[str] = STRUCTURES) -> torch.Tensor:
    """The per-layer ``{structure: 1-D tensor}`` dicts concatenated in slot order (keeps autograd).

    Inverse: :func:`unflatten`. ValueError if a layer lacks a structure or an entry is not 1-D.
    """
    parts = []
    for i, layer in enumerate(layers):
        for s in structures:
            if s not in layer:
                raise ValueError(f"layers[{i}] has no {s!r} entry")
            t = layer[s]
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"layers[{i}][{s!r}] must be a 1-D tensor, got {type(t).__name__}"
                                 f"{'' if not isinstance(t, torch.Tensor) else f' of shape {tuple(t.shape)}'}")
            parts.append(t)
    if not parts:
        raise ValueError("layers is empty")
    return torch.cat(parts)


def unflatten(flat: torch.Tensor, dims: ModelDims,
              structures: Sequence[str] = STRUCTURES) -> list[dict[str, torch.Tensor]]:
    """Per-layer ``{structure: view of flat}`` of a flat slot-order vector of ``sum(slot_sizes(dims))`` entries."""
    sizes = slot_sizes(dims, structures).tolist()
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.numel() != sum(sizes):
        got = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
        raise ValueError(f"flat must be a 1-D tensor of {sum(sizes)} entries for {dims}, got {got}")
    parts = torch.split(flat, sizes)
    n = len(structures)
    return [dict(zip(structures, parts[i * n:(i + 1) * n])) for i in range(dims.num_layers)]


def per_layer(values: torch.Tensor | Sequence, num_layers: int,
              structures: Sequence[str] = STRUCTURES) -> list[dict]:
    """Per-layer ``{structure: value}`` dicts of a per-slot vector of ``num_layers * len(structures)`` entries.

    A tensor keeps its entries as 0-d tensors (autograd flows); a list or tuple keeps its items (e.g. ints).
    """
    n = len(structures)
    if len(values) != num_layers * n:
        raise ValueError(f"values must have num_layers * {n} = {num_layers * n} entries, got {len(values)}")
    return [{s: values[i * n + j] for j, s in enumerate(structures)} for i in range(num_layers)]


def slot_widths(flat_masks: torch.Tensor, dims: ModelDims,
                structures: Sequence[str] = STRUCTURES) -> list[dict[str, torch.Tensor]]:
    """Per-layer widths (0-d tensors, sums of the masks, autograd kept) of a flat slot-order (soft) mask vector."""
    return [{s: m.sum() for s, m in layer.items()} for layer in unflatten(flat_masks, dims, structures)]
