"""Phi decoder layers (``PhiForCausalLM``: Phi-1, Phi-1.5, Phi-2): the PARALLEL block.

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

import torch
from torch import nn

from ..masks import ModelDims
from ..modules import (IndexSet, LayerNormGather, compact_linear,
                       family_layer_class, record_skipped_attention, residual_add)
from .base import FamilyAdapter
from .llama import _LayerBase, _cache_from
from .opt import biased_block_params


class DispPhiDecoderLayer(_LayerBase):
    """A compacted Phi decoder layer; keeps the dense layer's submodule names for its weights.

    ``hidden_states [batch, seq, d]`` → ``[batch, seq, d]`` (full width), in the activations' dtype. Exact
    against the masked reference in eval mode; in training mode the dense layer's ``resid_dropout`` is applied
    to both block outputs as Phi does. ``input_layernorm`` gathers ``attn_in`` when called and ``mlp_in`` through
    :meth:`LayerNormGather.gather`; it is kept while either block is. A block whose output set is empty
    contributes nothing and holds no weights (Phi's fc2 always has a bias, so an MLP with no intermediate
    channels still adds it).
    """

    def __init__(self, dense: nn.Module, idx: dict[str, torch.Tensor]):
        _LayerBase.__init__(self)  # not the dense layer's __init__ (see family_layer_class)
        attn, mlp = dense.self_attn, dense.mlp
        self.layer_idx = attn.layer_idx
        self.resid_dropout = dense.resid_dropout
        self.self_attn = self.mlp = self.input_layernorm = None
        self.attn_out_idx = IndexSet(idx["attn_out"])
        self.mlp_in_idx = IndexSet(idx["mlp_in"])
        self.mlp_out_idx = IndexSet(idx["mlp_out"])

        if idx["attn_out"].numel() > 0:
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, compact_linear(getattr(attn, name), cols=idx["attn_in"]))
            attn.dense = compact_linear(attn.dense, rows=idx["attn_out"])
            self.self_attn = attn
        if idx["mlp_out"].numel() > 0 and (idx["mlp_mid"].numel() > 0 or mlp.fc2.bias is not None):
            mlp.fc1 = compact_linear(mlp.fc1, rows=idx["mlp_mid"], cols=idx["mlp_in"])
            mlp.fc2 = compact_linear(mlp.fc2, rows=idx["mlp_out"], cols=idx["mlp_mid"])
            self.mlp = mlp
        if self.self_attn is not None or self.mlp is not None:
            norm = dense.input_layernorm
            self.input_layernorm = LayerNormGather(norm.weight, norm.bias, norm.eps, idx["attn_in"])
        # A new module starts in training mode: inherit the dense layer's, or dropout would be live in eval.
        self.train(dense.training)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x = hidden_states
        attn_out = mlp_out = None
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
            attn_out = self.resid_dropout(attn_out)
        else:
            record_skipped_attention(_cache_from(kwargs), self.layer_idx, x)
        if self.mlp is not None:
            mlp_out = self.resid_dropout(self.mlp(self.input_layernorm.gather(x, self.mlp_in_idx)))
        # Both blocks have read x; the first update copies it (the caller may hold it), the second is in place.
        if attn_out is not None:
            x = residual_add(x, self.attn_out_idx, attn_out, inplace=False)
        if mlp_out is not None:
            x = residual_add(x, self.mlp_out_idx, mlp_out, inplace=attn_out is not None)
        return x


class PhiAdapter(FamilyAdapter):
    name = "phi"
    model_types = ("phi",)
    architectures = ("PhiForCausalLM",)

    def dims(self, config) -> ModelDims:
        return ModelDims(config.num_hidden_layers, config.hidden_size, config.intermediate_size)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def mask_points(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        return {
            "attn_in": [(attn.q_proj, "input"), (attn.k_proj, "input"), (attn.v_proj, "input")],
            "attn_out": [(attn.dense, "output")],
            "mlp_in": [(mlp.fc1, "input")],
            "mlp_mid": [(mlp.fc2, "input")],
            "mlp_out": [(mlp.fc2, "output")],
        }

    def compact_layer(self, layer: nn.Module, idx: dict[str, torch.Tensor]) -> nn.Module:
        return family_layer_class(DispPhiDecoderLayer, type(layer))(layer, idx)

    def linear_params(self, config, widths: dict[str, int]) -> dict[str, int]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q_out = config.num_attention_heads * head_dim
        kv_out = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
        return biased_block_params(widths, qkv_out=q_out + 2 * kv_out, o_in=q_out, bias=True)
