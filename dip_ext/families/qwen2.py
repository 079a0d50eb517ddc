"""The Qwen2 family (``Qwen2ForCausalLM``, GQA): its adapter and its compacted classes. Layers are LLaMA-style
(:mod:`dip_ext.families.llama_style`); Qwen2's q/k/v always have biases and o_proj and the MLP never do,
whatever ``attention_bias`` says (``Qwen2Attention`` / ``Qwen2MLP`` hard-code them)."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer

from .base import LayerShapes
from .hf_classes import DipExtConfig, DipExtForCausalLM, DipExtModel, Family
from .layers import SkippedAttention
from .llama_style import LlamaStyleAdapter, LlamaStyleLayer


class DipExtQwen2SkippedAttention(SkippedAttention, Qwen2Attention):
    """Placeholder of a removed Qwen2 attention (see :class:`~dip_ext.families.layers.SkippedAttention`)."""


class DipExtQwen2DecoderLayer(LlamaStyleLayer, Qwen2DecoderLayer):
    """A compacted ``Qwen2DecoderLayer`` (see :class:`~dip_ext.families.llama_style.LlamaStyleLayer`)."""

    skipped_attention_class = DipExtQwen2SkippedAttention


class Qwen2Adapter(LlamaStyleAdapter):
    dense_model = Qwen2ForCausalLM
    layer_class = DipExtQwen2DecoderLayer

    def shapes(self, config) -> LayerShapes:
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        return self.gated_shapes(config, head_dim, qkv_bias=True, o_bias=False, mlp_bias=False)


class DipExtQwen2Config(DipExtConfig, Qwen2Config):
    """Config of a compacted Qwen2 (see :class:`~dip_ext.families.hf_classes.DipExtConfig`)."""

    model_type = "dip_ext_qwen2"


class DipExtQwen2Model(DipExtModel, Qwen2Model):
    """A compacted ``Qwen2Model``, the base model ``AutoModel`` loads (see
    :class:`~dip_ext.families.hf_classes.DipExtModel`)."""

    config_class = DipExtQwen2Config
    disp_adapter = Qwen2Adapter()


class DipExtQwen2ForCausalLM(DipExtForCausalLM, Qwen2ForCausalLM):
    """A compacted ``Qwen2ForCausalLM`` (see :class:`~dip_ext.families.hf_classes.DipExtForCausalLM`)."""

    config_class = DipExtQwen2Config
    disp_adapter = DipExtQwen2Model.disp_adapter
    disp_base_model = DipExtQwen2Model


FAMILY = Family.of(DipExtQwen2ForCausalLM)
