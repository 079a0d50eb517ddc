"""The DeciLM export (``dip_ext.export_decilm``, ``dip-ext export --to decilm``): in transformers through the folder's
own remote code, without dip_ext, its logits and greedy tokens equal the compacted model's (Llama, Mistral, Qwen2;
removed attention in layer 0, removed MLP, a layer with nothing left); what it keeps is counted; models that cannot be
exported, and outputs that may not be written, are refused in one line. (Stock vLLM runs the same folders:
tests/vllm/test_decilm_vllm.py.)"""

import json
import subprocess
import sys

import pytest
import torch
from helpers import EXPORT_REMOVED, decode_with_cache, export_model, perturb_norms_and_biases, random_masks, run_cli
from transformers import (AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import dip_ext
from dip_ext import UnsupportedModelError
from dip_ext.families import adapter_for

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op",
                                        "ignore:`past_key_values` is deprecated")

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=128)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def compacted(dense):
    masks = random_masks(adapter_for(dense).dims(dense.config), 0, 0.6, empty=EXPORT_REMOVED)
    return dip_ext.compact(dense, masks)


OTHER_FAMILIES = {
    "mistral": lambda: MistralForCausalLM(MistralConfig(sliding_window=None, **SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),  # q/k/v biases, no o_proj bias
}
REFUSED = {
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=32, **SMALL)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(head_dim=32, query_pre_attn_scalar=32, **SMALL)),
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                            num_attention_heads=2, word_embed_proj_dim=64)),
    "phi": lambda: PhiForCausalLM(PhiConfig(**{**SMALL, "num_key_value_heads": 2})),
}
IDS = torch.tensor([[5, 9, 33, 12, 40, 7, 8, 11, 20, 30, 41, 50], [3, 3, 7, 90, 201, 14, 6, 2, 77, 260, 33, 12]])


def load_export(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def test_transformers_without_dip_ext_gives_the_compacted_logits(tmp_path):
    """The folder's remote code alone (dip_ext made unimportable) reproduces the compacted model: logits to fp32
    rounding, and the same greedy tokens through its KV cache (layer 0 has no attention of its own)."""
    _, model = export_model()
    with torch.no_grad():
        logits = model(IDS).logits
        tokens = model.generate(IDS[:1], max_new_tokens=12, do_sample=False)
    torch.save({"ids": IDS, "logits": logits, "tokens": tokens}, tmp_path / "reference.pt")
    report = dip_ext.export_decilm(model, tmp_path / "decilm")
    assert report.format == "decilm"
    code = f"""
import sys, torch
sys.modules["dip_ext"] = None  # the export must not need dip_ext
from transformers import AutoModelForCausalLM
ref = torch.load({str(tmp_path / "reference.pt")!r})
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "decilm")!r}, trust_remote_code=True, dtype=torch.float32)
m.eval()
assert type(m).__name__ == "DeciLMForCausalLM", type(m)
with torch.no_grad():
    logits = m(ref["ids"]).logits
    tokens = m.generate(ref["ids"][:1], max_new_tokens=12, do_sample=False)
err = float((logits - ref["logits"]).abs().max() / ref["logits"].abs().max())
assert err < 1e-5, err
assert tokens.tolist() == ref["tokens"].tolist(), (tokens.tolist(), ref["tokens"].tolist())
print("ok", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_a_first_layer_removed_whole_keeps_the_kv_cache_in_step(tmp_path):
    """Layer 0 keeps nothing (both blocks no-op): its cache entry still counts the tokens (transformers reads the
    sequence length there), so decoding through the KV cache gives the compacted model's logits."""
    dense, _ = export_model()
    masks = random_masks(adapter_for(dense).dims(dense.config), 0, 0.6, empty={0: ["attn_out", "mlp_out"]})
    model = dip_ext.compact(dense, masks)
    dip_ext.export_decilm(model, tmp_path / "decilm")
    blocks = json.loads((tmp_path / "decilm" / "config.json").read_text())["block_configs"]
    assert blocks[0]["attention"]["no_op"] and blocks[0]["ffn"]["no_op"]
    with torch.no_grad():  # a prefill, then one token at a time: positions come from the cache's length
        expected = decode_with_cache(model, IDS[:, :6], IDS[:, 6:])
        actual = decode_with_cache(load_export(tmp_path / "decilm"), IDS[:, :6], IDS[:, 6:])
    assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_other_llama_shaped_families_export_losslessly(tmp_path, family):
    torch.manual_seed(0)
    model = compacted(perturb_norms_and_biases(OTHER_FAMILIES[family]().eval(), bias_std=0.1))
    dip_ext.export_decilm(model, tmp_path / "decilm")
    with torch.no_grad():
        expected, actual = model(IDS).logits, load_export(tmp_path / "decilm")(IDS).logits
    assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-5


def test_the_folder_keeps_widths_heads_and_removed_blocks(tmp_path):
    """config.json: per-layer widths as intermediate_size (no ffn_mult, which vLLM would read instead), no-op blocks
    where blocks were removed, except the zero attention vLLM needs in the first layer; the report says so and counts
    exactly what the folder stores."""
    _, model = export_model()
    report = dip_ext.export_decilm(model, tmp_path / "decilm")
    config = json.loads((tmp_path / "decilm" / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    widths = [len(layer["mlp_mid"]) for layer in model.disp_masks.to_dict()["layers"]]
    blocks = config["block_configs"]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, True, False, True]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, False, True]  # layer 0: a zero attention
    assert [b["ffn"]["intermediate_size"] for b in blocks if not b["ffn"]["no_op"]] == [widths[0], widths[2]]
    assert all("ffn_mult" not in b["ffn"] for b in blocks)
    assert any("layer 0" in n for n in report.notes)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "decilm" / "model.safetensors")
    assert report.params["export"] == sum(t.numel() for t in stored.values())
    assert not stored["model.layers.0.self_attn.o_proj.weight"].any()
    d, q, kv = 64, 64, 32  # decoder linears: attention d*(q + 2 kv) + q*d per kept (or zero) attention, MLP 3*d*width
    linear = 3 * (d * (q + 2 * kv) + q * d) + 3 * d * (widths[0] + widths[2])
    assert report.decoder_linear == {"export": linear, "compacted": dip_ext.param_report(model).decoder_linear,
                                     "dense": 4 * (d * (q + 2 * kv) + q * d + 3 * d * 96)}
    assert report.linear_flops["export"] == 2 * linear + 2 * 300 * d
    assert json.loads((tmp_path / "decilm" / "export.json").read_text())["params"] == report.params


