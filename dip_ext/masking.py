"""The masked dense reference: 0/1 (or soft, differentiable) masks multiplied into a dense model.

This defines what "exact" means for compaction, and it is the path mask learning trains through: masks
multiply the normalized block inputs (``attn_in``, ``mlp_in``), the MLP intermediate activation (``mlp_mid``)
and each block's output including its bias (``attn_out``, ``mlp_out``); a ``kv_groups`` mask multiplies the input
of the attention output projection, each group's entry covering its query heads' columns there. Which structures a
layer has, their widths and where each multiplies come from the family (its prunable space and mask points): a
mask narrower than the activation at its point covers equal contiguous blocks of it (a KV group's query-head
columns, an expert's outputs).
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .compaction import require_dense
from .errors import MaskError
from .families import adapter_for
from .masks import DispMasks

MaskTensors = Sequence[dict[str, Optional[torch.Tensor]]]


class MaskedModel:
    """Hooks on a dense model that multiply per-layer masks in; returned by :func:`apply_masks`.

    ``masks[i][s]`` is a float tensor of the structure's full width (0/1, or soft values in [0, 1] that may
    require grad), or None (or absent) to leave that structure unmasked; ``s`` is one of layer ``i``'s structures
    in the family's prunable space (``space.names(i)``, optional ones included; ``kv_groups``: one entry per KV
    group). Use as a context manager or call :meth:`remove`.
    Raises ValueError for a compacted model or a family whose space declares a structure without a mask point,
    UnsupportedModelError for an unsupported model, MaskError for masks that do not fit.
    """

    def __init__(self, model: nn.Module, masks: Union[DispMasks, MaskTensors, None] = None):
        require_dense(model, "apply_masks() / MaskedModel")
        self.model = model
        self.adapter = adapter_for(model)
        #: the family's full prunable space of the model: what each layer's masks may hold, and their widths
        self.space = self.adapter.space(model.config)
        self._masks: list[dict[str, Optional[torch.Tensor]]] = [dict.fromkeys(self.space.names(i))
                                                                 for i in range(self.space.num_layers)]
        self._hooks = []
        per_layer = [self.adapter.mask_points(layer) for layer in self.adapter.decoder_layers(model)]
        for i, layer_points in enumerate(per_layer):  # checked before any hook is placed
            unplaced = [s for s in self.space.names(i) if not layer_points.get(s)]
            if unplaced:
                raise ValueError(f"{type(self.adapter).__name__}: layer {i} declares {unplaced} in its prunable space "
                                 "but its dense_mask_points gives no mask point for them")
        for i, layer_points in enumerate(per_layer):
            for s, points in layer_points.items():
                if s not in self.space.names(i):
                    continue  # a point of a structure the layer does not declare: never masked
                for module, where in points:
                    if where == "input":
                        self._hooks.append(module.register_forward_pre_hook(partial(self._mask_input, i, s)))
                    else:
                        self._hooks.append(module.register_forward_hook(partial(self._mask_output, i, s)))
        if masks is not None:
            self.set_masks(masks)

    def set_masks(self, masks: Union[DispMasks, MaskTensors]) -> None:
        """Replaces the masks (DispMasks, or per-layer dicts of float tensors / None)."""
        space = self.space
        if isinstance(masks, DispMasks):
            masks = masks.to_masks(space)
        if len(masks) != space.num_layers:
            raise MaskError(f"masks have {len(masks)} layers but the model has {space.num_layers}")
        for i, layer in enumerate(masks):
            names = space.names(i)
            unknown = [k for k in layer if k not in names]
            if unknown:
                raise MaskError(f"layer {i}: unknown structure {unknown[0]!r} (layer {i} has: {list(names)})")
            for s in names:
                m, size = layer.get(s), space.size(i, s)
                # a structure scored by column may also be masked column by column (the calibration's masks)
                by_column = m is not None and space.structure(i, s).column_scores and m.numel() % size == 0
                if m is not None and (m.dim() != 1 or (m.numel() != size and not by_column)):
                    raise MaskError(f"layer {i} {s}: mask must have shape [{size}], got {tuple(m.shape)}")
        self._masks = [{s: layer.get(s) for s in space.names(i)} for i, layer in enumerate(masks)]

    def _mask_for(self, i: int, s: str, like: torch.Tensor) -> Optional[torch.Tensor]:
        m = self._masks[i][s]
        if m is None:
            return None
        width = like.shape[-1]
        if m.numel() != width:  # one entry per unit (a KV group's query-head columns): equal contiguous blocks
            if width % m.numel():
                raise MaskError(f"layer {i} {s}: a mask of {m.numel()} entries cannot cover the {width} channels "
                                "at its mask point in equal blocks (the family's space and mask points disagree)")
            m = m.repeat_interleave(width // m.numel())
        return m.to(device=like.device, dtype=like.dtype)

    def _mask_input(self, i, s, module, args):
        m = self._mask_for(i, s, args[0])
        return None if m is None else (args[0] * m, *args[1:])

    def _mask_output(self, i, s, module, args, out):
        m = self._mask_for(i, s, out)
        return None if m is None else out * m

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> "MaskedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_masks(model: nn.Module, masks: Union[DispMasks, MaskTensors, None]) -> MaskedModel:
    """Multiplies ``masks`` into the dense ``model`` (no compaction); returns the hook handle.

    The model's outputs then equal what :func:`dip_ext.compact` with the same masks produces, to float rounding.
    """
    return MaskedModel(model, masks)
