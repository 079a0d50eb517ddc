"""Self-generated recovery data (dip_ext.recovery.self_text): deterministic under the seed, cached on disk and
reused, exact after an interruption, mixed with text in the asked proportion, refused without a tokenizer or with a
sharded teacher, and recorded in the recovery result. Tiny random Llama over the word tokenizer, fp32, one thread."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import dip_ext
from dip_ext.recovery import RecoveryConfig, recover
from dip_ext.recovery.checks import check_sharded_teacher
from dip_ext.recovery.config import bf16_native
from dip_ext.recovery.self_text import (CHAT_INSTRUCTION, SelfTextPrompts, recovery_data_windows, self_text_windows,
                                        windows_needed)
from helpers import dims_of, random_masks, run_cli, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s>{% endif %}")


@pytest.fixture(scope="module")
def teacher(word_tokenizer):
    return tiny_llama(vocab_size=len(word_tokenizer), max_position_embeddings=64)


@pytest.fixture(scope="module")
def text(word_tokenizer):
    return torch.randint(3, len(word_tokenizer), (10, SEQ), generator=torch.Generator().manual_seed(0))


def cfg(**kw) -> RecoveryConfig:
    return RecoveryConfig(**{**dict(recover="distill", recover_data="self", recover_self_batch=4,
                                    recover_self_prompt_len=4, recover_steps=3, recover_batch=2), **kw})


def test_windows_are_teacher_samples_prompted_from_the_text(teacher, word_tokenizer, text):
    out = self_text_windows(teacher, word_tokenizer, text, 5, cfg(), progress=False)
    assert out.windows.shape == (5, SEQ) and out.windows.dtype == torch.int64
    assert int(out.windows.min()) >= 0 and int(out.windows.max()) < len(word_tokenizer)
    assert out.generated_tokens > 0 and out.folder is None
    # sample 0 starts with the first 4 tokens of a text window (the seeded permutation's first)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.windows[0, :4], text[int(order[0]), :4])
    # and is not that window: the rest was sampled
    assert not torch.equal(out.windows[0], text[int(order[0])])


def test_deterministic_under_the_seed_and_the_callers_random_state_untouched(teacher, word_tokenizer, text):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = self_text_windows(teacher, word_tokenizer, text, 6, cfg(), progress=False)
    assert torch.equal(torch.rand(3), expected_next)
    b = self_text_windows(teacher, word_tokenizer, text, 6, cfg(), progress=False)
    c = self_text_windows(teacher, word_tokenizer, text, 6, cfg(recover_seed=1), progress=False)
    assert torch.equal(a.windows, b.windows)
    assert not torch.equal(a.windows, c.windows)


def test_cached_reused_extended_and_exact_after_an_interruption(teacher, word_tokenizer, text, tmp_path,
                                                                  monkeypatch):
    first = self_text_windows(teacher, word_tokenizer, text, 6, cfg(), work_dir=tmp_path, progress=False)
    files = sorted(first.folder.glob("b*.safetensors"))
    assert first.folder.parent == tmp_path and first.folder.name.startswith("self-text-") and len(files) >= 2
    plain = self_text_windows(teacher, word_tokenizer, text, 6, cfg(), progress=False)
    assert torch.equal(first.windows, plain.windows)  # the cache changes nothing

    def no_generate(*a, **k):
        raise AssertionError("generated again although the cache holds every batch")

    with monkeypatch.context() as m:
        m.setattr(type(teacher), "generate", no_generate)
        again = self_text_windows(teacher, word_tokenizer, text, 6, cfg(), work_dir=tmp_path, progress=False)
    assert torch.equal(again.windows, first.windows) and again.generated_tokens == 0 and again.seconds == 0.0

    files[-1].unlink()  # an interrupted run: the last batch never written
    resumed = self_text_windows(teacher, word_tokenizer, text, 6, cfg(), work_dir=tmp_path, progress=False)
    assert torch.equal(resumed.windows, first.windows) and resumed.generated_tokens > 0

    more = self_text_windows(teacher, word_tokenizer, text, 12, cfg(), work_dir=tmp_path, progress=False)
    assert torch.equal(more.windows[:6], first.windows) and more.samples > first.samples


def test_the_progress_bar_says_when_it_reads_the_cache(teacher, word_tokenizer, text, tmp_path, capsys):
    self_text_windows(teacher, word_tokenizer, text, 6, cfg(), work_dir=tmp_path, progress=True)
    written = capsys.readouterr().err
    assert "self-generated text" in written and "read from the cache" not in written
    self_text_windows(teacher, word_tokenizer, text, 6, cfg(), work_dir=tmp_path, progress=True)
    assert "self-generated text (read from the cache)" in capsys.readouterr().err


def test_cache_key_covers_teacher_seed_and_sampling(teacher, word_tokenizer, text, tmp_path):
    base = self_text_windows(teacher, word_tokenizer, text, 2, cfg(), work_dir=tmp_path, progress=False).folder
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    for t, c in ((other, cfg()), (teacher, cfg(recover_seed=3)), (teacher, cfg(recover_self_temperature=0.7)),
                 (teacher, cfg(recover_self_batch=2)), (teacher, cfg(recover_self_prompt_len=3)),
                 (teacher, cfg(recover_self_dtype="same" if bf16_native("cpu") else "bfloat16"))):
        folder = self_text_windows(t, word_tokenizer, text, 2, c, work_dir=tmp_path, progress=False).folder
        assert folder != base
    folder = self_text_windows(teacher, word_tokenizer, text[1:], 2, cfg(), work_dir=tmp_path, progress=False).folder
    assert folder != base


def test_damaged_cache_file_is_named(teacher, word_tokenizer, text, tmp_path):
    out = self_text_windows(teacher, word_tokenizer, text, 2, cfg(), work_dir=tmp_path, progress=False)
    path = sorted(out.folder.glob("b*.safetensors"))[0]
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=path.name):
        self_text_windows(teacher, word_tokenizer, text, 2, cfg(), work_dir=tmp_path, progress=False)


def test_chat_prompts_take_the_asked_fraction(teacher, word_tokenizer, text):
    tok = copy.deepcopy(word_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    prompts = SelfTextPrompts(tok, text, cfg(recover_self_chat=0.25), chat=True)
    chats = [prompts.is_chat(j) for j in range(40)]
    assert sum(chats) == 10 and all(abs(sum(chats[:k]) - 0.25 * k) < 1 for k in range(1, 41))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    j = chats.index(True)
    snippet = tok.decode(text[int(order[j % 10]), :4].tolist(), skip_special_tokens=True)
    expected = tok.apply_chat_template([{"role": "user", "content": CHAT_INSTRUCTION + snippet}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompts(j) == list(expected) and prompts(j) != text[int(order[j % 10]), :4].tolist()
    plain = chats.index(False)
    assert prompts(plain) == text[int(order[plain % 10]), :4].tolist()
    # end to end: the same samples with and without a template differ only where a chat prompt was drawn
    with_chat = self_text_windows(teacher, tok, text, 8, cfg(recover_self_chat=0.5), progress=False)
    without = self_text_windows(teacher, word_tokenizer, text, 8, cfg(recover_self_chat=0.5), progress=False)
    assert not torch.equal(with_chat.windows, without.windows)
    assert torch.equal(with_chat.windows[0, :4], without.windows[0, :4])  # sample 0 is a text prompt either way


def test_mix_is_half_self_half_text(teacher, word_tokenizer, text):
    c = cfg(recover_data="mix", recover_steps=4, recover_batch=2)
    assert windows_needed(c) == 8
    windows, record = recovery_data_windows(teacher, word_tokenizer, text, c, progress=False)
    assert windows.shape == (8, SEQ)
    assert record["data"] == "mix" and record["self_windows"] == 4 and record["text_windows"] == 4
    assert record["generated_tokens"] > 0 and record["cached"] is False
    text_rows = {tuple(w.tolist()) for w in text}
    assert all(tuple(w.tolist()) in text_rows for w in windows[:4])
    assert not any(tuple(w.tolist()) in text_rows for w in windows[4:])
    one, rec = recovery_data_windows(teacher, None, text, cfg(recover_data="mix", recover_steps=1, recover_batch=1),
                                     progress=False)  # half of one window is none: nothing written, no tokenizer
    assert one.shape == (1, SEQ) and tuple(one[0].tolist()) in text_rows
    assert rec == {"data": "mix", "text_windows": 1, "self_windows": 0}
    assert windows_needed(cfg(recover="auto", recover_steps=4, recover_batch=2, recover_recon_windows=20)) == 20
    assert windows_needed(cfg(recover_windows=3)) == 3
    same, rec = recovery_data_windows(teacher, word_tokenizer, text,
                                      RecoveryConfig(recover="distill", recover_data="text"), progress=False)
    assert same is text and rec == {"data": "text", "text_windows": 10, "self_windows": 0}


def test_recover_trains_on_self_text_and_records_it(teacher, word_tokenizer, text, tmp_path):
    student = dip_ext.compact(copy.deepcopy(teacher), random_masks(dims_of(teacher), seed=1))
    result = recover(student, copy.deepcopy(teacher), text, text[:2], cfg(recover_val_every=0), work_dir=tmp_path,
                     tokenizer=word_tokenizer, progress=False)
    assert result.data["data"] == "self" and result.data["self_windows"] == 6 and result.data["text_windows"] == 0
    assert result.seconds["generate"] > 0 and result.tokens == 3 * 2 * SEQ
    assert any("written by the dense model itself" in line for line in result.markdown_lines())
    assert list(tmp_path.glob("self-text-*/b*.safetensors"))
    assert dip_ext.recovery.RecoveryResult.from_dict(result.to_dict()) == result


def test_refusals(teacher, word_tokenizer, text):
    student = dip_ext.compact(copy.deepcopy(teacher), random_masks(dims_of(teacher), seed=1))
    with pytest.raises(ValueError, match="needs its tokenizer"):
        recover(student, copy.deepcopy(teacher), text, None, cfg(), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        self_text_windows(teacher, None, text, 2, cfg(), progress=False)
    with pytest.raises(ValueError, match="recover_self_temperature has no effect with recover_data='text'"):
        RecoveryConfig(recover="distill", recover_data="text", recover_self_temperature=0.5)
    with pytest.raises(ValueError, match="recover_data 'auto' is resolved"):
        recovery_data_windows(teacher, word_tokenizer, text, RecoveryConfig(recover="distill"), progress=False)
    with pytest.raises(ValueError, match="recover_data"):
        RecoveryConfig(recover="distill", recover_data="other")
    with pytest.raises(ValueError, match="--recover-data self"):
        check_sharded_teacher(cfg(), 2)
    with pytest.raises(ValueError, match=r"\[n, seq_len >= 2\]"):
        self_text_windows(teacher, word_tokenizer, text[:, :1], 2, cfg(), progress=False)
    no_eos = copy.deepcopy(word_tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="end-of-sequence"):
        self_text_windows(teacher, no_eos, text, 2, cfg(), progress=False)


def test_every_batch_draws_its_own_samples(teacher, word_tokenizer, text, tmp_path):
    from safetensors.torch import load_file
    one = text[:1]  # every sample has the same prompt: only the batch's own seed tells them apart
    out = self_text_windows(teacher, word_tokenizer, one, 4, cfg(recover_self_batch=1), work_dir=tmp_path,
                            progress=False)
    batches = [load_file(p)["tokens"] for p in sorted(out.folder.glob("b*.safetensors"))]
    assert len(batches) >= 3
    assert all(torch.equal(b[:4], one[0, :4]) for b in batches)
    assert len({tuple(b.tolist()) for b in batches}) == len(batches)


def test_cli_prune_with_self_text_reuses_the_cache_on_the_next_run(word_tokenizer, word_text, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "dense"
    tiny_llama(vocab_size=len(word_tokenizer), max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
               pad_token_id=0).save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    args = ("prune", "--model", folder, "--calibration", word_text, "--seq-len", SEQ, "--calibration-windows", 4,
            "--method", "oneshot", "--refit", "off", "--eval-windows", 0, "--no-speed", "--quiet", "--out", out,
            "--recover", "distill", "--recover-steps", 2, "--recover-batch", 2, "--recover-val-every", 0,
            "--recover-data", "mix", "--recover-self-batch", 2)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    first = dip_ext.PruneReport.load(out).recovery.data
    assert first["data"] == "mix" and first["self_windows"] == 2 and first["text_windows"] == 2
    assert first["generated_tokens"] > 0 and first["cached"] is False
    assert list((tmp_path / "out-work").glob("self-text-*/b*.safetensors"))
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err
    again = dip_ext.PruneReport.load(out).recovery.data
    assert again["cached"] is True and again["generated_tokens"] == 0
    # a resume that finds only the cache (no checkpoint of any stage) resumes nothing, and says so
    for entry in (tmp_path / "out-work").iterdir():
        if entry.is_dir() and not entry.name.startswith("self-text-"):
            shutil.rmtree(entry)
        elif entry.is_file() and not entry.name.startswith("."):
            entry.unlink()
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert dip_ext.PruneReport.load(out).resumed is False
    assert dip_ext.PruneReport.load(out).recovery.data["cached"] is True
    code, _, err = run_cli(capsys, *args[:-4], "--recover-data", "text", "--recover-self-batch", 2, "--overwrite")
    assert code == 2 and "recover_self_batch has no effect with recover_data='text'" in err


def test_sampling_in_another_dtype_leaves_the_teacher_as_it_was(teacher, word_tokenizer, text):
    """bf16 sampling runs on a copy: the teacher keeps its dtype and weights; the samples differ from fp32 sampling
    only through rounding (same seed: the same windows shape, valid token ids)."""
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    bf16 = self_text_windows(teacher, word_tokenizer, text, 3, cfg(recover_self_dtype="bfloat16"), progress=False)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    fp32 = self_text_windows(teacher, word_tokenizer, text, 3, cfg(recover_self_dtype="same"), progress=False)
    assert bf16.windows.shape == fp32.windows.shape and bf16.windows.dtype == torch.int64
    assert int(bf16.windows.max()) < teacher.config.vocab_size


def test_auto_is_mix_where_the_teacher_can_write_and_text_elsewhere():
    auto = RecoveryConfig(recover="distill", recover_self_temperature=0.7)
    assert auto.recover_data == "auto"
    assert auto.resolved("cpu", tokenizer=True).recover_data == "mix"
    assert auto.resolved("cpu", tokenizer=True).recover_self_temperature == 0.7
    for kw in (dict(tokenizer=False), dict(tokenizer=True, sharded_teacher=True)):
        with pytest.warns(UserWarning, match="recover_self_temperature has no effect: recover_data 'auto' is text"):
            text = auto.resolved("cpu", **kw)
        assert text.recover_data == "text" and text.recover_self_temperature == 1.0
    explicit = RecoveryConfig(recover="distill", recover_data="self")
    assert explicit.resolved("cpu", tokenizer=False).recover_data == "self"  # refused later, naming the tokenizer
