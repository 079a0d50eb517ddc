"""A model compacted with KV groups pruned (per-layer query and KV heads: vllm_helpers.save_head_pruned) in vLLM.

- Its DeciLM export in stock vLLM (``DeciLMForCausalLM``, ``model_impl="vllm"``): every layer runs its own KV heads
  (and KV-cache entry) as the export writes them (the kept groups, rounded up to a divisor of the query heads), with
  the tokens and log-probabilities of the compacted model.
- The compacted folder itself in vLLM's Transformers backend: vLLM builds every layer's attention (its heads, its
  KV-cache entry) from the config's head counts, the dense model's, while a head-pruned layer's q/k/v have fewer
  heads; its first forward then reshapes them to the wrong head counts (a shape error when the sizes do not divide,
  a wrong attention and memory corruption when they do: seen on this build). Such a folder must be refused when vLLM
  builds it, naming the DeciLM export. The engine is built in a process of its own (nothing runs a forward there).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_helpers import ENGINE_DEFAULTS, KEPT_GROUPS, PROMPTS, greedy, native, prompt_logprobs, save_head_pruned

import dip_ext

MAX_TOKENS = 8
FP32_LOGPROB_ATOL = 1e-4
HEADS, KV_HEADS = 8, 4


@pytest.fixture(scope="module")
def head_pruned(tmp_path_factory):
    """(compacted folder, its DeciLM export)."""
    folder = save_head_pruned(tmp_path_factory.mktemp("head-pruned") / "compacted")
    out = folder.parent / "decilm"
    dip_ext.export_decilm(folder, out)
    return folder, out


def test_decilm_export_serves_the_compacted_tokens_and_logprobs(head_pruned, vllm_engines, dip_ext_reference):
    folder, out = head_pruned
    assert greedy(native(vllm_engines, out), PROMPTS, MAX_TOKENS) == dip_ext_reference.greedy(folder, PROMPTS,
                                                                                             MAX_TOKENS)
    got = prompt_logprobs(native(vllm_engines, out), PROMPTS)
    for prompt, g, e in zip(PROMPTS, got, dip_ext_reference.logprobs(folder, PROMPTS)):
        assert g.shape == e.shape == (len(prompt) - 1,)
        assert (g - e).abs().max() <= FP32_LOGPROB_ATOL


def test_the_engine_runs_each_layers_kv_heads(head_pruned, vllm_engines):
    """vLLM's layers (and KV-cache entries) have the export's per-layer KV heads: layer 0 the zero attention vLLM
    needs first, then 3 kept groups as 4 KV heads, 1 as 1, 2 as 2; every layer all 8 query heads."""
    _, out = head_pruned
    blocks = json.loads((out / "config.json").read_text())["block_configs"]

    def inspect(model):
        attention = [layer.self_attn.attn for layer in model.model.layers]
        return [a.num_kv_heads for a in attention], [a.num_heads for a in attention]

    (kv_heads, heads), = native(vllm_engines, out).apply_model(inspect)
    assert kv_heads == [HEADS // b["attention"]["n_heads_in_group"] for b in blocks]
    assert kv_heads[1:] == [4, 1, 2] and len(KEPT_GROUPS[1]) == 3 and heads == [HEADS] * 4


REFUSAL = """
import sys
from vllm import LLM
kwargs = {kwargs!r}
try:
    LLM({folder!r}, **kwargs)
except Exception as e:  # noqa: BLE001 - vLLM may wrap the model's error
    print("REFUSED", type(e).__name__, e)
    sys.exit(3)
print("BUILT")
"""


def test_transformers_backend_refuses_a_head_pruned_folder_when_it_builds_it(head_pruned, vllm_engines, tmp_path):
    folder, _ = head_pruned
    vllm_engines.close()  # the child's engine gets the machine's memory to itself
    script = tmp_path / "build.py"
    script.write_text(REFUSAL.format(folder=str(folder), kwargs=ENGINE_DEFAULTS))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run = subprocess.run([sys.executable, str(script)], cwd=Path(folder).parent, env=env, capture_output=True,
                         text=True, timeout=600)
    assert "BUILT" not in run.stdout, "vLLM built an engine for a head-pruned folder: its first forward would " \
                                      "read the layers' heads wrong"
    output = run.stdout + run.stderr
    assert run.returncode == 3 and "KV groups" in output and "--to decilm" in output, output[-3000:]
