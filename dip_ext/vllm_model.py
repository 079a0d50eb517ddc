"""dip_ext's compacted LLaMA-style models (Llama, Mistral, Qwen2, Qwen3) as native vLLM models.

vLLM finds these classes through dip_ext's ``vllm.general_plugins`` entry point (:mod:`dip_ext.vllm_plugin`), which
registers them under the architectures a saved folder names (``DipExtLlamaForCausalLM`` …): ``vllm serve FOLDER`` and
``LLM(FOLDER)`` then build this module's model instead of going through vLLM's Transformers backend. Only vLLM's
public model interfaces are used (its parallel linears, attention, rotary embedding, vocabulary-parallel embedding and
LM head, ``support_torch_compile``), so the same classes run on the CPU build and on upstream (GPU) vLLM.

Each decoder layer is the compacted layer of :mod:`dip_ext.families.llama_style`, in vLLM's terms::

    x[:, attn_out] += o_proj(attn(rope(qkv_proj(rms_norm(x)[:, attn_in]))))     # dip_ext's norm+gather, scatter-add
    x[:, mlp_out]  += down_proj(silu_and_mul(gate_up_proj(rms_norm(x)[:, mlp_in])))

with every linear at its compacted width (vLLM's column- / row-parallel linears: q/k/v and gate/up fused, heads and
MLP channels split over tensor-parallel ranks, the outputs all-reduced before the scatter-add, the residual stream
replicated), each layer's own query and KV heads when KV groups were pruned (its KV-cache entry follows), and no
module at all for a removed attention or MLP (no KV-cache entry for a layer without attention). Widths that the
tensor-parallel size does not divide are refused when the model is built, naming the layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from . import ops
from .families import family_for
from .families.layers import keeps_attention, keeps_mlp
from .masks import KV_GROUPS, DispMasks

__all__ = ["ARCHITECTURES", "DipExtVllmForCausalLM", "DipExtVllmModel", "DipExtVllmDecoderLayer"]

#: base model type → whether its attention normalises each query / key head (Qwen3's q_norm / k_norm)
QK_NORM = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}
#: the saved folders' architectures this module serves (one per family of :data:`QK_NORM`)
ARCHITECTURES = ("DipExtLlamaForCausalLM", "DipExtMistralForCausalLM", "DipExtQwen2ForCausalLM",
                 "DipExtQwen3ForCausalLM")
#: checkpoint names of the linears vLLM fuses → (fused parameter, shard)
_STACKED = ((".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"),
            (".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1))


def _index_buffer(module: nn.Module, name: str, idx: torch.Tensor) -> None:
    """``idx`` as a non-persistent int64 buffer, made on the device vLLM builds the model on (its default device)."""
    module.register_buffer(name, torch.tensor(idx.tolist(), dtype=torch.int64), persistent=False)


def _heads_fix(tp: int) -> str:
    """How to prune a folder whose kept KV groups ``tp`` ranks cannot split (--multiple-of does not round groups)."""
    return f"or prune it with --heads-multiple-of {tp} (or keeping every KV group: --no-prune-heads)"


def _divisible(layer: int, what: str, size: int, tp: int, fix: str = "") -> None:
    """ValueError (naming the layer) unless ``tp`` tensor-parallel ranks split ``size`` evenly."""
    if size % tp:
        raise ValueError(f"layer {layer} keeps {size} {what}, which tensor parallelism over {tp} ranks cannot split "
                         f"evenly: serve this folder with a tensor-parallel size that divides it, "
                         f"{fix or f'or prune with --multiple-of set to a multiple of {tp}'}")


def layer_index_sets(config) -> list[dict[str, torch.Tensor]]:
    """The per-layer index sets of a compacted config (``config.disp_masks``), checked against the family's space."""
    base = getattr(config, "disp_base_model_type", None)
    if base not in QK_NORM:
        raise ValueError(f"dip_ext's native vLLM model serves compacted {', '.join(sorted(QK_NORM))} folders, not "
                         f"{base!r}: serve it with --trust-remote-code --model-impl transformers")
    with torch.device("cpu"):
        masks = DispMasks.from_config(config.disp_masks).validate(family_for(config).adapter.space(config))
    return masks.layers


