"""The GGUF export (``dip_ext.export_gguf``, ``dip-ext export --to gguf``): in llama.cpp (llama-cpp-python) the file
gives the compacted model's greedy tokens and logits (removed attention in layer 0, a removed MLP, a last layer with
nothing left: each a llama.cpp trap), tokenizes text as the Hugging Face tokenizer does, carries per-layer widths and
head counts, quantizes where the blocks fit; what cannot be exported is refused in one line.

llama-cpp-python is built from its sdist (``make llama-cpp``, a cached wheel after the first build); without it the
llama.cpp tests skip, except where ``DIP_EXT_REQUIRE_LLAMA_CPP=1`` (CI) makes them fail.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from helpers import byte_bpe_tokenizer, export_model, make_word_tokenizer, perturb_norms_and_biases, random_masks, \
    run_cli
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import dip_ext
from dip_ext import UnsupportedModelError
from dip_ext.export_gguf import MARKER_KEY
from dip_ext.families import adapter_for

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP and os.environ.get("DIP_EXT_REQUIRE_LLAMA_CPP") != "1",
    reason="llama-cpp-python is not installed (make llama-cpp builds it)")
TEXT = "the cat sat on the mat and ran far away big red house"
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer()


def qwen2_model():
    torch.manual_seed(0)
    dense = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                         initializer_range=0.15, tie_word_embeddings=False)).eval()
    dense = perturb_norms_and_biases(dense, bias_std=0.3)  # q/k/v biases: a wrong RoPE permutation shows
    masks = random_masks(adapter_for(dense).dims(dense.config), 0, 0.6, empty={0: ["attn_out"], 1: ["mlp_out"],
                                                                              3: ["attn_out", "mlp_out"]})
    return dip_ext.compact(dense, masks)


MODELS = {"llama-tied": lambda: export_model(tie_word_embeddings=True)[1],
          "llama3-rope": lambda: export_model(rope_parameters=LLAMA3_ROPE)[1],
          "qwen2": qwen2_model}


def llama(path, **kwargs):
    from llama_cpp import Llama

    # fp32 KV cache: llama.cpp's default f16 cache would round the keys and values
    return Llama(str(path), n_ctx=128, n_threads=1, verbose=False, type_k=0, type_v=0, **kwargs)


def llama_logits(path, prompt: list[int]) -> torch.Tensor:
    """llama.cpp's logits ``[len(prompt), vocab]`` of every prompt position (one forward)."""
    llm = llama(path, logits_all=True)
    try:
        llm.eval(prompt)
        return torch.from_numpy(np.array(llm.scores[:len(prompt)]))
    finally:
        llm.close()


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


@needs_llama_cpp
@pytest.mark.parametrize("name", list(MODELS))
def test_llama_cpp_gives_the_compacted_tokens_and_logits(tmp_path, tokenizer, name):
    model = MODELS[name]()
    dip_ext.export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    prompt = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        logits = model(torch.tensor([prompt])).logits[0]
    llm = llama(tmp_path / "m.gguf")
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == prompt
        assert greedy(llm, prompt, 12) == expected.tolist()
    finally:
        llm.close()
    scores = llama_logits(tmp_path / "m.gguf", prompt)
    assert float((scores - logits).abs().max() / logits.abs().max()) < 2e-5


def test_the_file_keeps_widths_heads_and_the_workarounds(tmp_path, tokenizer):
    """Per-layer feed_forward_length and head counts as the compacted model has them, except where llama.cpp needs a
    zero block: one head in layer 0 (its attention was removed), one zero channel where the MLP was removed in a layer
    that keeps its attention and in the last layer; the report counts what the file stores."""
    _, model = export_model()
    report = dip_ext.export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))

    def values(key):
        field = reader.fields[key]
        return [int(field.parts[i][0]) for i in field.data]

    widths = [len(layer["mlp_mid"]) for layer in model.disp_masks.to_dict()["layers"]]
    assert values("deci.feed_forward_length") == [widths[0], 1, widths[2], 1]
    assert values("deci.attention.head_count") == [1, 2, 2, 0]
    assert values("deci.attention.head_count_kv") == [1, 1, 1, 0]
    assert report.ffn_widths == [widths[0], 1, widths[2], 1] and report.kv_heads == [1, 1, 1, 0]
    assert len(report.notes) == 3 and MARKER_KEY in reader.fields
    stored = sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert report.params["export"] == stored
    assert not any(t.data.any() for t in reader.tensors if t.name in ("blk.0.attn_output.weight",
                                                                       "blk.1.ffn_down.weight"))


