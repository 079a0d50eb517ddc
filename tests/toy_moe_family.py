"""A toy model family for the tests, defined outside dip_ext: Llama attention, and in every odd layer a small
mixture of experts (a softmax router weighting every expert's gated MLP) in place of the MLP.

Its prunable space has a structure no built-in family has, ``experts`` (whole experts kept per layer), and layers
that differ: even layers have the five DISP sets, odd layers have ``experts`` instead of ``mlp_mid``. Everything
dip_ext needs to prune it is declared here (the space, where each mask multiplies, what a kept element costs, how
a layer is compacted) and it joins the package through :func:`dip_ext.families.register_family` alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

from dip_ext.families.base import block_points
from dip_ext.families.hf_classes import DipExtConfig, DipExtForCausalLM, DipExtModel, Family
from dip_ext.families.layers import CompactedLayer, SkippedAttention, compact_attention, keeps_attention
from dip_ext.families.llama import LlamaAdapter
from dip_ext.families.llama_style import LlamaStyleLayer
from dip_ext.modules import IndexSet, RMSNormGather, compact_linear
from dip_ext.space import HIDDEN_AXIS, PrunableSpace, Structure

EXPERTS = "experts"


class ToyMoEConfig(LlamaConfig):
    """A Llama config plus the experts of the odd layers: ``num_experts`` of width ``expert_size`` each."""

    model_type = "dip_ext_test_toy_moe"
    num_experts: int = 4
    expert_size: int = 32


def has_experts(layer: int) -> bool:
    return layer % 2 == 1


class ToyExpert(nn.Module):
    """One expert: a gated MLP of ``expert_size`` channels."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        d, f = config.hidden_size, config.expert_size
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RouterProbs(nn.Module):
    """The router's softmax, a module of its own so that the ``experts`` mask multiplies its output."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1)


class ToyExperts(nn.Module):
    """``Σ_e softmax(router(x))_e · expert_e(x)`` over every expert (dense: no top-k)."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.probs = RouterProbs()
        self.experts = nn.ModuleList(ToyExpert(config) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.probs(self.router(x))
        return sum(p[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))


class ToyMoEModel(LlamaModel):
    config_class = ToyMoEConfig

    def __init__(self, config: ToyMoEConfig):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            if has_experts(i):
                layer.mlp = ToyExperts(config)
        self.post_init()


class ToyMoEForCausalLM(LlamaForCausalLM):
    config_class = ToyMoEConfig

    def __init__(self, config: ToyMoEConfig):
        super().__init__(config)
        self.model = ToyMoEModel(config)
        self.post_init()


# ---- compacted ------------------------------------------------------------------------------------------------
class CompactedExperts(nn.Module):
    """The kept experts, reading the kept ``mlp_in`` columns and writing the kept ``mlp_out`` rows; the router keeps
    every expert's row (the softmax runs over all of them, as in the masked reference) and the kept ones are read."""

    def __init__(self, dense: ToyExperts, idx: dict[str, torch.Tensor]):
        super().__init__()
        self.router = compact_linear(dense.router, cols=idx["mlp_in"])
        self.kept = IndexSet(idx[EXPERTS])
        self.experts = nn.ModuleList()
        for e in idx[EXPERTS].tolist():
            expert = dense.experts[e]
            for name in ("gate_proj", "up_proj"):
                setattr(expert, name, compact_linear(getattr(expert, name), cols=idx["mlp_in"]))
            expert.down_proj = compact_linear(expert.down_proj, rows=idx["mlp_out"])
            self.experts.append(expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.router(x).softmax(-1).index_select(-1, self.kept.on(x.device))
        return sum(p[..., j:j + 1] * expert(x) for j, expert in enumerate(self.experts))


class DipExtToySkippedAttention(SkippedAttention, LlamaAttention):
    """Placeholder of a removed toy attention."""


class DipExtToyDecoderLayer(LlamaStyleLayer, LlamaDecoderLayer):
    """A compacted even (dense-MLP) layer: the LLaMA-style layer."""

    skipped_attention_class = DipExtToySkippedAttention


class DipExtToyMoEDecoderLayer(DipExtToyDecoderLayer):
    """A compacted odd layer: the LLaMA-style attention and forward, the experts compacted by
    :class:`CompactedExperts` (removed when no expert or no output row is kept)."""

    def __init__(self, dense: nn.Module, idx: dict[str, torch.Tensor]):
        CompactedLayer.__init__(self, dense, idx, self.skipped_attention_class)
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        if keeps_attention(idx["attn_out"].numel()):
            norm = dense.input_layernorm
            self.input_layernorm = RMSNormGather(norm.weight, norm.variance_epsilon, idx["attn_in"])
            self.self_attn = compact_attention(dense.self_attn, idx, ("q_proj", "k_proj", "v_proj"), "o_proj")
        if idx[EXPERTS].numel() and idx["mlp_out"].numel():
            norm = dense.post_attention_layernorm
            self.post_attention_layernorm = RMSNormGather(norm.weight, norm.variance_epsilon, idx["mlp_in"])
            self.mlp = CompactedExperts(dense.mlp, idx)
        self.train(dense.training)


class ToyMoEAdapter(LlamaAdapter):
    """The toy family: Llama's attention, shapes and checks; its own space, mask points, costs and compaction."""

    dense_model = ToyMoEForCausalLM
    layer_class = DipExtToyDecoderLayer

    def space(self, config) -> PrunableSpace:
        groups = self.shapes(config).kv_heads
        layers = []
        for i in range(config.num_hidden_layers):
            mlp = (Structure(EXPERTS, config.num_experts, EXPERTS, whole_units=True) if has_experts(i)
                   else Structure("mlp_mid", config.intermediate_size, "ffn"))
            hidden = [Structure(s, config.hidden_size, HIDDEN_AXIS) for s in ("attn_in", "attn_out", "mlp_in")]
            layers.append((*hidden, mlp, Structure("mlp_out", config.hidden_size, HIDDEN_AXIS),
                           Structure("kv_groups", groups, "kv_groups", optional=True, whole_units=True)))
        return PrunableSpace(config.hidden_size, tuple(layers))

    def dense_mask_points(self, layer: nn.Module):
        if not isinstance(layer.mlp, ToyExperts):
            return super().dense_mask_points(layer)
        attn, moe = layer.self_attn, layer.mlp
        points = block_points((attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj, (), moe)
        del points["mlp_mid"]
        points["mlp_in"] = [(moe, "input")]
        points[EXPERTS] = [(moe.probs, "output")]
        return points

    def linear_params(self, config, widths: dict, layer: int = 0) -> dict:
        if not has_experts(layer):
            return super().linear_params(config, widths, layer)
        out = super().linear_params(config, {**widths, "mlp_mid": 0}, layer)  # the attention's count
        m_in, experts, m_out = widths["mlp_in"], widths[EXPERTS], widths["mlp_out"]
        out["mlp"] = 0
        if experts > 0 and m_out > 0:
            f = config.expert_size
            out["mlp"] = experts * (2 * m_in * f + f * m_out) + config.num_experts * m_in
        return out

    def compact_layer(self, layer: nn.Module, idx: dict[str, torch.Tensor]) -> nn.Module:
        cls = DipExtToyMoEDecoderLayer if EXPERTS in idx else DipExtToyDecoderLayer
        return cls(layer, idx)


class DipExtToyMoEConfig(DipExtConfig, ToyMoEConfig):
    model_type = "dip_ext_test_toy_moe_compacted"


class DipExtToyMoEModel(DipExtModel, ToyMoEModel):
    config_class = DipExtToyMoEConfig
    disp_adapter = ToyMoEAdapter()


class DipExtToyMoEForCausalLM(DipExtForCausalLM, ToyMoEForCausalLM):
    config_class = DipExtToyMoEConfig
    disp_adapter = DipExtToyMoEModel.disp_adapter
    disp_base_model = DipExtToyMoEModel


FAMILY = Family.of(DipExtToyMoEForCausalLM)
