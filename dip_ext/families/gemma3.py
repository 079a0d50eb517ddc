"""The Gemma3 text family (``Gemma3ForCausalLM``: Gemma3-270M, 1B; GQA / MQA, head_dim 256): its adapter and its
compacted classes.

Layer (pre-norm AND post-norm, the "sandwich"; every RMSNorm scales by ``1 + weight``)::

    x += post_attention_layernorm(o_proj(attn(q, k, v(input_layernorm(x)))))
    x += post_feedforward_layernorm(down_proj(act(gate_proj(h)) * up_proj(h))),   h = pre_feedforward_layernorm(x)

The masks apply where they do in every family (on the q/k/v and gate/up inputs, the down_proj input, and the
o_proj / down_proj outputs), so in the masked reference a block's output is zero outside its output set before
the output norm normalises it over the full width d. Compacted, the input norms are fused norm+gathers and the
output norms fused norm+scatter-adds (:class:`~dip_ext.modules.RMSNormScatterAdd`: the RMS of the kept entries
over d, exact against the masked reference). Per-head q/k norms, the √d embedding scale, local (sliding-window)
and global layers with their own rope, and logit soft-capping act outside DISP's sets and are kept as they are.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextModel
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3DecoderLayer

from ..masks import KV_GROUPS
from ..modules import RMSNormGather, RMSNormScatterAdd
from ..space import PrunableSpace
from .base import FamilyAdapter, LayerShapes, block_points
from .hf_classes import DipExtConfig, DipExtForCausalLM, DipExtModel, Family
from .layers import CompactedLayer, SkippedAttention, compact_attention, compact_mlp, keeps_attention, keeps_mlp


class DipExtGemma3SkippedAttention(SkippedAttention, Gemma3Attention):
    """Placeholder of a removed Gemma3 attention (see :class:`~dip_ext.families.layers.SkippedAttention`)."""


class DipExtGemma3DecoderLayer(CompactedLayer, Gemma3DecoderLayer):
    """A compacted ``Gemma3DecoderLayer``; keeps the dense layer's submodule names for its weights.

    ``hidden_states [batch, seq, d]`` → ``[batch, seq, d]`` (full width), in the activations' dtype. A block
    whose output set is empty (or an MLP with no intermediate channels) holds no weights: ``self_attn`` with
    ``input_layernorm`` / ``post_attention_layernorm``, or ``mlp`` with ``pre_feedforward_layernorm`` /
    ``post_feedforward_layernorm``, are None.
    """

    def __init__(self, dense: nn.Module, idx: dict[str, torch.Tensor]):
        super().__init__(dense, idx, DipExtGemma3SkippedAttention)
        self.config = dense.config
        self.hidden_size = dense.hidden_size
        self.self_attn = self.input_layernorm = self.post_attention_layernorm = None
        self.mlp = self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        if keeps_attention(idx["attn_out"].numel()):
            self.input_layernorm = _gather(dense.input_layernorm, idx["attn_in"])
            self.self_attn = compact_attention(dense.self_attn, idx, ("q_proj", "k_proj", "v_proj"), "o_proj")
            self.post_attention_layernorm = _scatter(dense.post_attention_layernorm, idx["attn_out"])
        if keeps_mlp(idx["mlp_mid"].numel(), idx["mlp_out"].numel(), dense.mlp.down_proj.bias is not None):
            self.pre_feedforward_layernorm = _gather(dense.pre_feedforward_layernorm, idx["mlp_in"])
            compact_mlp(dense.mlp, idx, ("gate_proj", "up_proj"), "down_proj")
            self.mlp = dense.mlp
            self.post_feedforward_layernorm = _scatter(dense.post_feedforward_layernorm, idx["mlp_out"])
        self.train(dense.training)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x, owned = hidden_states, False
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
            x, owned = self.post_attention_layernorm(x, attn_out, inplace=False), True
        else:
            self.skip_attention(x, kwargs)
        if self.mlp is not None:
            mlp_out = self.mlp(self.pre_feedforward_layernorm(x))
            x = self.post_feedforward_layernorm(x, mlp_out, inplace=owned)
        return x


def _gather(norm: nn.Module, idx: torch.Tensor) -> RMSNormGather:
    return RMSNormGather(norm.weight, norm.eps, idx, unit_offset=True)


def _scatter(norm: nn.Module, idx: torch.Tensor) -> RMSNormScatterAdd:
    return RMSNormScatterAdd(norm.weight, norm.eps, idx, unit_offset=True)


class Gemma3Adapter(FamilyAdapter):
    dense_model = Gemma3ForCausalLM
    layer_class = DipExtGemma3DecoderLayer

    def space(self, config) -> PrunableSpace:
        """The built-in layout, with KV groups scored by column: the norm on the attention output makes the block
        blind to a common scale of a layer's heads, so one mask on a whole group (with one KV head, on every head
        of the layer) has a vanishing gradient and would look free to drop."""
        space = super().space(config)
        return PrunableSpace(space.hidden, tuple(
            tuple(replace(s, column_scores=True) if s.name == KV_GROUPS else s for s in layer)
            for layer in space.layers))

    def dense_mask_points(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        return block_points((attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj, (mlp.gate_proj, mlp.up_proj),
                            mlp.down_proj)

    def shapes(self, config) -> LayerShapes:
        # Gemma3Attention: q/k/v/o biases all follow attention_bias; Gemma3MLP has no biases
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        return LayerShapes(q_out=config.num_attention_heads * head_dim, kv_out=config.num_key_value_heads * head_dim,
                           kv_heads=config.num_key_value_heads, qkv_bias=bias, o_bias=bias, mlp_in_linears=2,
                           mlp_in_bias=False, mlp_out_bias=False)


class DipExtGemma3Config(DipExtConfig, Gemma3TextConfig):
    """Config of a compacted Gemma3 text model (see :class:`~dip_ext.families.hf_classes.DipExtConfig`)."""

    model_type = "dip_ext_gemma3_text"


class DipExtGemma3Model(DipExtModel, Gemma3TextModel):
    """A compacted ``Gemma3TextModel``, the base model ``AutoModel`` loads (see
    :class:`~dip_ext.families.hf_classes.DipExtModel`)."""

    config_class = DipExtGemma3Config
    disp_adapter = Gemma3Adapter()


class DipExtGemma3ForCausalLM(DipExtForCausalLM, Gemma3ForCausalLM):
    """A compacted ``Gemma3ForCausalLM`` (see :class:`~dip_ext.families.hf_classes.DipExtForCausalLM`)."""

    config_class = DipExtGemma3Config
    disp_adapter = DipExtGemma3Model.disp_adapter
    disp_base_model = DipExtGemma3Model


FAMILY = Family.of(DipExtGemma3ForCausalLM)
