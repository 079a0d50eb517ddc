"""The Llama family (``LlamaForCausalLM``: Llama, Llama-2, Llama-3, SmolLM2; MHA, GQA, MQA): its adapter and
its compacted classes. Layers are LLaMA-style (:mod:`dip_ext.families.llama_style`); ``attention_bias`` gives
q/k/v/o biases and ``mlp_bias`` gate/up/down biases, as ``LlamaAttention`` / ``LlamaMLP`` read them."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

from .base import LayerShapes
from .hf_classes import DipExtConfig, DipExtForCausalLM, DipExtModel, Family
from .layers import SkippedAttention
from .llama_style import LlamaStyleAdapter, LlamaStyleLayer


class DipExtLlamaSkippedAttention(SkippedAttention, LlamaAttention):
    """Placeholder of a removed Llama attention (see :class:`~dip_ext.families.layers.SkippedAttention`)."""


class DipExtLlamaDecoderLayer(LlamaStyleLayer, LlamaDecoderLayer):
    """A compacted ``LlamaDecoderLayer`` (see :class:`~dip_ext.families.llama_style.LlamaStyleLayer`)."""

    skipped_attention_class = DipExtLlamaSkippedAttention


class LlamaAdapter(LlamaStyleAdapter):
    dense_model = LlamaForCausalLM
    layer_class = DipExtLlamaDecoderLayer

    def shapes(self, config) -> LayerShapes:
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        bias = bool(getattr(config, "attention_bias", False))
        return self.gated_shapes(config, head_dim, qkv_bias=bias, o_bias=bias,
                                 mlp_bias=bool(getattr(config, "mlp_bias", False)))


class DipExtLlamaConfig(DipExtConfig, LlamaConfig):
    """Config of a compacted Llama (see :class:`~dip_ext.families.hf_classes.DipExtConfig`)."""

    model_type = "dip_ext_llama"


class DipExtLlamaModel(DipExtModel, LlamaModel):
    """A compacted ``LlamaModel``, the base model ``AutoModel`` loads (see
    :class:`~dip_ext.families.hf_classes.DipExtModel`)."""

    config_class = DipExtLlamaConfig
    disp_adapter = LlamaAdapter()


class DipExtLlamaForCausalLM(DipExtForCausalLM, LlamaForCausalLM):
    """A compacted ``LlamaForCausalLM`` (see :class:`~dip_ext.families.hf_classes.DipExtForCausalLM`)."""

    config_class = DipExtLlamaConfig
    disp_adapter = DipExtLlamaModel.disp_adapter
    disp_base_model = DipExtLlamaModel


FAMILY = Family.of(DipExtLlamaForCausalLM)
