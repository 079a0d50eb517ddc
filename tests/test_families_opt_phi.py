"""OPT (pre-LN) and Phi (parallel block) DISP: compacted ≡ masked dense reference, with biases everywhere.

Covers full layers (≡ dense), removed attention / MLP, bias-only MLPs (empty mlp_mid), bias-only q/k/v (empty
attn_in), KV-cache decode, left padding, generate, save/load, parameter counts by hand, unsupported variants.
Tiny random configs in fp32.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM, PhiConfig, PhiForCausalLM
from helpers import assert_rel_close, decode_with_cache, dims_of, perturb_norms_and_biases, random_masks

import dip_ext
from dip_ext import STRUCTURES, DispMasks, MaskError, ModelDims, UnsupportedModelError
from dip_ext.families import adapter_for
from dip_ext.params import decoder_linear_params, dense_linear_params

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated",
                                        "ignore:Initializing zero-element tensors is a no-op")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


VOCAB = 64


def opt_config(hidden=32, ffn=64, heads=4, layers=2, **extra):
    return OPTConfig(vocab_size=VOCAB, hidden_size=hidden, ffn_dim=ffn, num_attention_heads=heads,
                     num_hidden_layers=layers, max_position_embeddings=64, word_embed_proj_dim=hidden,
                     pad_token_id=1, bos_token_id=2, eos_token_id=VOCAB - 1, dropout=0.1, **extra)


def phi_config(hidden=32, ffn=64, heads=4, layers=3, **extra):
    return PhiConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                     num_hidden_layers=layers, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                     eos_token_id=VOCAB - 1, **extra)


CONFIGS = {
    "opt-32": lambda: opt_config(),  # tied embeddings (OPT's default)
    "opt-48-untied": lambda: opt_config(48, 80, 6, 3, tie_word_embeddings=False),
    "opt-nobias-eager": lambda: opt_config(enable_bias=False, attn_implementation="eager"),
    "phi-qkln": lambda: phi_config(partial_rotary_factor=0.5, qk_layernorm=True),  # untied (Phi's default)
    "phi-tied-eager": lambda: phi_config(partial_rotary_factor=0.5, qk_layernorm=False, tie_word_embeddings=True,
                                         attn_implementation="eager"),
    "phi-gqa": lambda: phi_config(48, 80, 6, 2, num_key_value_heads=2, partial_rotary_factor=0.75),
}

#: What each layer's sets look like; every mask set below cycles through these so each appears in each family.
SCENARIOS = ("full", "no_attn", "empty_mid", "no_mlp", "empty_attn_in", "random", "nothing")


def make_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CONFIGS[name]()
    model = (OPTForCausalLM if cfg.model_type == "opt" else PhiForCausalLM)(cfg).eval()
    # non-trivial norms and biases so a wrong gather or a lost bias cannot hide
    return perturb_norms_and_biases(model, bias_std=0.2)


#: the sets each scenario empties ("empty_mid": the MLP is fc2's bias alone, on mlp_out rows; "empty_attn_in":
#: q/k/v are their biases alone); "full" keeps every dimension, "random" the random sets
EMPTIED = {"full": (), "no_attn": ("attn_out",), "empty_mid": ("mlp_mid",), "no_mlp": ("mlp_out",),
           "empty_attn_in": ("attn_in",), "random": (), "nothing": ("attn_out", "mlp_out")}


def scenario_masks(dims: ModelDims, offset: int = 0, seed: int = 0, keep: float = 0.6) -> DispMasks:
    """Layer i gets SCENARIOS[(i + offset) % len]; kept sets are random otherwise."""
    kinds = [SCENARIOS[(i + offset) % len(SCENARIOS)] for i in range(dims.num_layers)]
    return random_masks(dims, seed + offset, keep, full=[i for i, k in enumerate(kinds) if k == "full"],
                        empty={i: EMPTIED[k] for i, k in enumerate(kinds)})


def padded_batch(seed=0, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (2, length), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding in row 0
    ids[0, :3] = 1
    return ids, attn


OFFSETS = range(0, len(SCENARIOS), 2)  # with 2-3 layers per model every scenario lands on some layer


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compacted_equals_masked_reference(name):
    dense = make_model(name)
    ids, attn = padded_batch()  # row 1 is unpadded
    keep = attn.bool()  # padded positions are not compared
    with torch.no_grad():
        unmasked = dense(ids, attention_mask=attn).logits
    for offset in OFFSETS:
        masks = scenario_masks(dims_of(dense), offset)
        compacted = dip_ext.compact(copy.deepcopy(dense), masks)
        with torch.no_grad():
            with dip_ext.apply_masks(dense, masks):
                ref = dense(ids, attention_mask=attn).logits
            out = compacted(ids, attention_mask=attn).logits
        assert_rel_close(out[keep], ref[keep])
        assert (unmasked - ref)[keep].abs().max() > 1e-3  # the reference really is pruned


@pytest.mark.parametrize("name", ["opt-32", "phi-qkln"])
def test_full_masks_equal_dense(name):
    dense = make_model(name)
    compacted = dip_ext.compact(copy.deepcopy(dense), DispMasks.full(dims_of(dense)))
    ids, attn = padded_batch()
    with torch.no_grad():
        expected = dense(ids, attention_mask=attn).logits
        assert_rel_close(compacted(ids, attention_mask=attn).logits[attn.bool()], expected[attn.bool()])


@pytest.mark.parametrize("name", ["opt-48-untied", "phi-qkln"])
def test_compacted_layers_hold_no_weights_for_removed_blocks(name):
    dense = make_model(name)
    dims = dims_of(dense)
    masks = scenario_masks(dims, offset=1)  # layers: no_attn, empty_mid, no_mlp
    layers = adapter_for(dense).decoder_layers(dip_ext.compact(copy.deepcopy(dense), masks))
    fc = (lambda layer: layer.fc1) if name.startswith("opt") else (lambda layer: layer.mlp.fc1)
    assert layers[0].self_attn is None
    assert fc(layers[1]).out_features == 0 and fc(layers[1]).weight.numel() == 0
    assert (layers[2].fc2 if name.startswith("opt") else layers[2].mlp) is None


def test_eval_mode_is_inherited():
    # OPT's layers apply dropout to block outputs; a freshly built compacted layer must not be left training
    dense = make_model("opt-32")
    compacted = dip_ext.compact(copy.deepcopy(dense), DispMasks.full(dims_of(dense)))
    assert not any(m.training for m in compacted.modules())


# layer 0 with: no attention (placeholder cache entry) / bias-only q,k,v / full
@pytest.mark.parametrize("name, offset", [("opt-48-untied", 1), ("opt-48-untied", 4), ("opt-nobias-eager", 4), ("opt-32", 0),
                                          ("phi-qkln", 1), ("phi-qkln", 4), ("phi-gqa", 0)])
def test_kv_cache_decode_with_padding(name, offset):
    dense = make_model(name, seed=1)
    ids, attn = padded_batch(1, length=7)
    nxt = torch.randint(3, VOCAB - 1, (2, 4), generator=torch.Generator().manual_seed(5))

    masks = scenario_masks(dims_of(dense), offset)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = decode_with_cache(dense, ids, nxt, attn)
            whole = dense(torch.cat([ids, nxt], 1), attention_mask=torch.cat([attn, torch.ones_like(nxt)], 1))
        out = decode_with_cache(compacted, ids, nxt, attn)
    keep = attn.bool()
    assert_rel_close(out[:, :ids.shape[1]][keep], ref[:, :ids.shape[1]][keep])
    assert_rel_close(out[:, ids.shape[1]:], ref[:, ids.shape[1]:])
    # the unpadded row's cached decode equals one uncached pass over its whole sequence
    assert_rel_close(out[1], whole.logits[1])


@pytest.mark.parametrize("name", ["opt-32", "phi-qkln"])
def test_generate_matches_reference(name):
    dense = make_model(name, seed=2)
    masks = scenario_masks(dims_of(dense), offset=1)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    ids, attn = padded_batch(2, length=5)
    kw = dict(attention_mask=attn, max_new_tokens=8, do_sample=False, pad_token_id=dense.config.pad_token_id,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(ids, **kw)
            ref_nocache = dense.generate(ids, use_cache=False, **kw)
        out = compacted.generate(ids, **kw)
        out_nocache = compacted.generate(ids, use_cache=False, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out_nocache.sequences, ref.sequences) and torch.equal(ref_nocache.sequences, ref.sequences)
    for a, b, c in zip(out.logits, ref.logits, ref_nocache.logits):
        assert_rel_close(a, b)
        assert_rel_close(a, c)


@pytest.mark.parametrize("name", ["opt-32", "opt-48-untied", "phi-qkln", "phi-tied-eager"])
def test_save_load_roundtrip(tmp_path, name):
    dense = make_model(name)
    masks = scenario_masks(dims_of(dense), offset=1)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    compacted.save_pretrained(tmp_path)
    files = {p.name for p in Path(tmp_path).iterdir()}
    assert "model.safetensors" in files and "modeling_dip_ext.py" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == f"dip_ext_{dense.config.model_type}" and "disp_masks" in cfg
    ids, attn = padded_batch()
    keep = attn.bool()
    impl = dict(attn_implementation=compacted.config._attn_implementation)  # not saved in config.json
    with torch.no_grad():
        expected = compacted(ids, attention_mask=attn).logits[keep]
        loaded = dip_ext.from_pretrained(tmp_path, **impl)
        assert torch.equal(loaded(ids, attention_mask=attn).logits[keep], expected)
        assert loaded.disp_masks == masks
        remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, **impl)
        assert type(remote).__name__ in ("DipExtOPTForCausalLM", "DipExtPhiForCausalLM")
        assert torch.equal(remote(ids, attention_mask=attn).logits[keep], expected)
    assert dip_ext.param_report(loaded).decoder_linear == dip_ext.param_report(compacted).decoder_linear
    # the compacted class never hijacks dense loads of the same family
    assert type(AutoModelForCausalLM.from_config(dense.config)) is type(dense)


@pytest.mark.parametrize("name", ["opt-48-untied", "phi-qkln"])
def test_autograd_path_matches_kernels(name):
    dense = make_model(name)
    compacted = dip_ext.compact(copy.deepcopy(dense), scenario_masks(dims_of(dense), offset=4))
    ids, attn = padded_batch()
    with torch.no_grad():
        fast = compacted(ids, attention_mask=attn).logits
    slow = compacted(ids, attention_mask=attn).logits  # grad enabled: the differentiable plain-torch path
    keep = attn.bool()
    assert_rel_close(slow.detach()[keep], fast[keep])
    slow[keep].sum().backward()
    layers = adapter_for(compacted).decoder_layers(compacted)
    assert layers[1].input_layernorm.weight.grad is not None if name.startswith("phi") else \
        layers[1].final_layer_norm.weight.grad is not None


@pytest.mark.parametrize("name", ["opt-32", "phi-qkln"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close(name, dtype):
    dense = make_model(name)
    masks = scenario_masks(dims_of(dense), offset=5)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks).to(dtype)
    dense = dense.to(dtype)
    ids, attn = padded_batch()
    keep = attn.bool()
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense(ids, attention_mask=attn).logits.float()[keep]
        out = compacted(ids, attention_mask=attn).logits.float()[keep]
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() / ref.abs().max() < 0.05


# ---- parameter counts -------------------------------------------------------------------------------------------

def _widths_masks(dims, widths):
    """Masks keeping the first w indices of each set."""
    return DispMasks([{s: torch.arange(w[s]) for s in STRUCTURES} for w in widths])


# layer 0: a partial layer; layer 1: attention removed, MLP reduced to fc2's bias on 6 rows
HAND_WIDTHS = [dict(attn_in=10, attn_out=12, mlp_in=14, mlp_mid=20, mlp_out=16),
               dict(attn_in=8, attn_out=0, mlp_in=9, mlp_mid=0, mlp_out=6)]


def test_param_counts_by_hand_opt():
    # OPT hidden 32, ffn 64, 4 heads, 2 layers, vocab 64, 64 positions (+2 offset rows), tied lm_head
    dense = make_model("opt-32")
    d, ffn = 32, 64
    layer = 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d)  # q,k,v,out_proj + fc1 + fc2, biases incl.
    assert layer == 4 * 1056 + 2112 + 2080 == 8416
    rep = dip_ext.param_report(dense)
    assert rep.decoder_linear == 2 * 8416
    embeds = VOCAB * d + (64 + 2) * d + 2 * d  # tokens, learned positions, final LayerNorm
    assert rep.total == embeds + 2 * (8416 + 2 * 2 * d)  # + two LayerNorms (weight, bias) per layer

    compacted = dip_ext.compact(copy.deepcopy(dense), _widths_masks(dims_of(dense), HAND_WIDTHS))
    # layer 0: q/k/v 3·(10·32 + 32) = 1056, out_proj 32·12 + 12 = 396, fc1 14·20 + 20 = 300, fc2 20·16 + 16 = 336
    # layer 1: no attention; fc1 9·0 + 0 = 0, fc2 0·6 + 6 = 6
    expected = 1056 + 396 + 300 + 336 + 6
    assert expected == 2094
    crep = dip_ext.param_report(compacted)
    assert crep.decoder_linear == decoder_linear_params(compacted) == expected
    assert dense_linear_params(compacted.config, HAND_WIDTHS) == expected
    assert crep.dense_decoder_linear == rep.decoder_linear and crep.dense_total == rep.total
    # layer 1 stores no self_attn_layer_norm (2·32)
    assert crep.total == embeds + 2 * 2 * d + 2 * d + expected
    assert crep.widths == HAND_WIDTHS


def test_param_counts_by_hand_phi_gqa():
    # Phi hidden 48, 6 heads (head_dim 8), 2 kv heads: q_out 48, kv_out 16; ffn 80; 2 layers; untied, biased lm_head
    dense = make_model("phi-gqa")
    d, ffn, q_out, kv_out = 48, 80, 48, 16
    layer = (d * q_out + q_out) + 2 * (d * kv_out + kv_out) + (q_out * d + d) + (d * ffn + ffn) + (ffn * d + d)
    assert layer == 2352 + 2 * 784 + 2352 + 3920 + 3888 == 14080
    rep = dip_ext.param_report(dense)
    assert rep.decoder_linear == 2 * 14080
    outside = VOCAB * d + 2 * d + (VOCAB * d + VOCAB)  # embeddings, final LayerNorm, lm_head with bias
    assert rep.total == outside + 2 * (14080 + 2 * d)  # + one LayerNorm per layer

    compacted = dip_ext.compact(copy.deepcopy(dense), _widths_masks(dims_of(dense), HAND_WIDTHS))
    # layer 0: q 10·48 + 48 = 528, k and v 10·16 + 16 = 176 each, dense 48·12 + 12 = 588,
    #          fc1 14·20 + 20 = 300, fc2 20·16 + 16 = 336
    # layer 1: attention removed; fc2 bias on 6 rows = 6 (its LayerNorm stays: the MLP reads it)
    expected = 528 + 2 * 176 + 588 + 300 + 336 + 6
    assert expected == 2110
    crep = dip_ext.param_report(compacted)
    assert crep.decoder_linear == decoder_linear_params(compacted) == expected
    assert crep.dense_decoder_linear == rep.decoder_linear and crep.dense_total == rep.total
    assert crep.total == outside + 2 * 2 * d + expected


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_formula_matches_stored_modules(name):
    dense = make_model(name)
    for offset in OFFSETS:
        masks = scenario_masks(dims_of(dense), offset)
        compacted = dip_ext.compact(copy.deepcopy(dense), masks)
        assert decoder_linear_params(compacted) == dense_linear_params(compacted.config, masks.widths())


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, match", [
    (dict(do_layer_norm_before=False), "post-LayerNorm"),
    (dict(word_embed_proj_dim=16), "project_in/project_out"),
    (dict(layer_norm_elementwise_affine=False), "layer_norm_elementwise_affine"),
])
def test_unsupported_opt_variants(extra, match):
    cfg = opt_config(**{k: v for k, v in extra.items() if k != "word_embed_proj_dim"})
    for k, v in extra.items():
        setattr(cfg, k, v)
    model = OPTForCausalLM(cfg).eval()
    masks = DispMasks.full(ModelDims(2, 32, 64))
    with pytest.raises(UnsupportedModelError, match=match):
        dip_ext.compact(model, masks)
    with pytest.raises(UnsupportedModelError, match=match):
        dip_ext.apply_masks(model, masks)


def test_masks_for_another_shape():
    model = make_model("phi-qkln")
    with pytest.raises(MaskError, match="out of range"):
        dip_ext.compact(copy.deepcopy(model), DispMasks.full(ModelDims(3, 32, 80)))
    with pytest.raises(MaskError, match="layers"):
        dip_ext.compact(copy.deepcopy(model), DispMasks.full(ModelDims(2, 32, 64)))