class DipExtVllmAttention(nn.Module):
    """A compacted attention: ``[tokens, len(attn_in)]`` → ``[tokens, len(attn_out)]`` (before the scatter-add), with
    this layer's kept query / KV heads."""

    def __init__(self, config, sets: dict[str, torch.Tensor], layer: int, shapes, *, qk_norm: bool,
                 vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_group = config.num_attention_heads // config.num_key_value_heads
        groups = sets[KV_GROUPS].numel() if KV_GROUPS in sets else config.num_key_value_heads
        heads = groups * per_group
        _divisible(layer, "query heads", heads, tp, _heads_fix(tp))
        if (groups % tp if groups >= tp else tp % groups):
            raise ValueError(f"layer {layer} keeps {groups} KV heads, which {tp} tensor-parallel ranks can neither "
                             "split nor replicate evenly: serve it with a tensor-parallel size dividing or divided by "
                             f"{groups}, {_heads_fix(tp)}")
        self.head_dim = head_dim
        self.q_size = heads // tp * head_dim
        self.kv_size = max(1, groups // tp) * head_dim
        self.qkv_proj = QKVParallelLinear(sets["attn_in"].numel(), head_dim, heads, groups, bias=shapes.qkv_bias,
                                          quant_config=vllm_config.quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * head_dim, sets["attn_out"].numel(), bias=shapes.o_bias,
                                        quant_config=vllm_config.quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
                                   is_neox_style=True, rope_parameters=getattr(config, "rope_parameters", None))
        sliding = None
        layer_types = getattr(config, "layer_types", None)
        if layer_types and layer_types[layer] == "sliding_attention":
            sliding = config.sliding_window
        self.attn = Attention(heads // tp, head_dim, head_dim ** -0.5, num_kv_heads=max(1, groups // tp),
                              cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
                              per_layer_sliding_window=sliding, prefix=f"{prefix}.attn")

    def _per_head(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.view(*x.shape[:-1], x.shape[-1] // self.head_dim, self.head_dim)).view(x.shape)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q, k = self._per_head(self.q_norm, q), self._per_head(self.k_norm, k)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class DipExtVllmMLP(nn.Module):
    """A compacted gated MLP: ``[tokens, len(mlp_in)]`` → ``[tokens, len(mlp_out)]`` (before the scatter-add)."""

    def __init__(self, config, sets: dict[str, torch.Tensor], layer: int, shapes, *, vllm_config: VllmConfig,
                 prefix: str):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"dip_ext's native vLLM model runs SiLU-gated MLPs, not hidden_act "
                             f"{config.hidden_act!r}: serve this folder with --trust-remote-code --model-impl "
                             "transformers")
        mid = sets["mlp_mid"].numel()
        _divisible(layer, "MLP channels", mid, get_tensor_model_parallel_world_size())
        self.gate_up_proj = MergedColumnParallelLinear(sets["mlp_in"].numel(), [mid, mid], bias=shapes.mlp_in_bias,
                                                       quant_config=vllm_config.quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(mid, sets["mlp_out"].numel(), bias=shapes.mlp_out_bias,
                                           quant_config=vllm_config.quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class DipExtVllmDecoderLayer(nn.Module):
    """One compacted decoder layer: ``hidden_states [tokens, d]`` (the residual stream, full width) is updated in
    place and returned. A removed block has no module (its attribute and norm are None)."""

    def __init__(self, config, sets: dict[str, torch.Tensor], layer: int, *, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        shapes = family_for(config).adapter.shapes(config)
        self.eps = float(config.rms_norm_eps)
        d = config.hidden_size
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        for name in ("attn_in", "mlp_in"):  # a block that writes must read something
            out = "attn_out" if name == "attn_in" else "mlp_out"
            if sets[out].numel() and not sets[name].numel():
                raise ValueError(f"layer {layer} keeps {out} but reads no input ({name} is empty): dip_ext's native "
                                 "vLLM model does not serve such a block; use --trust-remote-code --model-impl "
                                 "transformers")
        if keeps_attention(sets["attn_out"].numel()):
            self.input_layernorm = nn.Parameter(torch.ones(d), requires_grad=False)
            _index_buffer(self, "attn_in", sets["attn_in"])
            _index_buffer(self, "attn_out", sets["attn_out"])
            self.self_attn = DipExtVllmAttention(config, sets, layer, shapes, qk_norm=QK_NORM[
                config.disp_base_model_type], vllm_config=vllm_config, prefix=f"{prefix}.self_attn")
        mid, out = sets["mlp_mid"].numel(), sets["mlp_out"].numel()
        if keeps_mlp(mid, out, shapes.mlp_out_bias):
            if not mid:
                raise ValueError(f"layer {layer} keeps no MLP channel but adds its down_proj bias: dip_ext's native "
                                 "vLLM model does not serve that; use --trust-remote-code --model-impl transformers")
            self.post_attention_layernorm = nn.Parameter(torch.ones(d), requires_grad=False)
            _index_buffer(self, "mlp_in", sets["mlp_in"])
            _index_buffer(self, "mlp_out", sets["mlp_out"])
            self.mlp = DipExtVllmMLP(config, sets, layer, shapes, vllm_config=vllm_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if self.self_attn is not None:
            h = ops.rms_norm_gather(x, self.input_layernorm, self.attn_in, self.eps, check_idx=False)
            x = ops.scatter_add_(x, self.attn_out, self.self_attn(positions, h), check_idx=False)
        if self.mlp is not None:
            h = ops.rms_norm_gather(x, self.post_attention_layernorm, self.mlp_in, self.eps, check_idx=False)
            x = ops.scatter_add_(x, self.mlp_out, self.mlp(h), check_idx=False)
        return x


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class DipExtVllmModel(nn.Module):
    """The decoder stack: embedding, compacted layers, final norm. ``input_ids [tokens]`` → ``[tokens, d]``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        sets = layer_index_sets(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config)
        self.layers = nn.ModuleList(DipExtVllmDecoderLayer(config, s, i, vllm_config=vllm_config,
                                                           prefix=f"{prefix}.layers.{i}") for i, s in enumerate(sets))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        if inputs_embeds is not None:
            x = x.clone()  # the layers add into the residual stream in place; the caller's tensor stays as it was
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class DipExtVllmForCausalLM(nn.Module):
    """A dip_ext compacted LLaMA-style folder as a vLLM model (``__init__(*, vllm_config, prefix)``, as vLLM builds
    its models): the decoder stack, vLLM's LM head (tied to the embedding when the config says so) and logits.

    ``forward(input_ids [tokens], positions [tokens])`` → hidden states ``[tokens, d]``; ``compute_logits`` →
    ``[tokens, vocab]``. ``load_weights`` reads the folder's safetensors (the compacted matrices, q/k/v and gate/up
    fused as vLLM's linears hold them) and raises ValueError naming a weight this model has no place for.
    """

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = DipExtVllmModel(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, weight in weights:
            if "rotary_emb.inv_freq" in name or (self.config.tie_word_embeddings and name.startswith("lm_head.")):
                continue
            shard = None
            for saved, fused, shard_id in _STACKED:
                if saved in name:
                    name, shard = name.replace(saved, fused), shard_id
                    break
            name = name.replace("layernorm.weight", "layernorm")  # the gather norms hold their weight as the parameter
            param = params.get(name)
            if param is None:
                raise ValueError(f"the checkpoint's weight {name!r} has no place in dip_ext's native vLLM model "
                                 "(a folder this dip_ext did not write?)")
            if shard is None:
                getattr(param, "weight_loader", default_weight_loader)(param, weight)
            else:
                param.weight_loader(param, weight, shard)
            loaded.add(name)
        return loaded
