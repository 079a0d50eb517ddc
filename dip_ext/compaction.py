"""Compaction: a dense model plus DispMasks → the same model object with smaller dense matrices + index sets."""

from __future__ import annotations

from typing import Mapping, Union

from torch import nn

from .errors import MaskError
from .families import adapter_for
from .masks import DispMasks


def as_masks(masks: Union[DispMasks, Mapping]) -> DispMasks:
    if isinstance(masks, DispMasks):
        return masks
    if isinstance(masks, Mapping):
        return DispMasks.from_config(masks)
    raise MaskError(f"expected DispMasks or a masks dict, got {type(masks).__name__}")


def is_compacted(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "disp_masks", None) is not None


def compact_layers(model: nn.Module, masks: DispMasks) -> None:
    """Replaces every decoder layer of ``model`` by its compacted form (weights sliced, dense ones dropped)."""
    adapter = adapter_for(model)
    masks.validate(adapter.dims(model.config))
    layers = adapter.decoder_layers(model)
    for i in range(len(layers)):
        layers[i] = adapter.compact_layer(layers[i], masks[i])


def compact(model: nn.Module, masks: Union[DispMasks, Mapping]) -> nn.Module:
    """Compacts ``model`` in place and returns it.

    Each decoder layer then runs norm+gather → sub-block on compacted weights → scatter-accumulate into the
    full-width residual, on the dip_ext kernels. The model stays a Hugging Face model: ``generate``,
    ``save_pretrained`` (weights in safetensors, index sets in ``config.json``) and reloading with
    :func:`dip_ext.from_pretrained` or ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
    Its outputs equal the masked dense reference (:func:`dip_ext.apply_masks`) to float rounding.
    """
    from .modeling import adopt_disp_class
    from .params import param_report

    if is_compacted(model):
        raise ValueError("this model is already compacted; compact the dense original instead")
    masks = as_masks(masks)
    adapter = adapter_for(model)
    masks.validate(adapter.dims(model.config))
    dense = param_report(model)
    compact_layers(model, masks)
    adopt_disp_class(model, masks, dense_params={"total": dense.total, "decoder_linear": dense.decoder_linear})
    return model
