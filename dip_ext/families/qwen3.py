"""The Qwen3 family (``Qwen3ForCausalLM``, GQA, explicit ``head_dim``): its adapter and its compacted classes.

Layers are LLaMA-style (:mod:`dip_ext.families.llama_style`). Qwen3's attention adds a per-head RMSNorm on q and k
(over ``head_dim``, after the projections): it acts inside whole heads, which DISP leaves intact, so it is kept
as it is. ``attention_bias`` gives q/k/v/o biases (``Qwen3Attention`` reads it for all four), the MLP has none;
``head_dim`` may differ from hidden_size / heads; sliding-window layers follow ``config.layer_types``.
"""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3DecoderLayer

from .base import LayerShapes
from .hf_classes import DipExtConfig, DipExtForCausalLM, DipExtModel, Family
from .layers import SkippedAttention
from .llama_style import LlamaStyleAdapter, LlamaStyleLayer


class DipExtQwen3SkippedAttention(SkippedAttention, Qwen3Attention):
    """Placeholder of a removed Qwen3 attention (see :class:`~dip_ext.families.layers.SkippedAttention`)."""


class DipExtQwen3DecoderLayer(LlamaStyleLayer, Qwen3DecoderLayer):
    """A compacted ``Qwen3DecoderLayer`` (see :class:`~dip_ext.families.llama_style.LlamaStyleLayer`)."""

    skipped_attention_class = DipExtQwen3SkippedAttention


class Qwen3Adapter(LlamaStyleAdapter):
    dense_model = Qwen3ForCausalLM
    layer_class = DipExtQwen3DecoderLayer

    def shapes(self, config) -> LayerShapes:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        return self.gated_shapes(config, head_dim, qkv_bias=bias, o_bias=bias, mlp_bias=False)


class DipExtQwen3Config(DipExtConfig, Qwen3Config):
    """Config of a compacted Qwen3 (see :class:`~dip_ext.families.hf_classes.DipExtConfig`)."""

    model_type = "dip_ext_qwen3"


class DipExtQwen3Model(DipExtModel, Qwen3Model):
    """A compacted ``Qwen3Model``, the base model ``AutoModel`` loads (see
    :class:`~dip_ext.families.hf_classes.DipExtModel`)."""

    config_class = DipExtQwen3Config
    disp_adapter = Qwen3Adapter()


class DipExtQwen3ForCausalLM(DipExtForCausalLM, Qwen3ForCausalLM):
    """A compacted ``Qwen3ForCausalLM`` (see :class:`~dip_ext.families.hf_classes.DipExtForCausalLM`)."""

    config_class = DipExtQwen3Config
    disp_adapter = DipExtQwen3Model.disp_adapter
    disp_base_model = DipExtQwen3Model


FAMILY = Family.of(DipExtQwen3ForCausalLM)
