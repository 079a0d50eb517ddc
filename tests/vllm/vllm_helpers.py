"""Plain helpers of the vLLM tests (``from vllm_helpers import ...``; this folder's conftest.py puts it on
``sys.path``): tiny compacted models of every family saved as folders, the prompts, an engine pool that keeps one
vLLM engine alive at a time, and the reference side (``dip_ext.from_pretrained``).

The tiny models have head_dim 32 (the smallest head width vLLM's CPU attention takes), fp32 weights, norms and
biases perturbed (a wrong gather or a lost bias cannot hide), and no EOS token (both sides generate exactly the
tokens asked for). Every one has its attention removed in layer 0 and its MLP removed in layer 2
(:data:`REMOVED`), random widths elsewhere.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from helpers import make_word_tokenizer, perturb_norms_and_biases, random_masks
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import dip_ext
from dip_ext.families import adapter_for

VOCAB, LAYERS, HIDDEN, FFN = 128, 4, 128, 192
#: no EOS in the config: dip_ext's generate never stops early (the vLLM side is asked with ignore_eos)
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=0.1)

#: family → its dense model of tiny shapes: GQA (Llama, Qwen2, Qwen3, Phi), MQA
#: (Mistral, Gemma3), heads × head_dim ≠ hidden (Qwen3), biases (Qwen2's q/k/v, OPT, Phi), partial rotary (Phi),
#: sliding-window and global layers with soft-capped logits (Gemma3), LayerNorm with learned positions (OPT)
FAMILY_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=2,
                                                  **COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(intermediate_size=FFN, num_attention_heads=4,
                                                        num_key_value_heads=1, sliding_window=None, **COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=2,
                                                  **COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(intermediate_size=FFN, num_attention_heads=8, num_key_value_heads=2,
                                                  head_dim=32, **COMMON)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=12, layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
        final_logit_softcapping=30.0, **COMMON)),
    "opt": lambda: OPTForCausalLM(OPTConfig(ffn_dim=FFN, num_attention_heads=4, word_embed_proj_dim=HIDDEN,
                                            **COMMON)),
    "phi": lambda: PhiForCausalLM(PhiConfig(intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=2,
                                            partial_rotary_factor=0.5, **COMMON)),
}
#: what every tiny model loses: its attention in layer 0, its MLP in layer 2
REMOVED = {0: ("attn_out",), 2: ("mlp_out",)}

#: 8 prompts of 3 to 30 tokens (ids 2..VOCAB-1); the last two start with the 20-token one
PROMPTS: list[list[int]] = [
    [int(t) for t in torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(n))]
    for n in (3, 5, 8, 11, 14, 20)]
PROMPTS += [PROMPTS[-1] + PROMPTS[2][:4] + [7, 9, 11, 13, 15, 17], PROMPTS[-1] + PROMPTS[1][:4] + [5, 6]]


def numbered_word_tokenizer():
    """A fast tokenizer of VOCAB whitespace-separated words, one per id of the tiny models: "the cat sat on mat",
    then "w5" … "w127"; no special tokens (vLLM decodes every generated id to its word, and never stops early)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on mat".split()
    words += [f"w{i}" for i in range(len(words), VOCAB)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w5"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def save_compacted(family: str, folder: Path, seed: int = 0, tokenizer=None) -> Path:
    """Builds the tiny dense ``family`` model (weights drawn after ``torch.manual_seed(seed)``), compacts it with
    random sets (layer 0 without attention, layer 2 without MLP) and saves it to ``folder`` with ``tokenizer``
    (default: the tests' word tokenizer, whose 20 ids are a part of the model's vocabulary: the tests pass token
    ids); returns ``folder``."""
    torch.manual_seed(seed)
    dense = perturb_norms_and_biases(FAMILY_MODELS[family]().eval(), bias_std=0.1)
    masks = random_masks(adapter_for(dense).dims(dense.config), seed, 0.7, empty=REMOVED)
    dip_ext.compact(dense, masks).save_pretrained(folder)
    (tokenizer or make_word_tokenizer()).save_pretrained(folder)
    return folder


#: the head-pruned tiny Llama of :func:`save_head_pruned`: 8 query heads of 32 over 4 KV heads (2 per group)
HEADS_MODEL = dict(intermediate_size=FFN, num_attention_heads=8, num_key_value_heads=4, head_dim=32, **COMMON)
#: KV groups each layer of it keeps: none in layer 0 (its attention is removed, as in :data:`REMOVED`), 3 of 4, 1, 2
KEPT_GROUPS = ([], [1, 2, 3], [2], [0, 3])


def save_head_pruned(folder: Path, seed: int = 0) -> Path:
    """Like :func:`save_compacted`, a tiny Llama with KV groups pruned (:data:`HEADS_MODEL`, :data:`KEPT_GROUPS`;
    the MLP of layer 2 removed): per-layer query and KV heads. Returns ``folder``."""
    from dip_ext import DispMasks
    from dip_ext.masks import KV_GROUPS, STRUCTURES

    torch.manual_seed(seed)
    dense = perturb_norms_and_biases(LlamaForCausalLM(LlamaConfig(**HEADS_MODEL)).eval())
    sets = random_masks(adapter_for(dense).dims(dense.config), seed, 0.7, empty=REMOVED)
    masks = DispMasks([{**{s: layer[s] for s in STRUCTURES}, KV_GROUPS: torch.tensor(g, dtype=torch.long)}
                       for layer, g in zip(sets.layers, KEPT_GROUPS)])
    dip_ext.compact(dense, masks).save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return folder


def save_for_tensor_parallel(folder: Path, kept_groups, seed: int = 0) -> Path:
    """A tiny Llama (:data:`HEADS_MODEL`) compacted with widths two tensor-parallel ranks split (even MLP channels)
    and the KV groups ``kept_groups[i]`` in layer ``i`` (``[]`` in layer 0: its attention removed). Returns
    ``folder``."""
    from dip_ext import DispMasks
    from dip_ext.masks import KV_GROUPS

    torch.manual_seed(seed)
    dense = perturb_norms_and_biases(LlamaForCausalLM(LlamaConfig(**HEADS_MODEL)).eval())
    g = torch.Generator().manual_seed(seed)

    def pick(n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=g)[:k].sort().values

    layers = [{"attn_in": pick(HIDDEN, 90), "attn_out": pick(HIDDEN, 100 if groups else 0), "mlp_in": pick(HIDDEN, 110),
               "mlp_mid": pick(FFN, 128 + 2 * i), "mlp_out": pick(HIDDEN, 120),
               KV_GROUPS: torch.tensor(groups, dtype=torch.long)} for i, groups in enumerate(kept_groups)]
    dip_ext.compact(dense, DispMasks(layers)).save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return folder


#: per layer, KV groups of :data:`HEADS_MODEL` whose heads barely reach the output (o_proj columns scaled by 1e-3):
#: one-shot drops them first, so without ``heads_multiple_of`` layers would keep 3, 1, 3 and 4 groups
WEAK_GROUPS = ((0,), (1, 2, 3), (2,), ())


def prune_for_tensor_parallel(folder: Path, ranks: int, seed: int = 0) -> Path:
    """A tiny Llama (:data:`HEADS_MODEL`, :data:`WEAK_GROUPS`) pruned by ``dip_ext.prune_and_compact`` (one-shot,
    40 %, KV groups competing) with ``multiple_of`` and ``heads_multiple_of`` both ``ranks`` on random calibration
    ids, saved to ``folder``. Returns ``folder``."""
    torch.manual_seed(seed)
    dense = perturb_norms_and_biases(LlamaForCausalLM(LlamaConfig(**HEADS_MODEL)).eval())
    cols = HEADS_MODEL["num_attention_heads"] // HEADS_MODEL["num_key_value_heads"] * HEADS_MODEL["head_dim"]
    with torch.no_grad():
        for layer, groups in zip(dense.model.layers, WEAK_GROUPS):
            for g in groups:
                layer.self_attn.o_proj.weight[:, g * cols:(g + 1) * cols] *= 1e-3
    ids = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(seed))
    model, _ = dip_ext.prune_and_compact(dense, make_word_tokenizer(), method="oneshot", ratio=0.4, prune_heads=True,
                                        multiple_of=ranks, heads_multiple_of=ranks, calibration=ids, val_windows=0,
                                        seq_len=32, refit="off", recover="off", eval_text=(), progress=False)
    model.save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return folder


