"""Widths read from the modules, not assumed: configs whose heads × head_dim differ from the hidden size
(Mistral-Nemo, Qwen3, Gemma3), MQA / GQA, biases a family hard-codes or ignores, tied / untied embeddings, a sliding
window shorter than the sequence. Compacted ≡ masked reference (fp32, 1e-5), KV-cache decode included, and the
parameter formula ≡ the dense and compacted modules."""

import copy

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)
from helpers import assert_rel_close, decode_with_cache, dims_of, perturb_norms_and_biases, random_masks

import dip_ext
from dip_ext import STRUCTURES, DispMasks
from dip_ext.families import LayerShapes, adapter_for
from dip_ext.params import decoder_linear_params, dense_linear_params

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")

VOCAB = 64
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
            max_position_embeddings=64, pad_token_id=0)
CASES = {
    # heads × head_dim = 64 ≠ 48, GQA, untied
    "llama-wide-heads-gqa": (LlamaForCausalLM, LlamaConfig(num_attention_heads=4, head_dim=16, num_key_value_heads=2,
                                                            tie_word_embeddings=False, **BASE)),
    # 3 × 12 = 36 ≠ 48, MQA, every bias, tied
    "llama-narrow-heads-mqa-bias": (LlamaForCausalLM, LlamaConfig(num_attention_heads=3, head_dim=12,
                                                                   num_key_value_heads=1, attention_bias=True,
                                                                   mlp_bias=True, tie_word_embeddings=True, **BASE)),
    # Mistral-Nemo-like (4 × 16 ≠ 48), MQA, a sliding window of 4 over 11 tokens
    "mistral-nemo-like-window": (MistralForCausalLM, MistralConfig(num_attention_heads=4, head_dim=16,
                                                                   num_key_value_heads=1, sliding_window=4, **BASE)),
    # Qwen2 hard-codes q/k/v biases and no o_proj bias, whatever attention_bias says
    "qwen2-wide-heads": (Qwen2ForCausalLM, Qwen2Config(num_attention_heads=4, head_dim=16, num_key_value_heads=2,
                                                       attention_bias=False, tie_word_embeddings=False, **BASE)),
    # Qwen3: 4 × 16 ≠ 48, GQA, q/k norms, untied, every layer sliding with a window of 4 over 14 tokens
    "qwen3-wide-heads-window": (Qwen3ForCausalLM, Qwen3Config(num_attention_heads=4, head_dim=16,
                                                              num_key_value_heads=2, use_sliding_window=True,
                                                              sliding_window=4, max_window_layers=0,
                                                              tie_word_embeddings=False, **BASE)),
    # Qwen3 with attention_bias (q/k/v AND o_proj biases), MQA, 3 × 12 ≠ 48, tied, no sliding window
    "qwen3-bias-mqa-tied": (Qwen3ForCausalLM, Qwen3Config(num_attention_heads=3, head_dim=12, num_key_value_heads=1,
                                                          attention_bias=True, tie_word_embeddings=True, **BASE)),
    # Gemma3: MQA, 2 × 32 ≠ 48 (head_dim 256 ≠ 640 / 4 in the 270M), local (window 4) / global / local layers,
    # soft-capping, tied
    "gemma3-mqa-window-softcap": (Gemma3ForCausalLM, Gemma3TextConfig(
        num_attention_heads=2, head_dim=32, num_key_value_heads=1, query_pre_attn_scalar=32, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, tie_word_embeddings=True, **BASE)),
    # Gemma3: GQA with attention_bias, untied, every layer global
    "gemma3-gqa-bias-untied": (Gemma3ForCausalLM, Gemma3TextConfig(
        num_attention_heads=4, head_dim=8, num_key_value_heads=2, attention_bias=True, sliding_window=4,
        layer_types=["full_attention"] * 3, tie_word_embeddings=False, **BASE)),
    # Phi's attention reads head_dim when the config has one
    "phi-head-dim-gqa": (PhiForCausalLM, PhiConfig(num_attention_heads=4, head_dim=16, num_key_value_heads=2,
                                                   partial_rotary_factor=0.5, **BASE)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def make_model(name: str, seed: int = 0):
    model_cls, config = CASES[name]
    torch.manual_seed(seed)
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    return perturb_norms_and_biases(model_cls(config).eval(), bias_std=0.1)


def layer_masks(model, seed: int = 0) -> DispMasks:
    """Layer 0 random, layer 1 without attention, layer 2 without MLP channels (bias only, where there is one)."""
    return random_masks(dims_of(model), seed, 0.6, empty={1: ["attn_out"], 2: ["mlp_mid"]})


def shapes_of_modules(adapter, layer) -> LayerShapes:
    """LayerShapes read off a dense layer's linears."""
    points = adapter.mask_points(layer)
    q, k, v = (m for m, _ in points["attn_in"])
    o = points["attn_out"][0][0]
    ins = [m for m, _ in points["mlp_in"]]
    out = points["mlp_out"][0][0]
    assert v.out_features == k.out_features and o.in_features == q.out_features
    kv_heads = k.out_features // layer.self_attn.head_dim
    return LayerShapes(q_out=q.out_features, kv_out=k.out_features, kv_heads=kv_heads, qkv_bias=q.bias is not None,
                       o_bias=o.bias is not None, mlp_in_linears=len(ins), mlp_in_bias=ins[0].bias is not None,
                       mlp_out_bias=out.bias is not None)


@pytest.mark.parametrize("name", list(CASES))
def test_shapes_and_counts_are_the_modules(name):
    dense = make_model(name)
    adapter = adapter_for(dense)
    layer = adapter.decoder_layers(dense)[0]
    assert adapter.shapes(dense.config) == shapes_of_modules(adapter, layer)
    dims = adapter.dims(dense.config)
    full = {s: dims.size(s) for s in STRUCTURES}
    per_layer = sum(p.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    assert sum(adapter.linear_params(dense.config, full).values()) == per_layer
    masks = layer_masks(dense)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    assert decoder_linear_params(compacted) == dense_linear_params(compacted.config, masks.widths())


@pytest.mark.parametrize("name", list(CASES))
def test_compacted_equals_masked_reference_with_cache(name):
    dense = make_model(name)
    masks = layer_masks(dense)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 11), generator=g)
    nxt = torch.randint(1, VOCAB, (2, 3), generator=g)

    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = decode_with_cache(dense, ids, nxt)
            whole = dense(torch.cat([ids, nxt], 1)).logits
        unmasked = dense(ids).logits
        out = decode_with_cache(compacted, ids, nxt)
    assert_rel_close(out, ref)
    assert_rel_close(out, whole)  # cached decode ≡ one pass over the whole sequence
    assert (unmasked - ref[:, :ids.shape[1]]).abs().max() > 1e-3  # the reference really is pruned


def test_qwen3_and_gemma3_counts_by_hand():
    """Decoder-linear and total parameters of two tiny configs, worked out by hand (d 48, ffn 40, 3 layers)."""
    qwen3 = make_model("qwen3-bias-mqa-tied")  # q 3·12 = 36, k = v 12, biases on q/k/v/o, tied
    per_layer = 48 * (36 + 12 + 12) + (36 + 12 + 12) + 36 * 48 + 48 + 3 * 48 * 40
    norms = 3 * (2 * 48 + 2 * 12) + 48  # input / post-attention norms, q / k norms over head_dim, final norm
    rep = dip_ext.param_report(qwen3)
    assert rep.decoder_linear == 3 * per_layer == 3 * 10476
    assert rep.total == VOCAB * 48 + 3 * per_layer + norms
    gemma = make_model("gemma3-gqa-bias-untied")  # q 4·8 = 32, k = v 2·8 = 16, biases on q/k/v/o, untied
    per_layer = 48 * (32 + 16 + 16) + (32 + 16 + 16) + 32 * 48 + 48 + 3 * 48 * 40
    norms = 3 * (4 * 48 + 2 * 8) + 48  # the sandwich: four norms over d per layer
    rep = dip_ext.param_report(gemma)
    assert rep.decoder_linear == 3 * per_layer
    assert rep.total == 2 * VOCAB * 48 + 3 * per_layer + norms
    # a layer without attention drops its q/k/v/o, q/k norms and both attention norms
    masks = layer_masks(gemma)
    compacted = dip_ext.compact(copy.deepcopy(gemma), masks)
    layer1 = compacted.model.layers[1]
    assert layer1.self_attn is None and layer1.input_layernorm is None and layer1.post_attention_layernorm is None
    w = masks.widths()
    linear = sum(w[i]["attn_in"] * 64 + 64 + 32 * w[i]["attn_out"] + w[i]["attn_out"]
                 if w[i]["attn_out"] else 0 for i in range(3))
    linear += sum(2 * w[i]["mlp_in"] * w[i]["mlp_mid"] + w[i]["mlp_mid"] * w[i]["mlp_out"]
                  if w[i]["mlp_mid"] else 0 for i in range(3))
    assert dip_ext.param_report(compacted).decoder_linear == linear
