"""Model families: the registry that maps a model / config to its adapter and its compacted classes.

Each family module (llama, mistral, qwen2, qwen3, gemma3, opt, phi) declares its adapter, its compacted decoder
layer and removed-attention classes, and its ``DipExt<Family>Config`` / ``DipExt<Family>ForCausalLM``, and exports them as
one :class:`~dip_ext.families.hf_classes.Family` record, ``FAMILY``. Registering the classes with transformers'
Auto classes is :func:`dip_ext.modeling.register_classes`.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from . import gemma3, llama, mistral, opt, phi, qwen2, qwen3
from .base import FamilyAdapter, LayerShapes
from .hf_classes import Family, is_compacted

#: Every supported family, in the order messages list them.
FAMILIES: tuple[Family, ...] = (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma3.FAMILY, opt.FAMILY,
                                phi.FAMILY)
ADAPTERS: list[FamilyAdapter] = [f.adapter for f in FAMILIES]


def supported_architectures() -> list[str]:
    return [a for adapter in ADAPTERS for a in adapter.architectures]


def base_model_type(config) -> str:
    """The family's model_type (a compacted dip_ext config remembers the one it was made from)."""
    return getattr(config, "disp_base_model_type", None) or getattr(config, "model_type", None) or "?"


def family_for(model_or_config) -> Family:
    """The family of a dense or compacted model (or its config).

    Raises UnsupportedModelError listing what is supported, also for a variant the family's adapter rejects.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = base_model_type(config)
    for family in FAMILIES:
        if model_type in family.adapter.model_types:
            family.adapter.check_supported(config)
            return family
    archs = getattr(config, "architectures", None) or [type(model_or_config).__name__]
    raise UnsupportedModelError(
        f"dip_ext does not support model_type {model_type!r} ({', '.join(archs)}); supported: "
        f"{', '.join(supported_architectures())}")


def adapter_for(model_or_config) -> FamilyAdapter:
    """The adapter for a model (or its config); UnsupportedModelError listing what is supported otherwise."""
    return family_for(model_or_config).adapter


__all__ = ["FamilyAdapter", "LayerShapes", "Family", "FAMILIES", "ADAPTERS", "adapter_for", "family_for",
           "supported_architectures", "base_model_type", "is_compacted"]
