"""Exports of models compacted with KV groups pruned (``kv_groups`` in the masks: per-layer query and KV heads).

The GGUF file (llama.cpp's ``deci``) carries each layer's query and KV heads as the compacted model keeps them; the
DeciLM folder, whose layers always have every query head, re-lays each layer's kept groups among zero heads (a KV-head
count that divides the query heads, every kept group's query heads first in its new group). Both give the compacted
model's logits (fp32), the DeciLM folder through its own remote code in transformers (prefill and KV-cache decode),
the GGUF file in llama.cpp (llama-cpp-python; skipped without it unless ``DIP_EXT_REQUIRE_LLAMA_CPP=1``). An
attention that is not whole KV groups is refused in one line. (Stock vLLM serves the DeciLM folder:
tests/vllm/test_kv_heads_vllm.py.)

Tiny models: 8 query heads of 16 over 4 KV heads (2 query heads per group; head_dim × heads ≠ hidden), Llama and
Qwen2 (q/k/v biases: a padding head's bias must be zero too), 4 layers keeping the groups of :data:`GROUPS`.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from helpers import (byte_bpe_tokenizer, decode_with_cache, dims_of, perturb_norms_and_biases, random_masks)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import dip_ext
from dip_ext import DispMasks
from dip_ext.masks import KV_GROUPS, STRUCTURES

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op",
                                        "ignore:`past_key_values` is deprecated")

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 16
CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=128, bos_token_id=0,
              eos_token_id=1, initializer_range=0.15, tie_word_embeddings=False)
#: kept KV groups per layer. "subsets": 3 groups (DeciLM: 4 KV heads, one of them zero), 1 group (DeciLM: 1 KV head
#: of 8 query heads, 6 zero), none (attention removed), 2 groups (DeciLM: 2 KV heads of 4 query heads, 2 zero each).
#: "first-removed": layer 0 keeps no group (the engines' first-layer trap), then 2 groups, all 4, 1.
GROUPS = {"subsets": [[1, 2, 3], [2], [], [0, 3]], "first-removed": [[], [1, 3], [0, 1, 2, 3], [2]]}
#: DeciLM's KV heads per layer for each pattern (0: no-op attention; layer 0 of "first-removed": the zero attention
#: vLLM needs, with the KV heads of the first kept attention)
DECILM_KV = {"subsets": [4, 1, 0, 2], "first-removed": [2, 2, 4, 1]}
FAMILIES = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**CONFIG)),
            "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**CONFIG))}
IDS = torch.tensor([[5, 9, 33, 12, 40, 7, 8, 11, 20, 30, 41, 50], [3, 3, 7, 90, 201, 14, 6, 2, 77, 260, 33, 12]])
TEXT = "the cat sat on the mat and ran far away big red house"

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP and os.environ.get("DIP_EXT_REQUIRE_LLAMA_CPP") != "1",
    reason="llama-cpp-python is not installed (make llama-cpp builds it)")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def heads_model(family: str, pattern: str, seed: int = 0):
    """(dense, compacted) ``family`` model keeping the groups of ``GROUPS[pattern]`` and random other sets (every
    layer's MLP kept), norms and biases perturbed (a lost or misplaced bias shows)."""
    import copy

    torch.manual_seed(seed)
    dense = perturb_norms_and_biases(FAMILIES[family]().eval(), bias_std=0.3)
    sets = random_masks(dims_of(dense), seed, 0.7)
    masks = DispMasks([{**{s: layer[s] for s in STRUCTURES}, KV_GROUPS: torch.tensor(g, dtype=torch.long)}
                       for layer, g in zip(sets.layers, GROUPS[pattern])])
    return dense, dip_ext.compact(copy.deepcopy(dense), masks)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def load_decilm(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------------------- DeciLM

@pytest.mark.parametrize("pattern", list(GROUPS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decilm_folder_gives_the_compacted_logits(tmp_path, family, pattern):
    """Prefill logits and KV-cache decode (per-layer KV heads in the cache) equal the compacted model's; the
    block_configs carry each layer's KV heads."""
    _, model = heads_model(family, pattern)
    report = dip_ext.export_decilm(model, tmp_path / "decilm")
    blocks = json.loads((tmp_path / "decilm" / "config.json").read_text())["block_configs"]
    assert [0 if b["attention"]["no_op"] else HEADS // b["attention"]["n_heads_in_group"] for b in blocks] == \
        DECILM_KV[pattern] == report.kv_heads
    exported = load_decilm(tmp_path / "decilm")
    with torch.no_grad():
        assert rel_err(exported(IDS).logits, model(IDS).logits) < 1e-5
        expected = decode_with_cache(model, IDS[:, :6], IDS[:, 6:])
        assert rel_err(decode_with_cache(exported, IDS[:, :6], IDS[:, 6:]), expected) < 1e-5


def test_decilm_padding_heads_are_zeros_and_counted(tmp_path):
    """Each kept group's query heads come first in its new group, the padding heads' q rows, q biases and o_proj
    columns are zero, as are the padding KV heads' k / v rows; the notes name every padded layer; the report counts
    the KV cache the folder's engine holds against the compacted and the dense model's."""
    _, model = heads_model("qwen2", "subsets")
    report = dip_ext.export_decilm(model, tmp_path / "decilm")
    w = load_file(tmp_path / "decilm" / "model.safetensors")

    def head_norms(name, layer, heads):
        t = w[f"model.layers.{layer}.self_attn.{name}"]
        t = t.T if name == "o_proj.weight" else t
        return t.reshape(heads, HEAD_DIM, -1).abs().sum((1, 2)).tolist()

    written = {0: ([0, 1, 2, 3, 4, 5], [0, 1, 2]), 1: ([0, 1], [0]), 3: ([0, 1, 4, 5], [0, 1])}  # real q, kv heads
    for layer, (q_heads, kv_heads) in written.items():
        kv = DECILM_KV["subsets"][layer]
        for name in ("q_proj.weight", "q_proj.bias", "o_proj.weight"):
            assert [n != 0 for n in head_norms(name, layer, HEADS)] == [h in q_heads for h in range(HEADS)], name
        for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            assert [n != 0 for n in head_norms(name, layer, kv)] == [h in kv_heads for h in range(kv)], name
    why = "(a DeciLM layer has every query head, and its KV heads divide their count)"
    assert [n for n in report.notes if "KV groups" in n] == [
        f"layer 0: keeps 3 of 4 KV groups; written as 4 KV heads (1 zero) of 2 query heads each, 2 of the 8 query "
        f"heads zero {why}",
        f"layer 1: keeps 1 of 4 KV groups; written as 1 KV heads (0 zero) of 8 query heads each, 6 of the 8 query "
        f"heads zero {why}",
        f"layer 3: keeps 2 of 4 KV groups; written as 2 KV heads (0 zero) of 4 query heads each, 4 of the 8 query "
        f"heads zero {why}"]
    assert report.query_heads == [HEADS, HEADS, 0, HEADS]
    per_head = 2 * HEAD_DIM  # a key and a value per token
    assert report.kv_cache == {"export": 7 * per_head, "compacted": 6 * per_head, "dense": 16 * per_head}
    assert "KV-cache values per token" in report.table()
    assert report.params["export"] == sum(t.numel() for t in w.values())


# ----------------------------------------------------------------------------------------------------------- GGUF

@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer()


def test_gguf_file_carries_each_layers_heads(tmp_path, tokenizer):
    """head_count / head_count_kv per layer as the compacted model keeps them: no padding head, a KV cache of exactly
    the kept groups (layer 0 of "first-removed": llama.cpp's one-head zero attention)."""
    gguf = pytest.importorskip("gguf")
    for pattern, heads, kv_heads in (("subsets", [6, 2, 0, 4], [3, 1, 0, 2]), ("first-removed", [1, 4, 8, 2],
                                                                             [1, 2, 4, 1])):
        _, model = heads_model("llama", pattern)
        path = tmp_path / f"{pattern}.gguf"
        report = dip_ext.export_gguf(model, path, tokenizer=tokenizer)
        fields = gguf.GGUFReader(str(path)).fields

        def values(key):
            return [int(fields[key].parts[i][0]) for i in fields[key].data]

        assert values("deci.attention.head_count") == heads == report.query_heads
        assert values("deci.attention.head_count_kv") == kv_heads == report.kv_heads
        compacted = 2 * HEAD_DIM * sum(len(g) for g in GROUPS[pattern])
        assert report.kv_cache == {"export": 2 * HEAD_DIM * sum(kv_heads), "compacted": compacted,
                                   "dense": 2 * HEAD_DIM * KV_HEADS * 4}
        assert report.kv_cache["export"] == compacted + (2 * HEAD_DIM if pattern == "first-removed" else 0)


@needs_llama_cpp
@pytest.mark.parametrize("pattern", list(GROUPS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_gives_the_compacted_logits(tmp_path, tokenizer, family, pattern):
    from llama_cpp import Llama

    _, model = heads_model(family, pattern)
    dip_ext.export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    prompt = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    # fp32 KV cache: llama.cpp's default f16 cache would round the keys and values
    llm = Llama(str(tmp_path / "m.gguf"), n_ctx=128, n_threads=1, verbose=False, type_k=0, type_v=0, logits_all=True)
    try:
        llm.eval(prompt)
        scores = torch.from_numpy(np.array(llm.scores[:len(prompt)]))
    finally:
        llm.close()
    assert rel_err(scores, logits) < 2e-5


# ------------------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("to", ["decilm", "gguf"])
def test_an_attention_of_partial_groups_is_refused_in_one_line(tmp_path, tokenizer, to):
    """A compacted attention whose query heads are not whole groups (one query head of layer 1 cut away): no engine
    would pair its heads as the compacted model does. Refused in one line before anything is written."""
    _, model = heads_model("llama", "subsets")
    attn = model.model.layers[1].self_attn
    q = attn.q_proj
    attn.q_proj = torch.nn.Linear(q.in_features, q.out_features - HEAD_DIM, bias=False)
    export = {"decilm": lambda: dip_ext.export_decilm(model, tmp_path / "out"),
              "gguf": lambda: dip_ext.export_gguf(model, tmp_path / "out", tokenizer=tokenizer)}[to]
    with pytest.raises(ValueError, match="cannot export layer 1: its attention keeps 16 query rows and 16 key rows, "
                                         "not whole KV groups of 2 query heads") as e:
        export()
    assert "\n" not in str(e.value) and sorted(p.name for p in tmp_path.iterdir()) == []
