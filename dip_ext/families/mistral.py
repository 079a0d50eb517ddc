"""The Mistral family (``MistralForCausalLM``, GQA, optional sliding-window attention): its adapter and its
compacted classes. Layers are LLaMA-style (:mod:`dip_ext.families.llama_style`); Mistral's linears have no
biases, and its attention reads ``head_dim`` when the config sets one (Mistral-Nemo: heads × head_dim ≠ hidden)."""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralDecoderLayer

from .base import LayerShapes
from .hf_classes import DipExtConfig, DipExtForCausalLM, DipExtModel, Family
from .layers import SkippedAttention
from .llama_style import LlamaStyleAdapter, LlamaStyleLayer


class DipExtMistralSkippedAttention(SkippedAttention, MistralAttention):
    """Placeholder of a removed Mistral attention (see :class:`~dip_ext.families.layers.SkippedAttention`)."""


class DipExtMistralDecoderLayer(LlamaStyleLayer, MistralDecoderLayer):
    """A compacted ``MistralDecoderLayer`` (see :class:`~dip_ext.families.llama_style.LlamaStyleLayer`)."""

    skipped_attention_class = DipExtMistralSkippedAttention


class MistralAdapter(LlamaStyleAdapter):
    dense_model = MistralForCausalLM
    layer_class = DipExtMistralDecoderLayer

    def shapes(self, config) -> LayerShapes:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return self.gated_shapes(config, head_dim, qkv_bias=False, o_bias=False, mlp_bias=False)


class DipExtMistralConfig(DipExtConfig, MistralConfig):
    """Config of a compacted Mistral (see :class:`~dip_ext.families.hf_classes.DipExtConfig`)."""

    model_type = "dip_ext_mistral"


class DipExtMistralModel(DipExtModel, MistralModel):
    """A compacted ``MistralModel``, the base model ``AutoModel`` loads (see
    :class:`~dip_ext.families.hf_classes.DipExtModel`)."""

    config_class = DipExtMistralConfig
    disp_adapter = MistralAdapter()


class DipExtMistralForCausalLM(DipExtForCausalLM, MistralForCausalLM):
    """A compacted ``MistralForCausalLM`` (see :class:`~dip_ext.families.hf_classes.DipExtForCausalLM`)."""

    config_class = DipExtMistralConfig
    disp_adapter = DipExtMistralModel.disp_adapter
    disp_base_model = DipExtMistralModel


FAMILY = Family.of(DipExtMistralForCausalLM)
