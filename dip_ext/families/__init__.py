"""Model families: the registry that maps a model / config to its adapter and its compacted classes.

Each family module (llama, mistral, qwen2, qwen3, gemma3, opt, phi) declares its adapter, its compacted decoder
layer and removed-attention classes, and its ``DipExt<Family>Config`` / ``DipExt<Family>ForCausalLM``, and exports them as
one :class:`~dip_ext.families.hf_classes.Family` record, ``FAMILY``. Registering the classes with transformers'
Auto classes is :func:`dip_ext.modeling.register_classes`. A family defined outside the package (its own module,
declaring its adapter, its prunable space and its classes the same way) joins with :func:`register_family`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ..errors import UnsupportedModelError
from . import gemma3, llama, mistral, opt, phi, qwen2, qwen3
from .base import FamilyAdapter, LayerShapes
from .hf_classes import Family, is_compacted

#: Every supported family, in the order messages list them: the built-in ones, then those registered.
FAMILIES: list[Family] = [llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma3.FAMILY, opt.FAMILY,
                          phi.FAMILY]
BUILTIN_FAMILIES: tuple[Family, ...] = tuple(FAMILIES)
ADAPTERS: list[FamilyAdapter] = [f.adapter for f in FAMILIES]


def _model_types(family: Family) -> set[str]:
    return set(family.adapter.model_types) | {family.config.model_type}


def register_family(family: Family) -> Family:
    """Adds ``family`` to the registry and registers its compacted classes with transformers' Auto classes, so
    ``prune_and_compact``, ``compact``, selection and ``dip_ext.from_pretrained`` handle its models. Returns it.

    ValueError when ``family`` is not a :class:`Family`, or when one of its model types (the dense ones its adapter
    handles, or its compacted config's) is already registered: a registry that refuses duplicates.
    """
    if not isinstance(family, Family):
        raise ValueError(f"register_family takes a dip_ext Family record (Family.of(...)), got {type(family).__name__}")
    taken = sorted(_model_types(family) & set().union(*(_model_types(f) for f in FAMILIES)))
    if taken:
        raise ValueError(f"model type(s) {taken} already registered with dip_ext; unregister_family first")
    AutoConfig.register(family.config.model_type, family.config, exist_ok=True)
    AutoModel.register(family.config, family.base_model, exist_ok=True)
    AutoModelForCausalLM.register(family.config, family.model, exist_ok=True)
    FAMILIES.append(family)
    ADAPTERS.append(family.adapter)
    return family


def unregister_family(model_type: str) -> Family:
    """Removes the registered family whose adapter handles ``model_type`` (a built-in one cannot be removed) and
    returns it. ValueError when none does."""
    for family in FAMILIES:
        if model_type in family.adapter.model_types and family not in BUILTIN_FAMILIES:
            FAMILIES.remove(family)
            ADAPTERS.remove(family.adapter)
            return family
    raise ValueError(f"no registered (non built-in) family handles model type {model_type!r}")


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


__all__ = ["FamilyAdapter", "LayerShapes", "Family", "FAMILIES", "BUILTIN_FAMILIES", "ADAPTERS", "adapter_for",
           "family_for", "register_family", "unregister_family", "supported_architectures", "base_model_type",
           "is_compacted"]