def test_quantize_q8_0_where_blocks_fit(tmp_path, tokenizer):
    _, model = export_model()
    report = dip_ext.export_gguf(model, tmp_path / "q.gguf", tokenizer=tokenizer, quantize="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert types["blk.2.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.2.attn_norm.weight"] == "F32"
    width = len(model.disp_masks.to_dict()["layers"][2]["mlp_mid"])
    # MLP widths are rounded up to whole 32-blocks with zero channels, so down_proj quantizes too
    assert width % 32 and types["blk.2.ffn_down.weight"] == "Q8_0"
    assert report.ffn_widths[2] == -(-width // 32) * 32 and any("rounded up to multiples of 32" in n
                                                                 for n in report.notes)
    assert not any("written F16" in n for n in report.notes)
    if HAVE_LLAMA_CPP:
        prompt = tokenizer(TEXT)["input_ids"]
        scores = llama_logits(tmp_path / "q.gguf", prompt)
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0]
        assert float((scores - logits).abs().max() / logits.abs().max()) < 0.05


@needs_llama_cpp
def test_quantize_k_types_run_llama_cpps_quantizer(tmp_path, tokenizer):
    _, model = export_model()
    report = dip_ext.export_gguf(model, tmp_path / "k.gguf", tokenizer=tokenizer, quantize="q4_k_m")
    assert any("llama.cpp's quantizer" in n for n in report.notes)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors}
    assert "F32" in types and types - {"F32", "F16"}  # the matrices quantized (rows of 64: its fallback types)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.gguf"]
    prompt = tokenizer(TEXT)["input_ids"]
    llm = llama(tmp_path / "k.gguf")
    try:
        assert len(greedy(llm, prompt, 4)) == 4
    finally:
        llm.close()


def test_refusals_are_one_line(tmp_path, tokenizer):
    _, model = export_model()
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32)).eval()
    cases = [(lambda: dip_ext.export_gguf(qwen3, tmp_path / "a.gguf", tokenizer=tokenizer), UnsupportedModelError,
              "cannot export a qwen3 model as a GGUF file"),
             (lambda: dip_ext.export_gguf(model, tmp_path / "b.gguf", tokenizer=make_word_tokenizer()), ValueError,
              "the tokenizer is WordLevel"),
             (lambda: dip_ext.export_gguf(model, tmp_path / "c.gguf"), ValueError, "pass tokenizer="),
             (lambda: dip_ext.export_gguf(model, tmp_path / "d.gguf", tokenizer=tokenizer, quantize="q4_k"),
              ValueError, "quantize must be one of")]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no staging file left


def test_cli_writes_and_never_replaces_a_foreign_file(tmp_path, capsys, tokenizer):
    _, model = export_model()
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    argv = ("export", "--model", tmp_path / "pruned", "--to", "gguf", "--out", tmp_path / "m.gguf")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "linear FLOPs per token" in out and "note: layer 0" in out
    assert run_cli(capsys, *argv)[0] == 2  # exists: refused without --overwrite
    assert run_cli(capsys, *argv, "--overwrite", "--quantize", "f16")[0] == 0
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors} == {"F16", "F32"}
    (tmp_path / "foreign.gguf").write_bytes(b"not written by dip_ext")
    code, _, err = run_cli(capsys, "export", "--model", tmp_path / "pruned", "--to", "gguf", "--out",
                           tmp_path / "foreign.gguf", "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "not written by dip_ext" in err
    assert (tmp_path / "foreign.gguf").read_bytes() == b"not written by dip_ext"
    code, _, err = run_cli(capsys, *argv, "--overwrite", "--dtype", "float16")
    assert code == 2 and "--dtype applies to --to decilm" in err
