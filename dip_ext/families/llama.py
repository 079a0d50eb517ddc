"""LLaMA-style decoder layers: Llama / Llama-2 / Llama-3 / SmolLM2, Mistral, Qwen2 (GQA is the normal case).

Layer (pre-norm, sequential):  x += o_proj(attn(q,k,v(rms_norm(x))));  x += down(act(gate(h)) * up(h)),
h = rms_norm(x). Compacted, each norm gathers its block's kept inputs and each block scatter-adds its output
into its own subset of the residual.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..masks import ModelDims
from ..modules import (IndexSet, RMSNormGather, compact_linear,
                       family_layer_class, record_skipped_attention, residual_add)
from .base import FamilyAdapter

try:  # gradient checkpointing support for fine-tuning compacted models
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover - older transformers
    _LayerBase = nn.Module


def _cache_from(kwargs: dict):
    # transformers renamed the layer kwarg `past_key_values` to `cache` in 5.2x; accept both.
    return kwargs.get("cache", kwargs.get("past_key_values"))


class DispLlamaDecoderLayer(_LayerBase):
    """A compacted LLaMA-style decoder layer; keeps the dense layer's submodule names for its weights.

    ``hidden_states [batch, seq, d]`` → ``[batch, seq, d]`` (full width). A block whose output set is empty
    (or an MLP with no intermediate channels and no bias) contributes nothing and holds no weights.
    """

    def __init__(self, dense: nn.Module, idx: dict[str, torch.Tensor]):
        _LayerBase.__init__(self)  # not the dense layer's __init__ (see family_layer_class)
        attn, mlp = dense.self_attn, dense.mlp
        self.layer_idx = attn.layer_idx
        if hasattr(dense, "attention_type"):
            self.attention_type = dense.attention_type
        self.self_attn = self.input_layernorm = None
        self.mlp = self.post_attention_layernorm = None
        self.attn_out_idx = IndexSet(idx["attn_out"])
        self.mlp_out_idx = IndexSet(idx["mlp_out"])

        if idx["attn_out"].numel() > 0:
            norm = dense.input_layernorm
            self.input_layernorm = RMSNormGather(norm.weight, norm.variance_epsilon, idx["attn_in"])
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, compact_linear(getattr(attn, name), cols=idx["attn_in"]))
            attn.o_proj = compact_linear(attn.o_proj, rows=idx["attn_out"])
            self.self_attn = attn
        down_bias = mlp.down_proj.bias is not None
        if idx["mlp_out"].numel() > 0 and (idx["mlp_mid"].numel() > 0 or down_bias):
            norm = dense.post_attention_layernorm
            self.post_attention_layernorm = RMSNormGather(norm.weight, norm.variance_epsilon, idx["mlp_in"])
            mlp.gate_proj = compact_linear(mlp.gate_proj, rows=idx["mlp_mid"], cols=idx["mlp_in"])
            mlp.up_proj = compact_linear(mlp.up_proj, rows=idx["mlp_mid"], cols=idx["mlp_in"])
            mlp.down_proj = compact_linear(mlp.down_proj, rows=idx["mlp_out"], cols=idx["mlp_mid"])
            self.mlp = mlp

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x, owned = hidden_states, False
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
            x, owned = residual_add(x, self.attn_out_idx, attn_out, inplace=False), True
        else:
            record_skipped_attention(_cache_from(kwargs), self.layer_idx, x)
        if self.mlp is not None:
            mlp_out = self.mlp(self.post_attention_layernorm(x))
            x = residual_add(x, self.mlp_out_idx, mlp_out, inplace=owned)
        return x


class LlamaAdapter(FamilyAdapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def check_supported(self, config) -> None:
        act = getattr(config, "hidden_act", "silu")
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise UnsupportedModelError("Llama with pretraining_tp > 1 is not supported; set pretraining_tp=1")
        if act is None:
            raise UnsupportedModelError("Llama config without hidden_act")

    def dims(self, config) -> ModelDims:
        return ModelDims(config.num_hidden_layers, config.hidden_size, config.intermediate_size)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def mask_points(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        return {
            "attn_in": [(attn.q_proj, "input"), (attn.k_proj, "input"), (attn.v_proj, "input")],
            "attn_out": [(attn.o_proj, "output")],
            "mlp_in": [(mlp.gate_proj, "input"), (mlp.up_proj, "input")],
            "mlp_mid": [(mlp.down_proj, "input")],
            "mlp_out": [(mlp.down_proj, "output")],
        }

    def compact_layer(self, layer: nn.Module, idx: dict[str, torch.Tensor]) -> nn.Module:
        return family_layer_class(DispLlamaDecoderLayer, type(layer))(layer, idx)

    def linear_params(self, config, widths: dict[str, int]) -> dict[str, int]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q_out = config.num_attention_heads * head_dim
        kv_out = config.num_key_value_heads * head_dim
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        a_in, a_out = widths["attn_in"], widths["attn_out"]
        m_in, mid, m_out = widths["mlp_in"], widths["mlp_mid"], widths["mlp_out"]
        attn = 0
        if a_out > 0:
            attn = a_in * (q_out + 2 * kv_out) + q_out * a_out
            attn += (q_out + 2 * kv_out) * qkv_bias + a_out * o_bias
        mlp = 0
        if m_out > 0 and (mid > 0 or mlp_bias):
            mlp = 2 * m_in * mid + mid * m_out + (2 * mid + m_out) * mlp_bias
        return {"attn": attn, "mlp": mlp}
