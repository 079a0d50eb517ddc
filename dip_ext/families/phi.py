"""The Phi family (``PhiForCausalLM``: Phi-1, Phi-1.5, Phi-2; the PARALLEL block): its adapter and its
compacted classes.

Layer (one LayerNorm with bias; attention and MLP both read its output, both outputs join the residual):

    h = layer_norm(x)
    x = x + dense(attn(q, k, v(h))) + fc2(gelu_new(fc1(h)))

Compacted: ``attn_in`` and ``mlp_in`` are two gathers of the same norm (each a fused norm+gather over the full
width; both read the layer's input, not the residual after the attention update), and each block scatter-adds
its output, bias included, into its own subset of the residual. Partial rotary embeddings and the optional
per-head ``qk_layernorm`` act on whole heads, which DISP leaves intact, so they are untouched. q/k/v keep their
whole biases, ``dense``/fc2 the biases of their kept rows, fc1 the biases of its kept intermediate channels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import PhiConfig, PhiForCausalLM, PhiModel
from transformers.models.phi.modeling_phi import PhiAttention, PhiDecoderLayer

from ..modules import IndexSet, LayerNormGather, residual_add
from .base import FamilyAdapter, LayerShapes, block_points
from .hf_classes import DipExtConfig, DipExtForCausalLM, DipExtModel, Family
from .layers import CompactedLayer, SkippedAttention, compact_attention, compact_mlp, keeps_attention, keeps_mlp


class DipExtPhiSkippedAttention(SkippedAttention, PhiAttention):
    """Placeholder of a removed Phi attention (see :class:`~dip_ext.families.layers.SkippedAttention`)."""


class SharedLayerNormGather(LayerNormGather):
    """Phi's one norm, read by both blocks: ``norm(x)`` gathers ``attn_in``, ``norm(x, idx)`` the set ``idx``.

    The second read goes through the module call, not a method, so whatever wraps the norm (peft's LN tuning
    swaps in a tuned copy, hooks) sees both reads.
    """

    def forward(self, x: torch.Tensor, idx: Optional[IndexSet] = None) -> torch.Tensor:
        return self.gather(x, self.idx if idx is None else idx)


class DipExtPhiDecoderLayer(CompactedLayer, PhiDecoderLayer):
    """A compacted ``PhiDecoderLayer``; keeps the dense layer's submodule names for its weights.

    ``hidden_states [batch, seq, d]`` → ``[batch, seq, d]`` (full width), in the activations' dtype. Exact
    against the masked reference in eval mode; in training mode the dense layer's ``resid_dropout`` is applied
    to both block outputs as Phi does. ``input_layernorm`` (a :class:`SharedLayerNormGather`) gathers ``attn_in``
    when called alone and ``mlp_in`` when called with that set; it is kept while either block is. A block whose
    output set is empty holds no weights and its attribute (``self_attn`` / ``mlp``) is None (Phi's fc2 always has
    a bias, so an MLP with no intermediate channels still adds it).
    """

    def __init__(self, dense: nn.Module, idx: dict[str, torch.Tensor]):
        super().__init__(dense, idx, DipExtPhiSkippedAttention)
        attn, mlp = dense.self_attn, dense.mlp
        self.resid_dropout = dense.resid_dropout
        self.self_attn = self.mlp = self.input_layernorm = None
        self.mlp_in_idx = IndexSet(idx["mlp_in"])
        if keeps_attention(idx["attn_out"].numel()):
            self.self_attn = compact_attention(attn, idx, ("q_proj", "k_proj", "v_proj"), "dense")
        if keeps_mlp(idx["mlp_mid"].numel(), idx["mlp_out"].numel(), mlp.fc2.bias is not None):
            compact_mlp(mlp, idx, ("fc1",), "fc2")
            self.mlp = mlp
        if self.self_attn is not None or self.mlp is not None:
            norm = dense.input_layernorm
            self.input_layernorm = SharedLayerNormGather(norm.weight, norm.bias, norm.eps, idx["attn_in"])
        # A new module starts in training mode: inherit the dense layer's, or dropout would be live in eval.
        self.train(dense.training)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x = hidden_states
        attn_out = mlp_out = None
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
            attn_out = self.resid_dropout(attn_out)
        else:
            self.skip_attention(x, kwargs)
        if self.mlp is not None:
            mlp_out = self.resid_dropout(self.mlp(self.input_layernorm(x, self.mlp_in_idx)))
        # Both blocks have read x; the first update copies it (the caller may hold it), the second is in place.
        if attn_out is not None:
            x = residual_add(x, self.attn_out_idx, attn_out, inplace=False)
        if mlp_out is not None:
            x = residual_add(x, self.mlp_out_idx, mlp_out, inplace=attn_out is not None)
        return x


class PhiAdapter(FamilyAdapter):
    dense_model = PhiForCausalLM
    layer_class = DipExtPhiDecoderLayer

    def dense_mask_points(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        return block_points((attn.q_proj, attn.k_proj, attn.v_proj), attn.dense, (mlp.fc1,), mlp.fc2)

    def shapes(self, config) -> LayerShapes:
        # PhiAttention reads head_dim when the config has one; every linear of a Phi layer has a bias
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return LayerShapes(q_out=config.num_attention_heads * head_dim, kv_out=kv_heads * head_dim, kv_heads=kv_heads,
                           qkv_bias=True, o_bias=True, mlp_in_linears=1, mlp_in_bias=True, mlp_out_bias=True)


class DipExtPhiConfig(DipExtConfig, PhiConfig):
    """Config of a compacted Phi (see :class:`~dip_ext.families.hf_classes.DipExtConfig`)."""

    model_type = "dip_ext_phi"


class DipExtPhiModel(DipExtModel, PhiModel):
    """A compacted ``PhiModel``, the base model ``AutoModel`` loads (see
    :class:`~dip_ext.families.hf_classes.DipExtModel`)."""

    config_class = DipExtPhiConfig
    disp_adapter = PhiAdapter()


class DipExtPhiForCausalLM(DipExtForCausalLM, PhiForCausalLM):
    """A compacted ``PhiForCausalLM`` (see :class:`~dip_ext.families.hf_classes.DipExtForCausalLM`)."""

    config_class = DipExtPhiConfig
    disp_adapter = DipExtPhiModel.disp_adapter
    disp_base_model = DipExtPhiModel


FAMILY = Family.of(DipExtPhiForCausalLM)
