"""Compaction: a dense model plus DispMasks → the same model object with smaller dense matrices + index sets."""

from __future__ import annotations

from typing import Mapping, Union

from torch import nn

from .errors import MaskError, UnsupportedModelError
from .families import family_for, is_compacted
from .masks import DispMasks
from .model_state import offloaded_modules
from .modules import place_index_sets
from .params import param_report

__all__ = ["as_masks", "compact", "is_compacted", "require_dense"]


def as_masks(masks: Union[DispMasks, Mapping]) -> DispMasks:
    """``masks`` as DispMasks (a mapping is read with :meth:`DispMasks.from_config`); MaskError otherwise."""
    if isinstance(masks, DispMasks):
        return masks
    if isinstance(masks, Mapping):
        return DispMasks.from_config(masks)
    raise MaskError(f"expected DispMasks or a masks dict, got {type(masks).__name__}")


def require_dense(model: nn.Module, what: str) -> None:
    """Raises ValueError, in one line naming ``what``, when ``model`` is already compacted or has weights that
    accelerate offloaded (:func:`dip_ext.model_state.offloaded_modules`).

    Every entry point that reads or changes the dense modules (masking, calibration, mask learning, refit,
    compaction) calls this first, so a compacted model is refused clearly instead of failing on a missing module.
    """
    if is_compacted(model):
        raise ValueError(f"{what} needs the dense model; this one is already compacted: prune the dense original "
                         "(a compacted model is for inference, evaluation and fine-tuning)")
    offloaded = offloaded_modules(model)
    if offloaded:
        shown = ", ".join(offloaded[:4]) + (f" and {len(offloaded) - 4} more" if len(offloaded) > 4 else "")
        raise ValueError(f"{what} reads and rewrites every weight, but accelerate keeps {shown} offloaded (on disk "
                         "or the meta device): load the model without offloading (device_map=None, or a device "
                         "map without 'disk'), or shard it across processes (torchrun ... dip-ext prune --fsdp)")


def compact(model: nn.Module, masks: Union[DispMasks, Mapping]) -> nn.Module:
    """Compacts ``model`` in place and returns it.

    Each decoder layer then runs norm+gather → sub-block on compacted weights → scatter-accumulate into the
    full-width residual, on the dip_ext kernels. The model stays a Hugging Face model: ``generate``,
    ``save_pretrained`` (weights in safetensors, index sets in ``config.json``) and reloading with
    :func:`dip_ext.from_pretrained` or ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
    Its outputs equal the masked dense reference (:func:`dip_ext.apply_masks`) to float rounding.

    Raises ValueError for a compacted model, UnsupportedModelError for another architecture (or a subclass of
    a supported one), MaskError when ``masks`` do not fit the model.
    """
    require_dense(model, "compact()")
    masks = as_masks(masks)
    family = family_for(model)
    if type(model) is not family.dense_model:
        raise UnsupportedModelError(f"compact() needs a {family.dense_model.__name__}, got {type(model).__name__}")
    masks.validate(family.adapter.space(model.config))
    dense = param_report(model)
    family.adapter.compact_layers(model, masks)
    family.adopt(model, masks, dense_params={"total": dense.total, "decoder_linear": dense.decoder_linear})
    place_index_sets(model)
    return model
