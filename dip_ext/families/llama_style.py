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
from ..masks import ModelDims
from ..modules import RMSNormGather, compact_linear, residual_add
from .base import FamilyAdapter, LayerShapes
from .layers import CompactedLayer, keeps_attention, keeps_mlp


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
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, compact_linear(getattr(attn, name), cols=idx["attn_in"]))
            attn.o_proj = compact_linear(attn.o_proj, rows=idx["attn_out"])
            self.self_attn = attn
        if keeps_mlp(idx["mlp_mid"].numel(), idx["mlp_out"].numel(), mlp.down_proj.bias is not None):
            norm = dense.post_attention_layernorm
            self.post_attention_layernorm = RMSNormGather(norm.weight, norm.variance_epsilon, idx["mlp_in"])
            mlp.gate_proj = compact_linear(mlp.gate_proj, rows=idx["mlp_mid"], cols=idx["mlp_in"])
            mlp.up_proj = compact_linear(mlp.up_proj, rows=idx["mlp_mid"], cols=idx["mlp_in"])
            mlp.down_proj = compact_linear(mlp.down_proj, rows=idx["mlp_out"], cols=idx["mlp_mid"])
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
    """Adapter of a LLaMA-style family; a family sets the class attributes, ``layer_class`` and :meth:`shapes`."""

    #: The family's compacted decoder layer class (a :class:`LlamaStyleLayer` and its dense layer class).
    layer_class: type

    def check_supported(self, config) -> None:
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise UnsupportedModelError(f"{self.architectures[0]} with pretraining_tp > 1 is not supported; "
                                        "set pretraining_tp=1")
        if getattr(config, "hidden_act", None) is None:
            raise UnsupportedModelError(f"{self.architectures[0]} config without hidden_act")

    def dims(self, config) -> ModelDims:
        return ModelDims(config.num_hidden_layers, config.hidden_size, config.intermediate_size)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def dense_mask_points(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        return {
            "attn_in": [(attn.q_proj, "input"), (attn.k_proj, "input"), (attn.v_proj, "input")],
            "attn_out": [(attn.o_proj, "output")],
            "mlp_in": [(mlp.gate_proj, "input"), (mlp.up_proj, "input")],
            "mlp_mid": [(mlp.down_proj, "input")],
            "mlp_out": [(mlp.down_proj, "output")],
        }

    def compact_layer(self, layer: nn.Module, idx: dict[str, torch.Tensor]) -> nn.Module:
        return self.layer_class(layer, idx)

    @staticmethod
    def gated_shapes(config, head_dim: int, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> LayerShapes:
        """:class:`LayerShapes` of a LLaMA-style layer with this head width and these biases."""
        return LayerShapes(q_out=config.num_attention_heads * head_dim, kv_out=config.num_key_value_heads * head_dim,
                           qkv_bias=qkv_bias, o_bias=o_bias, mlp_in_linears=2, mlp_in_bias=mlp_bias,
                           mlp_out_bias=mlp_bias)
