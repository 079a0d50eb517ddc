"""dip_ext's native vLLM model over two tensor-parallel ranks (vLLM's CPU build: two worker processes, one core each):
heads and MLP channels split between the ranks, the block outputs all-reduced before dip_ext's scatter-add into
the replicated residual stream; a layer with one KV head replicates it. Tokens and log-probabilities equal
``dip_ext.from_pretrained``'s, also for a model pruned with ``heads_multiple_of`` 2 by the pipeline. Widths the ranks
cannot split are refused, naming the layer and the option that avoids it, when the model is built.
Engines run in a child process (vLLM's multiprocess executor), one at a time."""

import json
import os
import subprocess
import sys

import torch
from vllm_helpers import HEADS_MODEL, PROMPTS, prune_for_tensor_parallel, save_for_tensor_parallel

from dip_ext import DispMasks
from dip_ext.masks import KV_GROUPS

MAX_TOKENS = 8
FP32_LOGPROB_ATOL = 1e-4

SCRIPT = """
import json, sys, threading
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    try:
        llm = LLM({folder!r}, dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20,
                  seed=0, tensor_parallel_size=2, distributed_executor_backend="mp", skip_tokenizer_init=True)
    except Exception as e:  # noqa: BLE001 - vLLM wraps the worker's error
        print("REFUSED", type(e).__name__, e)
        sys.exit(3)
    prompts = [{{"prompt_token_ids": p}} for p in {prompts!r}]
    greedy = SamplingParams(max_tokens={max_tokens}, temperature=0.0, detokenize=False, ignore_eos=True)
    scored = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0)
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
    logprobs = [[e[t].logprob for e, t in zip(o.prompt_logprobs[1:], p["prompt_token_ids"][1:])]
                for o, p in zip(llm.generate(prompts, scored, use_tqdm=False), prompts)]
    print("RESULT " + json.dumps({{"tokens": tokens, "logprobs": logprobs}}), flush=True)
    # vLLM's client leaves its engine-core shutdown to an exit hook that does not wait for its own daemon threads;
    # one still unwinding out of zmq while the interpreter finalizes aborts the process ("terminate called without
    # an active exception"). Shut down and join them first.
    llm.llm_engine.engine_core.shutdown()
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(timeout=120)
"""


def run_two_ranks(folder, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / f"{folder.name}.py"
    script.write_text(SCRIPT.format(folder=str(folder), prompts=PROMPTS, max_tokens=MAX_TOKENS))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank (vLLM cannot bind two ranks to one NUMA node)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_same_as_dip_ext(run, folder, dip_ext_reference):
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["tokens"] == dip_ext_reference.greedy(folder, PROMPTS, MAX_TOKENS)
    for got, expected in zip(result["logprobs"], dip_ext_reference.logprobs(folder, PROMPTS)):
        assert (torch.tensor(got, dtype=torch.float64) - expected).abs().max() <= FP32_LOGPROB_ATOL


def test_two_ranks_give_dip_ext_tokens_and_logprobs(tmp_path, vllm_engines, dip_ext_reference):
    """Layers keep 0 (attention removed), 2, 1 (one KV head, replicated on both ranks) and 4 KV groups."""
    folder = save_for_tensor_parallel(tmp_path / "tp", ([], [0, 1], [3], [0, 1, 2, 3]))
    vllm_engines.close()  # the ranks get the machine's cores and memory to themselves
    assert_same_as_dip_ext(run_two_ranks(folder, tmp_path), folder, dip_ext_reference)


def test_a_model_pruned_with_heads_multiple_of_two_serves_on_two_ranks(tmp_path, vllm_engines, dip_ext_reference):
    folder = prune_for_tensor_parallel(tmp_path / "tp-pruned", ranks=2)
    config = json.loads((folder / "config.json").read_text())
    groups = [w[KV_GROUPS] for w in DispMasks.from_config(config["disp_masks"]).widths()]
    assert all(g % 2 == 0 for g in groups) and sum(groups) < len(groups) * HEADS_MODEL["num_key_value_heads"], groups
    vllm_engines.close()
    assert_same_as_dip_ext(run_two_ranks(folder, tmp_path), folder, dip_ext_reference)


def test_kv_heads_two_ranks_cannot_share_are_refused_naming_the_layer(tmp_path, vllm_engines):
    folder = save_for_tensor_parallel(tmp_path / "tp-odd", ([], [0, 1, 3], [2], [0, 1, 2, 3]))
    vllm_engines.close()
    run = run_two_ranks(folder, tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "RESULT" not in run.stdout
    assert "layer 1 keeps 3 KV heads" in output and "--heads-multiple-of 2" in output, output[-3000:]
