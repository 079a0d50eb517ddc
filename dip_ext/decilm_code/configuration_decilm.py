"""DeciLM (Nemotron-NAS) configuration, shipped inside a DeciLM folder exported by dip_ext (``auto_map``:
``AutoConfig`` -> ``configuration_decilm.DeciLMConfig``); transformers has no config class for this model type.

A Llama config plus ``block_configs``: one entry per decoder layer, ``{"attention": {"no_op": bool,
"n_heads_in_group": int}, "ffn": {"no_op": bool, "intermediate_size": int}}`` (no ``ffn_mult``: vLLM would derive
the width from it instead), read with attribute access (``config.block_configs[i].ffn.intermediate_size``) as vLLM's
``DeciLMForCausalLM`` reads it. Self-contained: needs only transformers.
"""

from transformers import LlamaConfig


class BlockSection:
    """The settings of one block of a layer (attention or ffn), as attributes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockSection) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        return f"BlockSection({self.__dict__})"


class BlockConfig:
    """One decoder layer: ``attention`` and ``ffn`` (:class:`BlockSection`)."""

    def __init__(self, attention, ffn):
        self.attention = attention if isinstance(attention, BlockSection) else BlockSection(**attention)
        self.ffn = ffn if isinstance(ffn, BlockSection) else BlockSection(**ffn)

    @classmethod
    def of(cls, value) -> "BlockConfig":
        return value if isinstance(value, BlockConfig) else cls(**value)

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()})"


class DeciLMConfig(LlamaConfig):
    """``LlamaConfig`` with per-layer ``block_configs`` (see the module docstring)."""

    model_type = "nemotron-nas"

    def __post_init__(self, **kwargs):
        blocks = kwargs.pop("block_configs", None) or []
        super().__post_init__(**kwargs)
        self.block_configs = [BlockConfig.of(b) for b in blocks]

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["block_configs"] = [BlockConfig.of(b).to_dict() for b in getattr(self, "block_configs", [])]
        return out
