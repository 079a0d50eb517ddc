"""dip_ext.eval: perplexity windows, BOS handling, batching invariance, throughput (tiny random Llama)."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from dip_ext import data
from dip_ext import eval as ev

WORDS = "the a cat dog sat on mat and ran far away big small red blue house tree".split()


def _tokenizer(bos_template: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_template:  # a Llama-2-like tokenizer that prepends BOS by itself
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def text():
    rng = random.Random(0)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(20))  # 240 tokens


def _by_hand(model, windows, bos=None):
    """exp(mean CE) over the windows, one window at a time, all positions but the last predicting."""
    losses = []
    with torch.no_grad():
        for w in windows:
            w = torch.tensor(([bos] if bos is not None else []) + list(w))
            logits = model(w[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    return math.exp(torch.cat(losses).double().mean().item())


def test_perplexity_equals_exp_mean_ce_by_hand(model, tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    L = 16
    windows = [ids[i * L:(i + 1) * L] for i in range(len(ids) // L)]
    got = ev.perplexity(model, tok, text, seq_len=L, progress=False)
    assert got == pytest.approx(_by_hand(model, windows), rel=1e-6)
    # A random model on this vocabulary is near-uniform: sanity of scale, not a tautology.
    assert 10 < got < 100


def test_batch_size_does_not_change_perplexity(model, tok, text):
    ppl = [ev.perplexity(model, tok, text, seq_len=16, batch_size=b, progress=False) for b in (1, 3, 64)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-6)
    assert ppl[2] == pytest.approx(ppl[0], rel=1e-6)


def test_max_windows_respected_and_spread(model, tok, text, monkeypatch):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    L, n = 16, 3
    available = len(ids) // L
    seen = []
    real = ev.window_losses

    def spy(model_, windows, *a, **k):
        seen.append(windows.clone())
        return real(model_, windows, *a, **k)

    monkeypatch.setattr(ev, "window_losses", spy)
    got = ev.perplexity(model, tok, text, seq_len=L, max_windows=n, progress=False)
    assert seen[0].shape == (n, L)
    picks = torch.linspace(0, available - 1, n).round().long().tolist()
    windows = [ids[i * L:(i + 1) * L] for i in picks]
    assert seen[0].tolist() == windows
    assert got == pytest.approx(_by_hand(model, windows), rel=1e-6)
    loss, count = real(model, seen[0], progress=False)
    assert count == n * (L - 1)


def test_mean_window_loss_is_the_mean_token_cross_entropy(model, tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor([ids[i * 16:(i + 1) * 16] for i in range(5)])
    by_hand = math.log(_by_hand(model, windows.tolist()))  # log perplexity = mean token cross-entropy
    for batch_size in (1, 2, 8):
        assert ev.mean_window_loss(model, windows, batch_size=batch_size) == pytest.approx(by_hand, rel=1e-6)


def test_bos_auto_from_tokenizer(model, text):
    tok_bos = _tokenizer(bos_template=True)
    assert data.needs_bos(tok_bos) is True
    ids = tok_bos(text, add_special_tokens=False)["input_ids"]
    L = 16
    windows = [ids[i * (L - 1):(i + 1) * (L - 1)] for i in range(len(ids) // (L - 1))]
    got = ev.perplexity(model, tok_bos, text, seq_len=L, progress=False)
    assert got == pytest.approx(_by_hand(model, windows, bos=1), rel=1e-6)
    # Forcing it off gives the no-BOS windows.
    off = ev.perplexity(model, tok_bos, text, seq_len=L, add_bos=False, progress=False)
    plain = [ids[i * L:(i + 1) * L] for i in range(len(ids) // L)]
    assert off == pytest.approx(_by_hand(model, plain), rel=1e-6)


def test_needs_bos_rules(tok):
    assert data.needs_bos(tok) is False

    class Cfg:
        model_type = "gemma3_text"

    assert data.needs_bos(tok, Cfg()) is True
    class NoBos:
        bos_token_id = None

    assert data.needs_bos(NoBos(), Cfg()) is False


def test_windows_tensor_and_name_inputs(model, tok, text, tmp_path):
    blocks = data.make_blocks(torch.tensor(tok(text, add_special_tokens=False)["input_ids"]), 16)
    from_blocks = ev.perplexity(model, tok, blocks, progress=False)
    assert from_blocks == pytest.approx(ev.perplexity(model, tok, text, seq_len=16, progress=False), rel=1e-6)
    f = tmp_path / "t.txt"
    f.write_text(text)
    all_ = ev.perplexity(model, tok, f"file:{f}", seq_len=16, split="all", progress=False)
    assert all_ == pytest.approx(from_blocks, rel=1e-6)
    held = ev.perplexity(model, tok, f"file:{f}", seq_len=16, progress=False)  # default split: heldout
    assert math.isfinite(held) and held != pytest.approx(all_, rel=1e-9)


def test_short_text_is_one_window(model, tok):
    got = ev.perplexity(model, tok, "the cat sat on the mat", seq_len=64, progress=False)
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert got == pytest.approx(_by_hand(model, [ids]), rel=1e-6)


def test_progress_bar_and_state(model, tok, text, capsys):
    model.train()
    ev.perplexity(model, tok, text, seq_len=16, max_windows=2, progress=True)
    assert "perplexity" in capsys.readouterr().err
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())
    model.eval()


@pytest.mark.parametrize("kwargs", [dict(seq_len=1), dict(max_windows=0), dict(batch_size=0),
                                    dict(seq_len=2.5)])
def test_bad_arguments(model, tok, text, kwargs):
    with pytest.raises(ValueError):
        ev.perplexity(model, tok, text, progress=False, **kwargs)


def test_bad_inputs(model, tok):
    with pytest.raises(ValueError, match="unknown text"):
        ev.perplexity(model, tok, "wikii", progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        ev.perplexity(model, tok, torch.tensor([[1, 2, 999]]), progress=False)
    with pytest.raises(ValueError):
        ev.perplexity(model, tok, 3.5, progress=False)
    with pytest.raises(ValueError, match="split"):
        ev.perplexity(model, tok, "raw text here", split="heldout", progress=False)


def test_prefill_tokens_per_second(model):
    tps = ev.prefill_tokens_per_second(model, seq_len=32, batch=2, repeats=3)
    assert math.isfinite(tps) and tps > 0
    with pytest.raises(ValueError):
        ev.prefill_tokens_per_second(model, seq_len=0)
