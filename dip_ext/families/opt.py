"""OPT decoder layers (``OPTForCausalLM``, pre-LayerNorm: OPT-125m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b).

Layer (pre-norm, sequential, LayerNorm with bias, biased linears, learned positions outside the layers):

    x += out_proj(attn(q, k, v(layer_norm(x))))
    x += fc2(act(fc1(layer_norm(x))))                  # act: config.activation_function (ReLU)

Compacted, each LayerNorm gathers its block's kept inputs (statistics over the full width) and each block
scatter-adds its output, bias included, into its own subset of the residual. q/k/v keep their whole biases
(an empty ``attn_in`` still gives them their biases), out_proj/fc2 keep the biases of their kept rows, fc1 the
biases of the kept intermediate channels; an MLP with no intermediate channels still adds fc2's bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..masks import ModelDims
from ..modules import (IndexSet, LayerNormGather, compact_linear,
                       family_layer_class, record_skipped_attention, residual_add)
from .base import FamilyAdapter
from .llama import _LayerBase, _cache_from


def biased_block_params(widths: dict[str, int], *, qkv_out: int, o_in: int, bias: bool) -> dict[str, int]:
    """Stored parameters of one layer of a family with one-matrix MLPs (fc1 → act → fc2), biases included.

    ``qkv_out``: summed output width of q, k and v; ``o_in``: input width of the attention output projection.
    Attention: ``|attn_in|·qkv_out + o_in·|attn_out|`` (+ ``qkv_out + |attn_out|`` biases), stored only when
    ``attn_out`` is non-empty. MLP: ``|mlp_in|·|mlp_mid| + |mlp_mid|·|mlp_out|`` (+ ``|mlp_mid| + |mlp_out|``
    biases), stored when ``mlp_out`` is non-empty and there is an intermediate channel or an fc2 bias.
    """
    a_in, a_out = widths["attn_in"], widths["attn_out"]
    m_in, mid, m_out = widths["mlp_in"], widths["mlp_mid"], widths["mlp_out"]
    attn = a_in * qkv_out + o_in * a_out + (qkv_out + a_out) * bias if a_out > 0 else 0
    mlp = m_in * mid + mid * m_out + (mid + m_out) * bias if m_out > 0 and (mid > 0 or bias) else 0
    return {"attn": attn, "mlp": mlp}


class DispOPTDecoderLayer(_LayerBase):
    """A compacted pre-LayerNorm OPT decoder layer; keeps the dense layer's submodule names for its weights.

    ``hidden_states [batch, seq, d]`` → ``[batch, seq, d]`` (full width), in the activations' dtype. Exact
    against the masked reference in eval mode; in training mode the dense layer's dropouts are applied to the
    block outputs as OPT does (before they are added into the residual). A block whose output set is empty
    (or an MLP with no intermediate channels and no fc2 bias) contributes nothing and holds no weights.
    """

    def __init__(self, dense: nn.Module, idx: dict[str, torch.Tensor]):
        _LayerBase.__init__(self)  # not the dense layer's __init__ (see family_layer_class)
        attn = dense.self_attn
        self.layer_idx = attn.layer_idx
        self.dropout = float(dense.dropout)
        self.activation_fn = dense.activation_fn
        self.self_attn = self.self_attn_layer_norm = None
        self.fc1 = self.fc2 = self.final_layer_norm = None
        self.attn_out_idx = IndexSet(idx["attn_out"])
        self.mlp_out_idx = IndexSet(idx["mlp_out"])

        if idx["attn_out"].numel() > 0:
            norm = dense.self_attn_layer_norm
            self.self_attn_layer_norm = LayerNormGather(norm.weight, norm.bias, norm.eps, idx["attn_in"])
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, compact_linear(getattr(attn, name), cols=idx["attn_in"]))
            attn.out_proj = compact_linear(attn.out_proj, rows=idx["attn_out"])
            self.self_attn = attn
        if idx["mlp_out"].numel() > 0 and (idx["mlp_mid"].numel() > 0 or dense.fc2.bias is not None):
            norm = dense.final_layer_norm
            self.final_layer_norm = LayerNormGather(norm.weight, norm.bias, norm.eps, idx["mlp_in"])
            self.fc1 = compact_linear(dense.fc1, rows=idx["mlp_mid"], cols=idx["mlp_in"])
            self.fc2 = compact_linear(dense.fc2, rows=idx["mlp_out"], cols=idx["mlp_mid"])
        # A new module starts in training mode: inherit the dense layer's, or dropout would be live in eval.
        self.train(dense.training)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        # OPTDecoderLayer consumes use_cache itself and does not hand it to its attention.
        kwargs.pop("use_cache", None)
        x, owned = hidden_states, False
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(hidden_states=self.self_attn_layer_norm(x), **kwargs)
            attn_out = F.dropout(attn_out, p=self.dropout, training=self.training)
            x, owned = residual_add(x, self.attn_out_idx, attn_out, inplace=False), True
        else:
            record_skipped_attention(_cache_from(kwargs), self.layer_idx, x)
        if self.fc2 is not None:
            mlp_out = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(x))))
            mlp_out = F.dropout(mlp_out, p=self.dropout, training=self.training)
            x = residual_add(x, self.mlp_out_idx, mlp_out, inplace=owned)
        return x


class OPTAdapter(FamilyAdapter):
    name = "opt"
    model_types = ("opt",)
    architectures = ("OPTForCausalLM",)

    def check_supported(self, config) -> None:
        if not getattr(config, "do_layer_norm_before", True):
            raise UnsupportedModelError(
                "OPT with post-LayerNorm (do_layer_norm_before=False, e.g. OPT-350m) is not supported: DISP needs "
                "each block to read a normalized copy of the residual stream and add its output back into it, but "
                "post-LN normalizes the residual stream itself after every block")
        proj = getattr(config, "word_embed_proj_dim", None)
        if proj is not None and proj != config.hidden_size:
            raise UnsupportedModelError(
                f"OPT with project_in/project_out (word_embed_proj_dim={proj} != hidden_size={config.hidden_size}, "
                "e.g. OPT-350m) is not supported: the residual stream is not the embedding space")
        if not getattr(config, "layer_norm_elementwise_affine", True):
            raise UnsupportedModelError(
                "OPT with layer_norm_elementwise_affine=False is not supported (no released OPT checkpoint uses it)")

    def dims(self, config) -> ModelDims:
        return ModelDims(config.num_hidden_layers, config.hidden_size, config.ffn_dim)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def mask_points(self, layer: nn.Module):
        attn = layer.self_attn
        return {
            "attn_in": [(attn.q_proj, "input"), (attn.k_proj, "input"), (attn.v_proj, "input")],
            "attn_out": [(attn.out_proj, "output")],
            "mlp_in": [(layer.fc1, "input")],
            "mlp_mid": [(layer.fc2, "input")],
            "mlp_out": [(layer.fc2, "output")],
        }

    def compact_layer(self, layer: nn.Module, idx: dict[str, torch.Tensor]) -> nn.Module:
        return family_layer_class(DispOPTDecoderLayer, type(layer))(layer, idx)

    def linear_params(self, config, widths: dict[str, int]) -> dict[str, int]:
        d = config.hidden_size
        return biased_block_params(widths, qkv_out=3 * d, o_in=d, bias=bool(config.enable_bias))
