"""Llama-family DISP (Llama / Llama-3 / SmolLM2, Mistral, Qwen2): compacted ≡ masked dense reference, KV cache,
padding, generate, save/load, parameter counts, bad input. Tiny random configs, fp32."""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from helpers import assert_rel_close, decode_with_cache, dims_of, perturb_norms_and_biases, random_masks

import dip_ext
from dip_ext import STRUCTURES, DispMasks, MaskError, ModelDims, UnsupportedModelError

BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=6,
            max_position_embeddings=128)

CONFIGS = {
    "llama-mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=6)),
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=1)),
    "llama3-rope": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=3, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 32})),
    "llama-bias": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),
}


def make_model(name: str, attn: str = "sdpa", seed: int = 0):
    cfg_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**BASE, **extra})
    cfg._attn_implementation = attn
    # non-trivial norm weights and biases so a wrong gather cannot hide
    return perturb_norms_and_biases(model_cls(cfg).eval(), bias_std=0.1)


def layer_masks(dims: ModelDims, seed: int = 0, keep: float = 0.6) -> DispMasks:
    """Random sets; layer 0 full, layer 1 without attention, layer 2 without MLP, the rest random."""
    return random_masks(dims, seed, keep, full=[0], empty={1: ["attn_out"], 2: ["mlp_out"]})


def reference_and_compacted(name, attn="sdpa", seed=0):
    dense = make_model(name, attn, seed)
    masks = layer_masks(dims_of(dense), seed)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    return dense, masks, compacted



@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_compacted_equals_masked_reference(name, attn):
    dense, masks, compacted = reference_and_compacted(name, attn)
    ids = torch.randint(0, BASE["vocab_size"], (2, 11))
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense(ids).logits
        out = compacted(ids).logits
    assert_rel_close(out, ref)
    # the reference really is pruned: unmasked dense logits differ
    with torch.no_grad():
        assert (dense(ids).logits - ref).abs().max() > 1e-3


def test_full_masks_equal_dense():
    dense = make_model("llama-gqa")
    compacted = dip_ext.compact(copy.deepcopy(dense), DispMasks.full(dims_of(dense)))
    ids = torch.randint(0, BASE["vocab_size"], (1, 9))
    with torch.no_grad():
        assert_rel_close(compacted(ids).logits, dense(ids).logits)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "mistral"])
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_kv_cache_and_padding(name):
    dense, masks, compacted = reference_and_compacted(name)
    ids = torch.randint(0, BASE["vocab_size"], (2, 8))
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding in row 0
    nxt = torch.randint(0, BASE["vocab_size"], (2, 3))

    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = decode_with_cache(dense, ids, nxt, attn)
            full = dense(torch.cat([ids, nxt], 1), attention_mask=torch.cat([attn, torch.ones_like(nxt)], 1)).logits
        out = decode_with_cache(compacted, ids, nxt, attn)
    assert_rel_close(out, ref)
    # the cached decode agrees with one uncached pass over the whole sequence (ignoring padded positions)
    assert_rel_close(out[1], full[1])


def test_hidden_states_and_layer_classes():
    dense, masks, compacted = reference_and_compacted("llama-gqa")
    ids = torch.randint(0, BASE["vocab_size"], (1, 6))
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense(ids, output_hidden_states=True).hidden_states
        out = compacted(ids, output_hidden_states=True).hidden_states
    assert len(out) == len(ref) == 5
    for a, b in zip(out, ref):
        assert_rel_close(a, b)
    # compacted layers are still decoder layers for HF tooling (device_map no-split, FSDP wrap policies)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    assert all(isinstance(layer, LlamaDecoderLayer) for layer in compacted.model.layers)
    assert type(compacted.model.layers[0]).__name__ in type(compacted)._no_split_modules


def test_generate_matches_reference():
    dense, masks, compacted = reference_and_compacted("llama-gqa", seed=3)
    ids = torch.randint(0, BASE["vocab_size"], (1, 5))
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(ids, max_new_tokens=12, do_sample=False)
        out = compacted.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_save_load_roundtrip(tmp_path, name):
    _, masks, compacted = reference_and_compacted(name)
    compacted.save_pretrained(tmp_path)
    files = {p.name for p in Path(tmp_path).iterdir()}
    assert "model.safetensors" in files and "modeling_dip_ext.py" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"].startswith("dip_ext_") and "disp_masks" in cfg
    ids = torch.randint(0, BASE["vocab_size"], (2, 7))
    with torch.no_grad():
        expected = compacted(ids).logits
        loaded = dip_ext.from_pretrained(tmp_path)
        assert torch.equal(loaded(ids).logits, expected)
        assert loaded.disp_masks == masks
        remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
        assert torch.equal(remote(ids).logits, expected)
    # loading the compacted class never hijacks dense loads of the same family
    assert type(AutoModelForCausalLM.from_config(make_model(name).config)).__name__.startswith(("Llama", "Qwen2"))


def test_autograd_path_matches_kernels():
    _, _, compacted = reference_and_compacted("llama-gqa")
    ids = torch.randint(0, BASE["vocab_size"], (2, 6))
    with torch.no_grad():
        fast = compacted(ids).logits
    slow = compacted(ids).logits  # grad enabled: differentiable plain-torch path
    assert_rel_close(slow.detach(), fast)
    slow.sum().backward()
    assert compacted.model.layers[3].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close(dtype):
    dense, masks, compacted = reference_and_compacted("llama-gqa")
    dense, compacted = dense.to(dtype), compacted.to(dtype)
    ids = torch.randint(0, BASE["vocab_size"], (1, 8))
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense(ids).logits.float()
        out = compacted(ids).logits.float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() / ref.abs().max() < 0.05


