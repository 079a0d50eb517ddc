"""dip_ext.eval: perplexity windows, BOS handling, batching invariance, throughput (tiny random Llama)."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import WORDS, make_word_tokenizer, tiny_llama

from dip_ext import data
from dip_ext import eval as ev

pytestmark = pytest.mark.usefixtures("fresh_cache")


def _tokenizer(bos_template: bool = False):
    """The shared word-level tokenizer without a pad token; ``bos_template``: it prepends BOS by itself."""
    return make_word_tokenizer(bos_template=bos_template, pad_token=None)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=32, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)


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
    held = ev.perplexity(model, tok, f"file:{f}", seq_len=16, split="heldout", progress=False)
    assert math.isfinite(held) and held != pytest.approx(all_, rel=1e-9)


def test_a_users_file_is_scored_whole_unless_a_split_is_asked(model, tok, text, tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xef\xbb\xbf" + text.encode())  # with a byte-order mark, which is not a token
    whole = ev.perplexity(model, tok, f"file:{f}", seq_len=16, progress=False)
    assert whole == pytest.approx(ev.perplexity(model, tok, text, seq_len=16, progress=False), rel=1e-6)
    assert whole == pytest.approx(ev.perplexity(model, tok, f"file:{f}", seq_len=16, split="all",
                                                progress=False), rel=1e-6)
    cal = data.get_text(f"file:{f}", "calibration")
    assert ev.perplexity(model, tok, f"file:{f}", seq_len=16, split="calibration", progress=False) == \
        pytest.approx(ev.perplexity(model, tok, data.Text(cal), seq_len=16, progress=False), rel=1e-6)
    one_line = tmp_path / "one.txt"
    one_line.write_text(" ".join(text.split()))  # a single line: scored whole as well
    assert ev.perplexity(model, tok, f"file:{one_line}", seq_len=16, progress=False) == \
        pytest.approx(whole, rel=1e-6)


def test_raw_text_has_a_documented_way_in(model, tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = _by_hand(model, [ids[i * 16:(i + 1) * 16] for i in range(len(ids) // 16)])
    assert ev.perplexity(model, tok, data.Text(text), seq_len=16, progress=False) == pytest.approx(want, rel=1e-6)
    nospace = "cat" * 3  # a string without whitespace is a name, and the error says how to score it as text
    with pytest.raises(ValueError, match=r"unknown text 'catcatcat'.*dip_ext\.data\.Text"):
        ev.perplexity(model, tok, nospace, seq_len=4, progress=False)


def test_short_text_says_how_many_tokens_are_needed(model, tok, tmp_path):
    with pytest.raises(ValueError, match=r"text 'text' \(split 'all'\) has 6 token\(s\); one window of seq_len "
                                         r"64 needs 64 text tokens: use a seq_len of 6 or less"):
        ev.perplexity(model, tok, "the cat sat on the mat", seq_len=64, progress=False)
    f = tmp_path / "short.txt"
    f.write_text("cat")
    with pytest.raises(ValueError, match=r"file:.*short\.txt' \(split 'all'\) has 1 token\(s\).*longer text"):
        ev.perplexity(model, tok, f"file:{f}", seq_len=8, progress=False)
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    got = ev.perplexity(model, tok, "the cat sat on the mat", seq_len=6, progress=False)
    assert got == pytest.approx(_by_hand(model, [ids]), rel=1e-6)


def test_lengths_beyond_the_model_fail_before_any_forward(model, tok, text, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or pytest.fail("forward ran"))
    limit = "longer than the model's 128 positions"
    with pytest.raises(ValueError, match=limit):
        ev.perplexity(model, tok, text, seq_len=129, progress=False)
    with pytest.raises(ValueError, match=limit):
        ev.perplexity(model, tok, "file:/no/such/file.txt", seq_len=129, progress=False)  # before reading
    too_long = torch.zeros(2, 129, dtype=torch.long)
    with pytest.raises(ValueError, match="more than the model's 128 positions"):
        ev.perplexity(model, tok, too_long, progress=False)
    with pytest.raises(ValueError, match="more than the model's 128 positions"):
        ev.window_losses(model, too_long, progress=False)
    with pytest.raises(ValueError, match="more than the model's 128 positions"):
        ev.mean_window_loss(model, too_long)
    with pytest.raises(ValueError, match=limit):
        ev.prefill_tokens_per_second(model, seq_len=129)
    assert calls == []


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
    with pytest.raises(ValueError, match="unknown text 'c4'"):  # the name is reported before the length
        ev.perplexity(model, tok, "c4", seq_len=4096, progress=False)
    with pytest.raises(ValueError, match=r"outside \[0, 32\)"):
        ev.perplexity(model, tok, torch.tensor([[1, 2, 999]]), progress=False)
    with pytest.raises(ValueError):
        ev.perplexity(model, tok, 3.5, progress=False)
    with pytest.raises(ValueError, match="unknown split"):
        ev.perplexity(model, tok, "raw text here", split="valid", progress=False)


def test_prefill_tokens_per_second(model):
    tps = ev.prefill_tokens_per_second(model, seq_len=32, batch=2, repeats=3)
    assert math.isfinite(tps) and tps > 0
    with pytest.raises(ValueError):
        ev.prefill_tokens_per_second(model, seq_len=0)


# ------------------------------------------------------------------------- speed: interleaved pairs

class _Clock:
    """A fake clock: only the fake models' forwards advance it, by their cost times the machine's 'load'."""

    def __init__(self, loads):
        self.now, self.loads, self.log = 0.0, list(loads), []

    def __call__(self):
        return self.now


class _Timed(torch.nn.Module):
    def __init__(self, name, cost, clock, limit=64):
        super().__init__()
        from types import SimpleNamespace

        self.name, self.cost, self.clock = name, cost, clock
        self.config = SimpleNamespace(vocab_size=10, max_position_embeddings=limit)

    def forward(self, input_ids, use_cache=True):
        assert not self.training and not use_cache and input_ids.shape == (2, 8)
        self.clock.log.append(self.name)
        # The load changes between pairs (never inside one): the two sides of a pair see the same factor.
        self.clock.now += self.cost * self.clock.loads[(len(self.clock.log) - 1) // 2]


def test_compare_prefill_interleaves_pairs_and_reports_the_spread():
    # Warm-up pair, then 5 pairs; pair 3 runs on a machine 3x busier, which a dense-then-pruned
    # measurement would have turned into a wrong speed-up.
    clock = _Clock([1.0, 1.0, 1.0, 3.0, 1.0, 1.0])
    dense, pruned = _Timed("dense", 2.0, clock), _Timed("pruned", 1.6, clock)
    dense.train(), pruned.eval()
    res = ev.compare_prefill(dense, pruned, seq_len=8, batch=2, pairs=5, warmup=1, timer=clock)
    assert clock.log == ["dense", "pruned"] * 6  # A, B, A, B, ...
    assert dense.training and not pruned.training  # modes restored
    assert isinstance(res, ev.PrefillComparison) and len(res.ratios) == 5
    assert res.dense_seconds == pytest.approx((2.0, 2.0, 6.0, 2.0, 2.0))
    assert res.ratios == pytest.approx((1.25,) * 5)
    assert (res.speedup, res.speedup_min, res.speedup_max) == pytest.approx((1.25, 1.25, 1.25))
    assert res.dense_tokens_per_second == pytest.approx(16 / 2.0)
    assert res.pruned_tokens_per_second == pytest.approx(16 / 1.6)
    d = res.to_dict()
    assert d["pairs"] == 5 and d["speedup"] == pytest.approx(1.25) and d["ratios"] == pytest.approx([1.25] * 5)
    assert res.describe().startswith("×1.25 (median of 5 interleaved pairs")


def test_prefill_comparison_median_and_spread():
    res = ev.PrefillComparison(seq_len=4, batch=1, dense_seconds=(2.0, 3.0, 2.0, 4.0, 2.0),
                               pruned_seconds=(1.0, 2.0, 1.6, 1.0, 2.0))  # ratios 2, 1.5, 1.25, 4, 1
    assert res.ratios == pytest.approx((2.0, 1.5, 1.25, 4.0, 1.0))
    assert res.speedup == pytest.approx(1.5)
    assert (res.speedup_min, res.speedup_max) == pytest.approx((1.0, 4.0))
    assert res.speedup_quartiles == pytest.approx((1.25, 2.0))
    one = ev.PrefillComparison(4, 1, (2.0,), (1.0,))
    assert one.speedup_quartiles == (2.0, 2.0)


def test_compare_prefill_checks_before_any_forward():
    clock = _Clock([1.0] * 8)
    short = _Timed("pruned", 1.0, clock, limit=4)
    with pytest.raises(ValueError, match=r"seq_len \(the pruned model\) 8 is longer than the model's 4 positions"):
        ev.compare_prefill(_Timed("dense", 1.0, clock), short, seq_len=8, timer=clock)
    for bad in (dict(pairs=0), dict(batch=0), dict(warmup=-1), dict(seq_len=0)):
        with pytest.raises(ValueError):
            ev.compare_prefill(_Timed("dense", 1.0, clock), _Timed("pruned", 1.0, clock), timer=clock, **bad)
    assert clock.log == []


def test_compare_prefill_default_length_fits_short_models(model):
    seen = []
    real = model.forward
    small = _Timed("pruned", 1.0, _Clock([1.0] * 8), limit=16)
    small.forward = lambda input_ids, use_cache=True: seen.append(input_ids.shape[1])
    model.forward = lambda input_ids, use_cache=True: seen.append(input_ids.shape[1]) or real(input_ids)
    try:
        res = ev.compare_prefill(model, small, pairs=1, warmup=0)
    finally:
        del model.forward
    assert res.seq_len == 16 and seen == [16, 16]


def test_mean_window_loss_fsdp_lockstep_fillers(model, tok, text, monkeypatch):
    """Sharded under 2 ranks: rank 1 (windows 1, 3) runs as many batches as rank 0 (windows 0, 2, 4)."""
    from dip_ext import distributed as dist

    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor([ids[i * 16:(i + 1) * 16] for i in range(5)])
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "is_sharded", lambda m: True)
    monkeypatch.setattr(dist, "all_reduce_sum_", lambda tensors: None)  # this rank's sums only
    forwards = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: forwards.append(k["input_ids"].shape[0]) or real(*a, **k))
    got = ev.mean_window_loss(model, windows, batch_size=2)
    assert forwards == [2, 1]  # windows 1 and 3 in one batch, then one filler forward
    monkeypatch.setattr(model, "forward", real)
    assert got == pytest.approx(math.log(_by_hand(model, windows[[1, 3]].tolist())), rel=1e-6)


def test_short_context_opt_gets_a_clear_error_not_an_index_error(tok, text):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=32, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16)).eval()
    with pytest.raises(ValueError, match="seq_len 128 is longer than the model's 64 positions"):
        ev.perplexity(opt, tok, text, seq_len=128, progress=False)
    with pytest.raises(ValueError, match="64 positions"):
        ev.prefill_tokens_per_second(opt, seq_len=128)
    # Defaults adapt: 512-token perplexity windows and 256-token prefill become 64 on this model.
    assert math.isfinite(ev.perplexity(opt, tok, text, max_windows=1, progress=False))
    assert ev.prefill_tokens_per_second(opt, repeats=1) > 0
