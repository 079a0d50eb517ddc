"""Plain helper functions shared by the test files (``from helpers import ...``; conftest.py puts this folder on
``sys.path``, as pytest's importlib mode does not). Fixtures live in conftest.py.

Tiny models and their inputs (seeded, fp32, CPU), random DISP masks with blocks removed, the comparison the
family tests use (max error relative to the reference's max), a KV-cache decode loop, an offline word-level
tokenizer with a text for it, and :func:`assert_independent` for the references of in-place ops.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dip_ext import STRUCTURES, DispMasks, ModelDims
from dip_ext.families import adapter_for

#: the word-level tokenizer's vocabulary after <unk>=0, <s>=1, </s>=2 (ids 3..19: inside any tiny model's vocab)
WORDS = "the a cat dog sat on mat and ran far away big small red blue house tree".split()

#: the tiny Llama most tests train or prune: 2 layers, d 32, ffn 64, 4 heads over 2 KV heads, vocab 64
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


# ------------------------------------------------------------------------------------------------ models

def tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    """``LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, **config))`` in eval mode, its weights drawn after
    ``torch.manual_seed(seed)`` (transformers' initialisation: norm weights 1, no biases)."""
    cfg = LlamaConfig(**{**TINY_LLAMA, **config})
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def perturb_norms_and_biases(model, bias_std: Optional[float] = None):
    """Makes a wrong gather or a lost bias visible: every norm weight (a parameter whose name contains "norm" and
    ends in "weight") becomes uniform in [0.5, 1.5] and, when ``bias_std`` is given, every other bias
    normal(0, bias_std); drawn from torch's global generator in ``named_parameters()`` order, so the result
    depends only on the seed set before the model was built. Returns ``model``."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif bias_std is not None and n.endswith("bias"):
                p.normal_(0, bias_std)
    return model


def dims_of(model) -> ModelDims:
    """The widths masks of ``model`` are validated against (its family adapter's)."""
    return adapter_for(model).dims(model.config)


# ------------------------------------------------------------------------------------------------- masks

def random_masks(dims: ModelDims, seed: int = 0, keep: float = 0.6, *, full: Iterable[int] = (),
                 empty: Optional[Mapping[int, Iterable[str]]] = None) -> DispMasks:
    """Random index sets: every dimension of every set kept with probability ``keep`` (one
    ``torch.Generator`` seeded with ``seed``, drawn layer by layer in STRUCTURES order, for every layer, so
    ``full`` and ``empty`` change no other layer's sets). Then the layers in ``full`` keep every dimension, and
    ``empty[i]`` names the sets of layer ``i`` that keep none (``attn_out``: attention removed, ``mlp_out``: MLP
    removed, ``mlp_mid``: the MLP is its output bias alone, ``attn_in``: q/k/v are their biases alone)."""
    g = torch.Generator().manual_seed(seed)
    full, empty = set(full), dict(empty or {})
    layers = []
    for i in range(dims.num_layers):
        layer = {s: (torch.rand(dims.size(s), generator=g) < keep).nonzero().flatten() for s in STRUCTURES}
        if i in full:
            layer = {s: torch.arange(dims.size(s)) for s in STRUCTURES}
        for s in empty.get(i, ()):
            layer[s] = torch.empty(0, dtype=torch.long)
        layers.append(layer)
    return DispMasks(layers)


# ------------------------------------------------------------------------------------------ comparisons

def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """``max |actual - expected| <= rtol * max |expected|`` (the scale floored at 1e-6): compacted vs masked
    reference in fp32, where an elementwise tolerance would be dominated by near-zero logits."""
    scale = expected.abs().max().clamp_min(1e-6)
    err = float((actual - expected).abs().max() / scale)
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def assert_independent(reference: torch.Tensor, output: torch.Tensor) -> None:
    """Fails when ``reference`` and ``output`` share memory (their storages' byte ranges overlap on one device).

    A test of an in-place op must build its reference from memory the op does not write: a view of the input
    (``x[1:]``, ``x.view(...)``, ``x.T``, ``x.detach()``) or a conversion that returns the tensor itself
    (``x.float()`` of an fp32 ``x``, ``x.to(x.dtype)``, ``x.contiguous()`` of a contiguous ``x``) would be
    overwritten along with the output and make any comparison pass. Call it on the reference and the op's
    output (or the tensor the op writes in place). ``x.clone()``, ``x.double()`` and the like pass.
    """
    for name, t in (("reference", reference), ("output", output)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if reference.device != output.device:
        return
    a, b = reference.untyped_storage(), output.untyped_storage()
    a0, a1 = a.data_ptr(), a.data_ptr() + a.nbytes()
    b0, b1 = b.data_ptr(), b.data_ptr() + b.nbytes()
    assert not (a.nbytes() and b.nbytes() and a0 < b1 and b0 < a1), (
        "the reference shares storage with the output (a view, or a no-op conversion such as .float() of an "
        "fp32 tensor): an in-place op would change both; build the reference from a .clone()")


def hide_module(monkeypatch, name: str) -> None:
    """Makes ``importlib.util.find_spec(name)`` return None for the rest of the test (``monkeypatch`` undoes it):
    the code under test sees the optional package ``name`` as not installed."""
    real = importlib.util.find_spec

    def find_spec(n, *a, **k):
        return None if n == name else real(n, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def assert_lora_merges_exactly(peft, compacted, ids: torch.Tensor):
    """Wraps ``compacted`` in a peft LoRA of rank 4 (non-zero adapters, peft's default target modules), checks that
    the adapters change its logits and that ``merge_and_unload`` reproduces them; returns ``(peft config, merged
    model)``."""
    with torch.no_grad():
        base = compacted(ids).logits
    model = peft.get_peft_model(compacted, peft.LoraConfig(r=4, init_lora_weights=False))
    config = model.peft_config["default"]
    model.eval()
    with torch.no_grad():
        lora = model(ids).logits
        merged = model.merge_and_unload()
        out = merged(ids).logits
    assert (lora - base).abs().max() > 1e-3  # the adapters really change the model
    assert_rel_close(out, lora)
    return config, merged


# ------------------------------------------------------------------------------------------------ decode

def decode_with_cache(model, ids: torch.Tensor, nxt: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits ``[batch, len(ids) + len(nxt), vocab]`` of a prefill of ``ids`` followed by ``nxt`` fed one token at
    a time through the model's KV cache (``use_cache=True``); with ``attention_mask`` (the prompt's, e.g. left
    padding), each new token's mask is that mask extended by ones."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    out = model(ids, use_cache=True, **kw)
    logits, cache, mask = [out.logits], out.past_key_values, attention_mask
    for t in range(nxt.shape[1]):
        if mask is not None:
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
            kw = {"attention_mask": mask}
        out = model(nxt[:, t:t + 1], past_key_values=cache, use_cache=True, **kw)
        logits.append(out.logits)
        cache = out.past_key_values
    return torch.cat(logits, 1)


# ----------------------------------------------------------------------------------------- words, text

def make_word_tokenizer(bos_template: bool = False, pad_token: Optional[str] = "<unk>"):
    """A fast tokenizer built offline: whitespace words over WORDS, bos <s>, eos </s>, pad = unk (``pad_token``,
    None: no pad token); ``bos_template``: it prepends <s> by itself, as Llama-2's does.

    A plain function (the ``word_tokenizer`` fixture calls it) so scripts outside pytest, such as
    ``tests/golden/regenerate.py``, build exactly the same tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_template:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    pad = {} if pad_token is None else {"pad_token": pad_token}
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **pad)


def write_word_text(folder) -> str:
    """Writes 12 paragraphs of 40 random WORDS (seeded) to ``folder/words.txt``; returns ``file:PATH``.

    ~380 calibration and ~100 held-out tokens. A plain function for the same reason as :func:`make_word_tokenizer`.
    """
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(12)]
    path = Path(folder) / "words.txt"
    path.write_text("\n\n".join(paras) + "\n")
    return f"file:{path}"


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``dip-ext argv`` run in-process (what fixtures printed before is dropped);
    argparse's exits count as codes."""
    from dip_ext.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ------------------------------------------------------------------------------------ exports (DeciLM, GGUF)

#: layers of :func:`export_model` with blocks removed: attention in layer 0 (the engines' first-layer traps), the MLP
#: in layer 1 (llama.cpp's skipped layer), both in the last layer
EXPORT_REMOVED = {0: ["attn_out"], 1: ["mlp_out"], 3: ["attn_out", "mlp_out"]}


def byte_bpe_tokenizer(vocab_size: int = 300):
    """A GPT-2-style byte-level BPE fast tokenizer trained offline on WORDS text (seeded): <s> = 0, </s> = 1, then the
    256 byte tokens and merges, ``vocab_size`` tokens in all (what the GGUF export writes for llama.cpp)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    g = torch.Generator().manual_seed(0)
    text = [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(50)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def export_model(seed: int = 0, **config):
    """(dense, compacted) tiny Llama for the export tests: 4 layers, d 64, 2 heads of 32 (vLLM's CPU attention needs
    head_dim >= 32) over 1 KV head, ffn 96, vocab 300, weights of std 0.15 (greedy decoding then wanders instead
    of repeating one token), non-trivial norms; the compacted copy keeps random sets
    (seeded) with the blocks of EXPORT_REMOVED removed."""
    import copy

    import dip_ext

    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
               initializer_range=0.15)
    dense = perturb_norms_and_biases(LlamaForCausalLM(LlamaConfig(**{**cfg, **config})).eval())
    masks = random_masks(dims_of(dense), seed, 0.6, empty=EXPORT_REMOVED)
    return dense, dip_ext.compact(copy.deepcopy(dense), masks)