def test_param_counts_by_hand_gqa():
    # hidden 48, 6 heads (head_dim 8), 2 kv heads: q_out 48, kv_out 16; ffn 80; vocab 96, tied embeddings
    dense, masks, compacted = reference_and_compacted("llama-gqa")
    q_out, kv_out = 48, 16
    dense_layer = 48 * (q_out + 2 * kv_out) + q_out * 48 + 3 * 48 * 80
    rep = dip_ext.param_report(dense)
    assert rep.decoder_linear == 4 * dense_layer
    assert rep.total == 96 * 48 + 4 * (dense_layer + 2 * 48) + 48  # embeddings (tied) + layers + final norm
    expected = 0
    for w in masks.widths():
        attn = w["attn_in"] * (q_out + 2 * kv_out) + q_out * w["attn_out"] if w["attn_out"] else 0
        mlp = 2 * w["mlp_in"] * w["mlp_mid"] + w["mlp_mid"] * w["mlp_out"] if w["mlp_out"] else 0
        expected += attn + mlp
    crep = dip_ext.param_report(compacted)
    assert crep.decoder_linear == expected
    assert crep.dense_decoder_linear == 4 * dense_layer and crep.dense_total == rep.total
    # layer 1 has no attention and layer 2 no MLP: their norm weights are not stored either
    assert crep.total == rep.total - 4 * dense_layer + expected - 2 * 48
    assert crep.widths == masks.widths()


def test_param_formula_counts_biases():
    _, _, compacted = reference_and_compacted("llama-bias")
    from dip_ext.params import dense_linear_params, decoder_linear_params
    widths = DispMasks.from_config(compacted.config.disp_masks).widths()
    assert decoder_linear_params(compacted) == dense_linear_params(compacted.config, widths)


# ---- masks ----------------------------------------------------------------------------------------------------

def test_masks_dict_roundtrip_and_forms():
    dims = ModelDims(2, 16, 24)
    masks = layer_masks(ModelDims(4, 16, 24)).layers[:2]
    m = DispMasks(masks)
    assert DispMasks.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert DispMasks.from_config(json.loads(json.dumps(m.to_config(dims)))) == m
    bool_masks = [{s: torch.zeros(dims.size(s), dtype=torch.bool).index_fill_(0, layer[s], True) for s in STRUCTURES}
                  for layer in m.layers]
    assert DispMasks.from_masks(bool_masks) == m
    assert DispMasks.from_masks([{s: v.float() for s, v in layer.items()} for layer in bool_masks]) == m
    unsorted = {s: v.flip(0) for s, v in m.layers[1].items()}
    assert DispMasks([m.layers[0], unsorted]) == m  # stored sorted
    assert "mlp_mid" in m.summary(dims) and m.widths()[0]["attn_in"] == 16


@pytest.mark.parametrize("bad, match", [
    ({"layers": [{"attn_in": [1, 1], "attn_out": [], "mlp_in": [], "mlp_mid": [], "mlp_out": []}]}, "duplicate"),
    ({"layers": [{"attn_in": [-1], "attn_out": [], "mlp_in": [], "mlp_mid": [], "mlp_out": []}]}, "negative"),
    ({"layers": [{"attn_in": [1]}]}, "missing"),
    ({"layers": [{"attn_in": [], "attn_out": [], "mlp_in": [], "mlp_mid": [], "mlp_out": [], "x": []}]}, "unknown"),
    ({"nolayers": []}, "layers"),
])
def test_bad_masks(bad, match):
    """Bad index sets are refused when built, sets that do not fit the model's space when checked against it."""
    with pytest.raises(MaskError, match=match):
        DispMasks.from_dict(bad).validate(ModelDims(1, 8, 8))


def test_masks_for_another_model():
    model = make_model("llama-gqa")
    wrong_layers = DispMasks.full(ModelDims(3, 48, 80))
    with pytest.raises(MaskError, match="3 layers but the model has 4"):
        dip_ext.compact(copy.deepcopy(model), wrong_layers)
    wide = DispMasks.full(ModelDims(4, 64, 80))
    with pytest.raises(MaskError, match="out of range for width 48"):
        dip_ext.compact(copy.deepcopy(model), wide)
    with pytest.raises(MaskError, match="out of range"):
        dip_ext.apply_masks(model, wide)


def test_unsupported_architecture():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        dip_ext.compact(gpt2, DispMasks.full(ModelDims(1, 32, 128)))


def test_compact_twice_and_not_a_dip_folder(tmp_path):
    dense, masks, compacted = reference_and_compacted("llama-gqa")
    with pytest.raises(ValueError, match="already compacted"):
        dip_ext.compact(compacted, masks)
    dense.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a dip_ext compacted model"):
        dip_ext.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        dip_ext.from_pretrained(tmp_path / "missing")


def test_corrupt_files(tmp_path):
    _, _, compacted = reference_and_compacted("llama-gqa")
    compacted.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["disp_masks"]["layers"][1]["attn_in"] = "zz"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MaskError, match="not a hex bitmask"):
        dip_ext.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dip_ext.from_pretrained(tmp_path)
