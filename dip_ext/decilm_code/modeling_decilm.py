"""DeciLM (Nemotron-NAS) models for transformers, shipped inside a DeciLM folder exported by dip_ext (``auto_map``:
``AutoModelForCausalLM`` -> ``modeling_decilm.DeciLMForCausalLM``, ``AutoModel`` -> ``modeling_decilm.DeciLMModel``).

A Llama model whose layers follow ``config.block_configs``: a layer's attention may be absent (``no_op``) or have its
own key/value heads (``num_attention_heads // n_heads_in_group``), its MLP may be absent or have its own width
(``intermediate_size``). Weight names are Llama's, so vLLM's own ``DeciLMForCausalLM`` loads the same folder.
Self-contained: needs only transformers (>= 5.17) and torch.
"""

import copy

import torch
from torch import nn
from transformers import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm,
                                                      LlamaRotaryEmbedding)

from .configuration_decilm import DeciLMConfig


def _cache_of(kwargs: dict):
    """The KV cache a layer was handed (``cache``, or ``past_key_values`` before transformers renamed it)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


class DeciLMDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer with an optional attention (own KV heads) and an optional MLP (own width).

    A layer without attention still appends one zero key and value per token to its KV-cache entry (``[batch, 1,
    tokens, 1]``): caches read the sequence length from their entries (layer 0's), and nothing reads those zeros.
    """

    def __init__(self, config: DeciLMConfig, layer_idx: int):
        nn.Module.__init__(self)  # not LlamaDecoderLayer's: it would build a full-width attention and MLP
        block = config.block_configs[layer_idx]
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        if not block.attention.no_op:
            attn_config = copy.copy(config)
            attn_config.num_key_value_heads = config.num_attention_heads // block.attention.n_heads_in_group
            self.self_attn = LlamaAttention(config=attn_config, layer_idx=layer_idx)
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not block.ffn.no_op:
            mlp_config = copy.copy(config)
            mlp_config.intermediate_size = block.ffn.intermediate_size
            self.mlp = LlamaMLP(mlp_config)
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states + attn_out
        else:
            cache = _cache_of(kwargs)
            if cache is not None and hasattr(cache, "update"):
                batch, tokens = hidden_states.shape[:2]
                zeros = hidden_states.new_zeros(batch, 1, tokens, 1)
                cache.update(zeros, zeros, self.layer_idx)
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMModel(LlamaModel):
    """``LlamaModel`` with :class:`DeciLMDecoderLayer` layers (its forward is LlamaModel's)."""

    config_class = DeciLMConfig
    _no_split_modules = ["DeciLMDecoderLayer"]

    def __init__(self, config: DeciLMConfig):
        LlamaPreTrainedModel.__init__(self, config)  # LlamaModel's own __init__ would build full-width Llama layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DeciLMForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` over a :class:`DeciLMModel` (its forward and generate are LlamaForCausalLM's)."""

    config_class = DeciLMConfig
    _no_split_modules = ["DeciLMDecoderLayer"]

    def __init__(self, config: DeciLMConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
