"""vLLM's engine features over compacted Llama folders (GQA; layer 0 without attention, layer 2 without MLP):
prefix caching with chunked prefill, bf16, a folder saved without the ``AutoModel`` entry, and the README's example
run as users run it (engine and worker in processes of their own, torch.compile on, text through the tokenizer)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from vllm import SamplingParams
from vllm_helpers import PROMPTS, greedy, numbered_word_tokenizer, prompt_logprobs, save_compacted

MAX_TOKENS = 8
README = Path(__file__).resolve().parents[2] / "README.md"
#: bf16 against the fp32 model: log-probabilities, and how far a chosen token may fall short of the argmax. bf16
#: keeps 8 significant bits (relative rounding 2^-9), logits of these models reach ~10: a few hundredths per
#: logit after 4 layers (measured: 0.05 on the log-probabilities, 0.06 short of the argmax); a wrong gather or a
#: lost block moves them by whole units
BF16_LOGPROB_ATOL = 0.15


def test_prefix_caching_and_chunked_prefill_keep_the_tokens(compacted_folder, vllm_engines, dip_ext_reference):
    """A 70-token prompt is prefilled in chunks of at most 32 tokens; prompts sharing its first 64 tokens (two
    32-token blocks) then read those from the prefix cache (the removed attention's blocks included)."""
    folder = compacted_folder("llama")
    engine = dict(block_size=32, enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=32,
                  max_num_seqs=4)
    prefix = (PROMPTS[-1] * 3)[:70]
    assert greedy(vllm_engines.get(folder, **engine), [prefix], MAX_TOKENS) == \
        dip_ext_reference.greedy(folder, [prefix], MAX_TOKENS)
    prompts = [prefix + [5, 6, 7], prefix[:66] + PROMPTS[1], prefix[:40] + [9]]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, detokenize=False, ignore_eos=True)
    outs = vllm_engines.get(folder, **engine).generate([{"prompt_token_ids": p} for p in prompts], params,
                                                       use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [64, 64, 32]
    assert [list(o.outputs[0].token_ids) for o in outs] == dip_ext_reference.greedy(folder, prompts, MAX_TOKENS)


def test_bfloat16_stays_within_bf16_rounding_of_the_model(compacted_folder, vllm_engines, dip_ext_reference):
    """bf16 rounding flips near-ties of a random model's argmax, so the tokens are checked along vLLM's own
    continuations: each is the fp32 model's argmax up to BF16_LOGPROB_ATOL."""
    folder = compacted_folder("llama")
    got = prompt_logprobs(vllm_engines.get(folder, dtype="bfloat16"), PROMPTS)
    for g, e in zip(got, dip_ext_reference.logprobs(folder, PROMPTS)):
        assert (g - e).abs().max() <= BF16_LOGPROB_ATOL
    continuations = greedy(vllm_engines.get(folder, dtype="bfloat16"), PROMPTS, MAX_TOKENS)
    shortfalls = dip_ext_reference.shortfalls(folder, PROMPTS, continuations)
    assert max(float(s.max()) for s in shortfalls) <= BF16_LOGPROB_ATOL


def test_folder_saved_without_the_automodel_entry_serves(compacted_folder, vllm_engines, dip_ext_reference,
                                                         tmp_path):
    """Folders saved before ``auto_map`` named the base model: importing dip_ext (the remote code does) registers
    the base classes with transformers' AutoModel."""
    folder = compacted_folder("llama")
    old = shutil.copytree(folder, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"]["AutoModel"]
    (old / "config.json").write_text(json.dumps(config))
    assert greedy(vllm_engines.get(old), PROMPTS, MAX_TOKENS) == dip_ext_reference.greedy(folder, PROMPTS, MAX_TOKENS)


def readme_vllm_examples() -> list[str]:
    """The README's Python examples fenced as ``python vllm`` (tests/test_readme.py leaves them to this file)."""
    return re.findall(r"^```python vllm\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_example_serves_a_saved_folder(vllm_engines, dip_ext_reference, tmp_path):
    """The README's example, unchanged, as a script in a folder holding a compacted model saved as "pruned", with a
    tokenizer of one word per id. vLLM serves an fp32 checkpoint in bf16 unless told otherwise (and compiles it):
    each printed word is the model's argmax up to bf16 rounding along the printed continuation."""
    (example,) = readme_vllm_examples()
    assert 'LLM("pruned"' in example and "the cat sat on the mat" in example
    tokenizer = numbered_word_tokenizer()
    folder = save_compacted("llama", tmp_path / "pruned", tokenizer=tokenizer)
    vllm_engines.close()  # the script's engine gets the machine to itself
    (tmp_path / "example.py").write_text(example)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB: the default share of the machine's memory may not be free here
    run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    vocabulary = tokenizer.get_vocab()
    (printed,) = [line for line in run.stdout.splitlines() if line.split() and set(line.split()) <= set(vocabulary)]
    continuation = [vocabulary[word] for word in printed.split()]  # vLLM's log lines share the stdout
    assert len(continuation) == 16
    prompt = tokenizer("the cat sat on the mat").input_ids
    (shortfalls,) = dip_ext_reference.shortfalls(folder, [prompt], [continuation])
    assert float(shortfalls.max()) <= BF16_LOGPROB_ATOL