def test_a_dense_model_exports_to_itself(tmp_path):
    dense, _ = export_model()
    report = dip_ext.export_decilm(dense, tmp_path / "decilm")
    assert report.params["export"] == report.params["dense"] and report.notes[-1].startswith("no tokenizer")
    with torch.no_grad():
        assert torch.allclose(load_export(tmp_path / "decilm")(IDS).logits, dense(IDS).logits, atol=1e-5)


@pytest.mark.parametrize("family", list(REFUSED))
def test_other_families_are_refused_in_one_line(tmp_path, family):
    torch.manual_seed(0)
    model = REFUSED[family]().eval()
    with pytest.raises(UnsupportedModelError, match=f"cannot export a {family} model as a DeciLM folder") as e:
        dip_ext.export_decilm(model, tmp_path / "decilm")
    assert "\n" not in str(e.value) and not (tmp_path / "decilm").exists()


def test_sliding_window_is_refused(tmp_path):
    model = MistralForCausalLM(MistralConfig(sliding_window=16, **SMALL)).eval()
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        dip_ext.export_decilm(model, tmp_path / "decilm")


def test_cli_exports_a_saved_folder_and_refuses_in_one_line(tmp_path, capsys, word_tokenizer):
    _, model = export_model()
    model.save_pretrained(tmp_path / "pruned")
    word_tokenizer.save_pretrained(tmp_path / "pruned")
    code, out, err = run_cli(capsys, "export", "--model", tmp_path / "pruned", "--to", "decilm", "--out",
                             tmp_path / "decilm")
    assert code == 0, err
    assert "decoder-linear parameters" in out and "export/dense" in out
    assert (tmp_path / "decilm" / "tokenizer.json").is_file() and (tmp_path / "decilm" / "modeling_decilm.py").is_file()
    with torch.no_grad():
        assert torch.allclose(load_export(tmp_path / "decilm")(IDS).logits, model(IDS).logits, atol=1e-5)
    # an existing output: refused, replaced with --overwrite (dip_ext wrote it); a foreign folder never
    argv = ("export", "--model", tmp_path / "pruned", "--to", "decilm", "--out", tmp_path / "decilm")
    assert run_cli(capsys, *argv)[0] == 2
    assert run_cli(capsys, *argv, "--overwrite", "--dtype", "bfloat16")[0] == 0
    assert json.loads((tmp_path / "decilm" / "config.json").read_text())["dtype"] == "bfloat16"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, "export", "--model", tmp_path / "pruned", "--to", "decilm", "--out",
                           tmp_path / "mine", "--overwrite")
    assert code == 2 and err.count("\n") == 1 and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    code, _, err = run_cli(capsys, "export", "--model", tmp_path / "pruned", "--to", "decilm", "--quantize", "q8_0",
                           "--out", tmp_path / "other")
    assert code == 2 and "--quantize applies to --to gguf" in err and err.count("\n") == 1


def test_cli_refuses_a_family_before_loading(tmp_path, capsys):
    torch.manual_seed(0)
    REFUSED["qwen3"]().save_pretrained(tmp_path / "qwen3")
    code, _, err = run_cli(capsys, "export", "--model", tmp_path / "qwen3", "--to", "decilm", "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and "cannot export a qwen3 model" in err and "q_norm" in err
