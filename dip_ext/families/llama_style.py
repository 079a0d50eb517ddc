"""LLaMA-style decoder layers, shared by the Llama, Mistral and Qwen2 families (GQA is the normal case).

Layer (pre-norm, sequential, RMSNorm, gated MLP)::

    x += o_proj(attn(q_proj, k_proj, v_proj(rms_norm(x))))
    x += down_proj(act(gate_proj(h)) * up_proj(h)),   h = rms_norm(x)

Compacted, each norm gathers its block's kept inputs (statistics over the full width) and each block
scatter-adds its output, bias included, into its own subset of the residual. q/k/v keep their whole biases
(heads are untouched), o_proj / down_proj the biases of their kept rows, gate/up those of the kept channels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..modules import RMSNormGather, residual_add
from .base import FamilyAdapter, LayerShapes, block_points
from .layers import CompactedLayer, compact_attention, compact_mlp, keeps_attention, keeps_mlp


class LlamaStyleLayer(CompactedLayer):
    """A compacted LLaMA-style decoder layer; keeps the dense layer's submodule names for its weights.

    ``hidden_states [batch, seq, d]`` → ``[batch, seq, d]`` (full width), in the activations' dtype. A block
    whose output set is empty (or an MLP with no intermediate channels and no down_proj bias) holds no weights
    and its attribute (``self_attn`` / ``mlp``, with its norm) is None.
    """

    #: The family's :class:`~dip_ext.families.layers.SkippedAttention` subclass (set by each family's layer).
    skipped_attention_class: type

    def __init__(self, dense: nn.Module, idx: dict[str, torch.Tensor]):
        super().__init__(dense, idx, self.skipped_attention_class)
        attn, mlp = dense.self_attn, dense.mlp
        self.self_attn = self.input_layernorm = None
        self.mlp = self.post_attention_layernorm = None
        if keeps_attention(idx["attn_out"].numel()):
            norm = dense.input_layernorm
            self.input_layernorm = RMSNormGather(norm.weight, norm.variance_epsilon, idx["attn_in"])
            self.self_attn = compact_attention(attn, idx, ("q_proj", "k_proj", "v_proj"), "o_proj")
        if keeps_mlp(idx["mlp_mid"].numel(), idx["mlp_out"].numel(), mlp.down_proj.bias is not None):
            norm = dense.post_attention_layernorm
            self.post_attention_layernorm = RMSNormGather(norm.weight, norm.variance_epsilon, idx["mlp_in"])
            compact_mlp(mlp, idx, ("gate_proj", "up_proj"), "down_proj")
            self.mlp = mlp
        self.train(dense.training)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x, owned = hidden_states, False
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
            x, owned = residual_add(x, self.attn_out_idx, attn_out, inplace=False), True
        else:
            self.skip_attention(x, kwargs)
        if self.mlp is not None:
            mlp_out = self.mlp(self.post_attention_layernorm(x))
            x = residual_add(x, self.mlp_out_idx, mlp_out, inplace=owned)
        return x


class LlamaStyleAdapter(FamilyAdapter):
    """Adapter of a LLaMA-style family; a family sets ``dense_model``, ``layer_class`` (a :class:`LlamaStyleLayer`
    and its dense layer class) and :meth:`shapes`."""

    # the native vLLM model and both exports serve per-layer head counts of these families
    heads_by_default = True

    def check_supported(self, config) -> None:
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise UnsupportedModelError(f"{self.architectures[0]} with pretraining_tp > 1 is not supported; "
                                        "set pretraining_tp=1")
        if getattr(config, "hidden_act", None) is None:
            raise UnsupportedModelError(f"{self.architectures[0]} config without hidden_act")

    def dense_mask_points(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        return block_points((attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj, (mlp.gate_proj, mlp.up_proj),
                            mlp.down_proj)

    @staticmethod
    def gated_shapes(config, head_dim: int, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> LayerShapes:
        """:class:`LayerShapes` of a LLaMA-style layer with this head width and these biases."""
        return LayerShapes(q_out=config.num_attention_heads * head_dim, kv_out=config.num_key_value_heads * head_dim,
                           kv_heads=config.num_key_value_heads, qkv_bias=qkv_bias, o_bias=o_bias, mlp_in_linears=2,
                           mlp_in_bias=mlp_bias, mlp_out_bias=mlp_bias)
