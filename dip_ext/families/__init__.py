"""Family adapters: the registry that maps a model / config to the code that knows its module names."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .base import FamilyAdapter
from .llama import LlamaAdapter
from .opt import OPTAdapter
from .phi import PhiAdapter

ADAPTERS: list[FamilyAdapter] = [LlamaAdapter(), OPTAdapter(), PhiAdapter()]


def supported_architectures() -> list[str]:
    return [a for adapter in ADAPTERS for a in adapter.architectures]


def base_model_type(config) -> str:
    """The family's model_type (a compacted dip_ext config remembers the one it was made from)."""
    return getattr(config, "disp_base_model_type", None) or getattr(config, "model_type", None) or "?"


def adapter_for(model_or_config) -> FamilyAdapter:
    """The adapter for a model (or its config); UnsupportedModelError listing what is supported otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = base_model_type(config)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            adapter.check_supported(config)
            return adapter
    archs = getattr(config, "architectures", None) or [type(model_or_config).__name__]
    raise UnsupportedModelError(
        f"dip_ext does not support model_type {model_type!r} ({', '.join(archs)}); supported: "
        f"{', '.join(supported_architectures())}")


__all__ = ["FamilyAdapter", "ADAPTERS", "adapter_for", "supported_architectures", "base_model_type"]
