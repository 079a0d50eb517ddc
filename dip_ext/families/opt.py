"""The OPT family (``OPTForCausalLM``, pre-LayerNorm: OPT-125m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b): its adapter and
its compacted classes.

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
from transformers import OPTConfig, OPTForCausalLM, OPTModel
from transformers.models.opt.modeling_opt import OPTAttention, OPTDecoderLayer

from ..errors import UnsupportedModelError
from ..masks import ModelDims
from ..modules import LayerNormGather, residual_add
from .base import FamilyAdapter, LayerShapes, block_points
from .hf_classes import DipExtConfig, DipExtForCausalLM, DipExtModel, Family
from .layers import CompactedLayer, SkippedAttention, compact_attention, compact_mlp, keeps_attention, keeps_mlp


class DipExtOPTSkippedAttention(SkippedAttention, OPTAttention):
    """Placeholder of a removed OPT attention (see :class:`~dip_ext.families.layers.SkippedAttention`)."""


class DipExtOPTDecoderLayer(CompactedLayer, OPTDecoderLayer):
    """A compacted pre-LayerNorm ``OPTDecoderLayer``; keeps the dense layer's submodule names for its weights.

    ``hidden_states [batch, seq, d]`` → ``[batch, seq, d]`` (full width), in the activations' dtype. Exact
    against the masked reference in eval mode; in training mode the dense layer's dropouts are applied to the
    block outputs as OPT does (before they are added into the residual). A block whose output set is empty
    (or an MLP with no intermediate channels and no fc2 bias) holds no weights: ``self_attn`` (with its norm) or
    ``fc1``/``fc2`` (with ``final_layer_norm``) are None.
    """

    def __init__(self, dense: nn.Module, idx: dict[str, torch.Tensor]):
        super().__init__(dense, idx, DipExtOPTSkippedAttention)
        attn = dense.self_attn
        self.dropout = float(dense.dropout)
        self.activation_fn = dense.activation_fn
        self.self_attn = self.self_attn_layer_norm = None
        self.fc1 = self.fc2 = self.final_layer_norm = None
        if keeps_attention(idx["attn_out"].numel()):
            norm = dense.self_attn_layer_norm
            self.self_attn_layer_norm = LayerNormGather(norm.weight, norm.bias, norm.eps, idx["attn_in"])
            self.self_attn = compact_attention(attn, idx, ("q_proj", "k_proj", "v_proj"), "out_proj")
        if keeps_mlp(idx["mlp_mid"].numel(), idx["mlp_out"].numel(), dense.fc2.bias is not None):
            norm = dense.final_layer_norm
            self.final_layer_norm = LayerNormGather(norm.weight, norm.bias, norm.eps, idx["mlp_in"])
            self.fc1, self.fc2 = dense.fc1, dense.fc2
            compact_mlp(self, idx, ("fc1",), "fc2")
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
            self.skip_attention(x, kwargs)
        if self.fc2 is not None:
            mlp_out = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(x))))
            mlp_out = F.dropout(mlp_out, p=self.dropout, training=self.training)
            x = residual_add(x, self.mlp_out_idx, mlp_out, inplace=owned)
        return x


class OPTAdapter(FamilyAdapter):
    dense_model = OPTForCausalLM
    layer_class = DipExtOPTDecoderLayer

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
        return ModelDims(config.num_hidden_layers, config.hidden_size, config.ffn_dim, config.num_attention_heads)

    def base_layers(self, base_model: nn.Module) -> nn.ModuleList:
        return base_model.decoder.layers

    def dense_mask_points(self, layer: nn.Module):
        attn = layer.self_attn
        return block_points((attn.q_proj, attn.k_proj, attn.v_proj), attn.out_proj, (layer.fc1,), layer.fc2)

    def shapes(self, config) -> LayerShapes:
        # OPTAttention: q, k, v and out_proj are all embed_dim × embed_dim; every linear has enable_bias
        bias = bool(config.enable_bias)
        return LayerShapes(q_out=config.hidden_size, kv_out=config.hidden_size, kv_heads=config.num_attention_heads,
                           qkv_bias=bias, o_bias=bias,
                           mlp_in_linears=1, mlp_in_bias=bias, mlp_out_bias=bias)


class DipExtOPTConfig(DipExtConfig, OPTConfig):
    """Config of a compacted OPT (see :class:`~dip_ext.families.hf_classes.DipExtConfig`)."""

    model_type = "dip_ext_opt"


class DipExtOPTModel(DipExtModel, OPTModel):
    """A compacted ``OPTModel``, the base model ``AutoModel`` loads (see
    :class:`~dip_ext.families.hf_classes.DipExtModel`)."""

    config_class = DipExtOPTConfig
    disp_adapter = OPTAdapter()


class DipExtOPTForCausalLM(DipExtForCausalLM, OPTForCausalLM):
    """A compacted ``OPTForCausalLM`` (see :class:`~dip_ext.families.hf_classes.DipExtForCausalLM`)."""

    config_class = DipExtOPTConfig
    disp_adapter = DipExtOPTModel.disp_adapter
    disp_base_model = DipExtOPTModel


FAMILY = Family.of(DipExtOPTForCausalLM)
