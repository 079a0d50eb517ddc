"""``calibration_self``: part of the calibration pass written by the dense model itself (prompted from the
calibration text as recovery's self-written text is, and cached with it), the rest the text's own windows; the
training and held-out windows stay the text's; recorded in the report, part of the resume fingerprint, refused
without a tokenizer or outside [0, 1). Tiny random Llama over the word tokenizer, fp32, one thread."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from dip_ext import PruneConfig, Pruner, RefitConfig
from dip_ext.config import EvalConfig
from dip_ext.model_state import model_digest
from dip_ext.recovery import RecoveryConfig
from dip_ext.recovery.self_text import self_text_windows
from dip_ext.windows import CalibrationWindows, self_written_count, with_written
from helpers import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16
NO_EVAL = EvalConfig(eval_windows=0, speed=False)
#: recovery on self-written text only, reading as many windows (1 step of 2) as the calibration pass below writes
SELF_RECOVERY = RecoveryConfig(recover="distill", recover_data="self", recover_self_batch=2, recover_self_prompt_len=4,
                               recover_steps=1, recover_batch=2, recover_val_every=0, recover_checkpoint_every=0)


def test_written_windows_replace_the_end_of_the_pass_and_are_counted_per_source():
    cal, train = torch.arange(32).view(8, 4), torch.zeros(10, 4, dtype=torch.long)
    val = torch.ones(2, 4, dtype=torch.long)
    written = torch.full((3, 4), -1)
    out = with_written(CalibrationWindows(cal, train, val), written, "wiki")
    # 5 of the 8 text windows kept, evenly spaced (linspace(0, 7, 5) rounded), then the 3 written ones
    assert torch.equal(out.calibration, torch.cat([cal[[0, 2, 4, 5, 7]], written]))
    assert out.train is train and out.val is val
    assert out.sources == {"wiki": {"calibration": 5, "train": 10, "val": 2},
                           "self": {"calibration": 3, "train": 0, "val": 0}}
    # a mixture's calibration windows are its texts' in order: the kept ones are counted per text
    mixed = CalibrationWindows(cal, train, None, {"a": {"calibration": 4, "train": 6, "val": 0},
                                                  "b": {"calibration": 4, "train": 4, "val": 0}})
    assert with_written(mixed, written, "a,b").sources == {"a": {"calibration": 2, "train": 6, "val": 0},
                                                           "b": {"calibration": 3, "train": 4, "val": 0},
                                                           "self": {"calibration": 3, "train": 0, "val": 0}}
    for bad in (torch.zeros(8, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match="cannot replace part of a calibration pass"):
            with_written(CalibrationWindows(cal, train, val), bad, "wiki")


def dense(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)


def pruner(model, tokenizer, text, fraction, work_dir=None, resume=False):
    config = PruneConfig(calibration=text, seq_len=SEQ, calibration_windows=4, calibration_self=fraction, val_windows=2)
    return Pruner(model, tokenizer, config, refit=RefitConfig(refit="off"), recovery=SELF_RECOVERY,
                  evaluation=NO_EVAL, work_dir=work_dir, resume=resume, progress=False)


def test_the_dense_model_writes_its_part_once_and_recovery_reads_it_back(word_tokenizer, word_text, tmp_path):
    model = dense(word_tokenizer)
    text_only = pruner(copy.deepcopy(model), word_tokenizer, word_text, 0.0).windows()
    run = pruner(model, word_tokenizer, word_text, 0.5, tmp_path / "work")
    windows = run.windows()
    # reference: the text's own split, and the samples self_text_windows draws from a copy of the dense model
    # prompted from the text's training windows (no cache)
    written = self_text_windows(copy.deepcopy(model), word_tokenizer, text_only.train, 2, run.recovery_config,
                                progress=False)
    assert written.generated_tokens > 0
    assert torch.equal(windows.calibration, torch.cat([text_only.calibration[[0, 3]], written.windows]))
    assert torch.equal(windows.train, text_only.train) and torch.equal(windows.val, text_only.val)
    assert list((tmp_path / "work").glob("self-text-*/b*.safetensors"))
    _, report = run.run()
    assert report.windows["sources"]["self"] == {"calibration": 2, "train": 0, "val": 0}
    assert report.windows["sources"][word_text]["calibration"] == 2
    assert f"calibration pass: 4 windows of {word_text}, 2 of them written by the dense model itself" in (
        report.to_markdown())
    # recovery's self-written windows are the same samples: read from the cache, none generated again
    assert report.recovery.data["self_windows"] == 2 and report.recovery.data["cached"] is True
    assert report.recovery.data["generated_tokens"] == 0


def test_without_a_work_folder_recovery_still_reads_the_calibration_samples_back(word_tokenizer, word_text):
    run = pruner(dense(word_tokenizer), word_tokenizer, word_text, 0.5)
    _, report = run.run()
    assert report.recovery.data["cached"] is True and report.recovery.data["generated_tokens"] == 0
    scratch = run.text_cache
    assert list(scratch.glob("self-text-*/b*.safetensors"))  # the run's own temporary folder...
    del run
    gc.collect()
    assert not scratch.exists()  # ...gone with the run


def test_a_resume_with_another_fraction_is_refused(word_tokenizer, word_text, tmp_path):
    model = dense(word_tokenizer)
    pruner(copy.deepcopy(model), word_tokenizer, word_text, 0.5, tmp_path / "work").calibrate()
    with pytest.raises(ValueError, match="calibration_self") as refused:
        pruner(copy.deepcopy(model), word_tokenizer, word_text, 0.25, tmp_path / "work", resume=True).calibrate()
    assert "digest of the windows" not in str(refused.value)  # the option that differs, not a guess at why
    # the same fraction resumes
    again = pruner(copy.deepcopy(model), word_tokenizer, word_text, 0.5, tmp_path / "work", resume=True)
    assert again.resumed and again.calibrate().windows == 4


def test_refusals(word_tokenizer):
    model = dense(word_tokenizer)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="calibration_self"):
            PruneConfig(calibration_self=bad)
    windows = torch.randint(3, len(word_tokenizer), (8, SEQ), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"calibration_self needs the tokenizer .*, or calibration_self=0"):
        Pruner(model, None, PruneConfig(calibration_self=0.5, seq_len=SEQ), calibration_tokens=windows,
               evaluation=NO_EVAL, recovery=RecoveryConfig(recover="off"))


def test_a_digest_in_another_dtype_is_the_digest_of_the_cast_model(word_tokenizer):
    # the self-written text's cache is keyed on the weights sampled from: calibration samples from a bf16 copy of the
    # fp32 dense model, recovery from the teacher cast to bf16 in place; both must find the same cache
    model = dense(word_tokenizer)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    assert model_digest(model, dtype=torch.bfloat16) == model_digest(cast)
    assert model_digest(cast, dtype=torch.bfloat16) == model_digest(cast)
    assert model_digest(model) != model_digest(cast)
    assert next(model.parameters()).dtype == torch.float32


def test_a_fraction_that_comes_to_no_window_is_warned_about(word_tokenizer, word_text):
    run = pruner(dense(word_tokenizer), word_tokenizer, word_text, 0.1)  # 0.1 of 4 windows: none
    with pytest.warns(UserWarning, match="calibration_self 0.1 of 4 calibration-pass window"):
        windows = run.windows()
    assert windows.sources is None and windows.calibration.shape[0] == 4
    assert self_written_count(0.99, 64) == 63 and self_written_count(0.5, 64) == 32
    with pytest.warns(UserWarning, match="is no window"):
        assert self_written_count(0.5, 1) == 0  # one window at least stays the text's
