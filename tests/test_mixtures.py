"""Calibration and recovery text mixtures (``"file:A:0.75,file:B:0.25"``): every part of the windows drawn from
each text in proportion (within one window), deterministic, recorded in the report and in the resume
fingerprint; evaluation splits and malformed mixtures refused in one line."""

import pytest
import torch
from helpers import WORDS, run_cli, tiny_llama

import dip_ext
from dip_ext import EvalConfig, PruneConfig, Pruner, RecoveryConfig, RefitConfig
from dip_ext.mixtures import parse_mixture
from dip_ext.outputs import text_input_paths, without_local_paths
from dip_ext.recovery.checks import check_training_text
from dip_ext.windows import allocate, mixture_windows

SEQ = 16
HALF = len(WORDS) // 2


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield one_thread


def _write(folder, name: str, words: list[str], seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    paras = [" ".join(words[int(j)] for j in torch.randint(0, len(words), (40,), generator=g)) for _ in range(24)]
    path = folder / name
    path.write_text("\n\n".join(paras) + "\n")
    return f"file:{path}"


@pytest.fixture
def two_texts(tmp_path):
    """Two texts over disjoint halves of the word tokenizer's vocabulary, so a window names its text."""
    return _write(tmp_path, "a.txt", WORDS[:HALF], 1), _write(tmp_path, "b.txt", WORDS[HALF:], 2)


def _from_a(windows: torch.Tensor, word_tokenizer) -> int:
    a_ids = torch.tensor(word_tokenizer.convert_tokens_to_ids(WORDS[:HALF]))
    b_ids = torch.tensor(word_tokenizer.convert_tokens_to_ids(WORDS[HALF:]))
    in_a = torch.isin(windows, a_ids).any(1)
    assert not (in_a & torch.isin(windows, b_ids).any(1)).any()  # no window mixes the texts
    return int(in_a.sum())


def test_parsing_refuses_evaluation_splits_and_malformed_mixtures():
    assert parse_mixture("wiki:0.5,ptb-train:0.3,file:notes.txt:0.2") == [("wiki", 0.5), ("ptb", 0.3),
                                                                          ("file:notes.txt", 0.2)]
    assert parse_mixture("wiki,ptb") == [("wiki", 0.5), ("ptb", 0.5)] and parse_mixture("wiki") == [("wiki", 1.0)]
    for bad, match in (("ptb-test", "evaluation split"), ("wikitext2-validation", "evaluation split"),
                       ("wiki:0", "must be a number > 0"), ("wiki,,ptb", "empty entry"),
                       ("wiki,file:x.txt:1,wiki:2", "names 'wiki' more than once")):
        with pytest.raises(ValueError, match=match):
            PruneConfig(calibration=bad)
    with pytest.raises(ValueError, match="evaluation split"):
        RecoveryConfig(recover="distill", recover_text="wiki:0.5,ptb-heldout:0.5")


@pytest.mark.parametrize("weights, total", [([0.75, 0.25], 8), ([0.5, 0.3, 0.2], 7), ([1 / 3] * 3, 10), ([1.0], 3)])
def test_allocate_is_within_one_of_the_proportions(weights, total):
    counts = allocate(weights, total)
    assert sum(counts) == total and all(abs(c - w * total) < 1 for c, w in zip(counts, weights))


@pytest.mark.parametrize("weight_a", [0.75, 0.5, 0.3])
def test_every_part_is_drawn_in_proportion(two_texts, word_tokenizer, weight_a):
    a, b = two_texts
    spec = f"{a}:{weight_a},{b}:{1 - weight_a:.2f}"
    windows = mixture_windows(word_tokenizer, spec, SEQ, calibration_windows=10, val_windows=4)
    for part, n in ((windows.calibration, 10), (windows.val, 4)):
        assert part.shape[0] == n and abs(_from_a(part, word_tokenizer) - weight_a * n) < 1
    train = windows.train
    assert abs(_from_a(train, word_tokenizer) - weight_a * train.shape[0]) < 1
    # the held-out windows are never trained on, and the same spec gives the same windows
    assert not any(torch.equal(v, t) for v in windows.val for t in train)
    again = mixture_windows(word_tokenizer, spec, SEQ, calibration_windows=10, val_windows=4)
    assert all(torch.equal(x, y) for x, y in ((windows.calibration, again.calibration),
                                              (windows.train, again.train), (windows.val, again.val)))
    assert windows.sources[a]["calibration"] + windows.sources[b]["calibration"] == 10


def test_the_run_records_the_mixture_and_its_checkpoints_refuse_another(two_texts, word_tokenizer, tmp_path):
    a, b = two_texts

    def pruner(spec, resume=False):
        return Pruner(tiny_llama(vocab_size=len(word_tokenizer)), word_tokenizer,
                      PruneConfig(method="oneshot", ratio=0.3, calibration=spec, seq_len=SEQ, calibration_windows=8,
                                  val_windows=2), refit=RefitConfig(refit="auto"),
                      evaluation=EvalConfig(eval_windows=0, speed=False), work_dir=tmp_path / "work", resume=resume,
                      progress=False)

    model, report = pruner(f"{a}:0.75,{b}:0.25").run()
    assert report.calibration == f"{a}:0.75,{b}:0.25" and report.windows["calibration"] == 8
    sources = report.windows["sources"]
    assert [sources[t]["calibration"] for t in (a, b)] == [6, 2] and [sources[t]["val"] for t in (a, b)] == [2, 0]
    train = sources[a]["train"] + sources[b]["train"]
    assert abs(sources[a]["train"] - 0.75 * train) < 1  # (report.windows["train"]: 0, oneshot trains nothing)
    published = report.publishable()
    assert published.calibration == "file:a.txt:0.75,file:b.txt:0.25" and str(tmp_path) not in str(published.to_dict())
    with pytest.raises(ValueError, match="calibration"):  # another mixture: the checkpoints are another run's
        pruner(f"{a}:0.5,{b}:0.5", resume=True).calibrate()
    assert pruner(f"{a}:0.75,{b}:0.25", resume=True).calibrate() is not None  # the same one resumes


def test_the_files_of_a_mixture_are_inputs(two_texts):
    a, b = two_texts
    assert text_input_paths(f"wiki:0.5,{a}:0.25,{b}:0.25") == [dip_ext.outputs.text_input_path(a),
                                                               dip_ext.outputs.text_input_path(b)]
    assert without_local_paths(f"wiki:0.5,{a}:0.5") == "wiki:0.5,file:a.txt:0.5"


def test_the_command_line_refuses_an_evaluation_split_in_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "prune", "--model", str(tmp_path / "none"), "--calibration", "wiki:0.5,ptb-test:0.5",
                           "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "evaluation split" in err, err


def test_a_mixture_s_files_are_protected_as_inputs(capsys, two_texts, tmp_path):
    a, b = two_texts
    before = {p: p.read_bytes() for p in tmp_path.glob("*.txt")}
    code, _, err = run_cli(capsys, "prune", "--model", str(tmp_path / "none"), "--calibration", f"wiki:0.5,{b}:0.5",
                           "--out", str(tmp_path), "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "--calibration" in err and "b.txt" in err, err
    assert {p: p.read_bytes() for p in tmp_path.glob("*.txt")} == before


def test_prune_recovers_on_a_mixture_and_refuses_one_with_an_evaluation_text(two_texts, word_tokenizer, word_text):
    a, b = two_texts
    spec = f"{a}:0.5,{b}:0.5"
    pruner = Pruner(tiny_llama(vocab_size=len(word_tokenizer)), word_tokenizer,
                    PruneConfig(ratio=0.4, method="oneshot", seq_len=SEQ, calibration=word_text, val_windows=2),
                    refit=RefitConfig(refit="off"),
                    recovery=RecoveryConfig(recover="distill", recover_steps=2, recover_batch=2, recover_text=spec,
                                            recover_val_every=0),
                    evaluation=EvalConfig(eval_windows=0, speed=False), progress=False)
    result = pruner.recover()
    assert result.distillation["steps"] == 2 and result.data["text_windows"] > 0
    # a text of the mixture is also evaluated: refused, by name (a training-split suffix changes nothing)
    with pytest.raises(ValueError, match=f"recover_text '{b}' \\(in the mixture .*\\) is also an evaluation"):
        Pruner(tiny_llama(vocab_size=len(word_tokenizer)), word_tokenizer,
               PruneConfig(ratio=0.4, method="oneshot", seq_len=SEQ, calibration=word_text),
               recovery=RecoveryConfig(recover="distill", recover_text=spec),
               evaluation=EvalConfig(eval_text=[b], eval_windows=1, speed=False), progress=False)
    with pytest.raises(ValueError, match="recover_text 'ptb' \\(in the mixture 'wiki:0.5,ptb-train:0.5'\\)"):
        check_training_text("wiki:0.5,ptb-train:0.5", ["wiki", "ptb"], calibration="wiki")
    check_training_text("wiki:0.5,ptb-train:0.5", ["wiki"], calibration="wiki")