def reference(folder, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The saved compacted model as dip_ext loads it (eval mode, ``dtype``)."""
    return dip_ext.from_pretrained(folder, dtype=dtype).eval()


def reference_greedy(model, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """``model.generate`` greedy continuations of ``max_tokens`` tokens, one prompt at a time (no padding)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([list(p)])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def reference_logprobs(model, tokens: Sequence[int]) -> torch.Tensor:
    """``[len(tokens) - 1]`` fp64 log-probabilities the model gives each token after the ones before it."""
    with torch.no_grad():
        logits = model(torch.tensor([list(tokens)])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


class ReferenceProcess:
    """The reference side in a process of its own (``reference_worker.py``, the same interpreter), where no vLLM
    engine ever changed transformers' classes: ``greedy`` / ``logprobs`` of :func:`reference_greedy` /
    :func:`reference_logprobs` on the folder as ``dip_ext.from_pretrained`` loads it. Raises RuntimeError with the
    worker's message when it fails. ``close`` ends the process."""

    def __init__(self):
        worker = Path(__file__).resolve().parent / "reference_worker.py"
        self.process = subprocess.Popen([sys.executable, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def _ask(self, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference worker exited (code {self.process.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"reference worker: {reply['error']}")
        return reply["result"]

    def greedy(self, folder, prompts, max_tokens: int, dtype: str = "float32") -> list[list[int]]:
        return self._ask(op="greedy", folder=str(folder), dtype=dtype, prompts=[list(p) for p in prompts],
                         max_tokens=max_tokens)

    def logprobs(self, folder, prompts, dtype: str = "float32") -> list[torch.Tensor]:
        result = self._ask(op="logprobs", folder=str(folder), dtype=dtype, prompts=[list(p) for p in prompts])
        return [torch.tensor(r, dtype=torch.float64) for r in result]

    def shortfalls(self, folder, prompts, continuations, dtype: str = "float32") -> list[torch.Tensor]:
        """:func:`reference_shortfalls` of each continuation after its prompt."""
        result = self._ask(op="shortfalls", folder=str(folder), dtype=dtype,
                           prompts=[list(p) for p in prompts], continuations=[list(c) for c in continuations])
        return [torch.tensor(r, dtype=torch.float64) for r in result]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def reference_shortfalls(model, tokens: Sequence[int], start: int) -> torch.Tensor:
    """For each token from index ``start`` on, how far (fp64, >= 0) its log-probability after the tokens before it
    falls short of the most likely token's: 0 where it is the model's argmax."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([list(tokens)])).logits[0].double(), -1)
    rows = logprobs[start - 1:-1]
    return rows.max(-1).values - rows.gather(1, torch.tensor(tokens[start:])[:, None])[:, 0]


# ------------------------------------------------------------------------------------------------ vLLM side

#: what every test engine gets unless a test says otherwise: the Transformers backend over the saved remote code,
#: fp32, eager, a small fixed KV cache, one process ("uni" executor)
ENGINE_DEFAULTS = dict(trust_remote_code=True, model_impl="transformers", dtype="float32", enforce_eager=True,
                       max_model_len=256, kv_cache_memory_bytes=64 << 20, seed=0, distributed_executor_backend="uni")


class EnginePool:
    """Keeps at most one vLLM engine alive: ``get`` returns the live engine when it was built from the same folder
    and arguments, else shuts it down and builds the new one. ``close`` shuts the last one down.

    In-process engines share vLLM's process-wide distributed state, which an engine's teardown destroys: the old
    one must be gone before the next is built, so ``close`` raises RuntimeError when something still holds it.
    Tests pass ``vllm_engines.get(...)`` straight to the helpers below rather than keep it in a variable. (A warning
    vLLM logs with its traceback while it builds an engine holds the engine too: pytest keeps every captured log
    record to the end of the session. Without a tokenizer in the folder, vLLM's chat-template warm-up logs one.)
    """

    def __init__(self):
        self.key: Optional[tuple] = None
        self.llm = None

    def get(self, folder, **kwargs):
        """``vllm.LLM(str(folder), **ENGINE_DEFAULTS | kwargs)``, shared while the same is asked for."""
        from vllm import LLM

        args = {**ENGINE_DEFAULTS, **kwargs}
        key = (str(folder), tuple(sorted((k, repr(v)) for k, v in args.items())))
        if key != self.key:
            self.close()
            self.llm = LLM(str(folder), **args)
            self.key = key
        return self.llm

    def close(self) -> None:
        if self.llm is None:
            return
        alive = weakref.ref(self.llm)
        self.llm = self.key = None
        # pytest keeps a failed test's traceback (its frames, which may hold the engine) for post-mortem debugging
        sys.last_type = sys.last_value = sys.last_traceback = None
        gc.collect()
        if alive() is not None:
            raise RuntimeError("the previous vLLM engine is still referenced: it cannot be shut down before the next "
                               "one is built in this process")


def greedy(llm, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """vLLM's greedy continuations of ``prompts`` (token ids, one batch), ``max_tokens`` tokens each."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def prompt_logprobs(llm, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """For each prompt, ``[len - 1]`` fp64 log-probabilities vLLM gives each prompt token after the ones before."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [torch.tensor([entry[t].logprob for entry, t in zip(o.prompt_logprobs[1:], p[1:])], dtype=torch.float64)
            for o, p in zip(outs, prompts)]


def native(vllm_engines, folder):
    """The engine of ``folder`` (a DeciLM export) with vLLM's own model implementation, no dip_ext in the path."""
    return vllm_engines.get(folder, model_impl="vllm", trust_remote_code=True)
