"""Every flag of every command either changes what the command does or is refused: none is accepted and ignored.

Each flag is given, with a value other than its default, on top of a small run in which it has a role (the
hypernetwork's options on a hypernetwork run, the recovery's on a recovery run, ...); the run's observable result
(exit status, saved report without timings, the saved weights, the files written, whether progress was shown)
must differ from the same run without the flag, or the command must refuse the flag (exit status 2). A few flags
act only on memory, time or interruption; they are listed with the test that shows their effect.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_llama

from dip_ext.cli import build_parser

#: flags whose effect is on memory, time, or what an interruption leaves, not on a finished run's result
EFFECT_ELSEWHERE = {
    "--checkpoint-every": "test_hypernetwork.py: interrupted runs resume from the last checkpoint",
    "--recover-checkpoint-every": "test_recovery.py: an interrupted distillation resumes exactly",
    "--recover-grad-checkpointing": "test_recovery.py: gradient checkpointing gives the same training",
    "--recover-micro-batch": "test_recovery.py: accumulation over micro-batches gives the same training",
    "-h": "argparse's help",
}
#: the context each group of flags needs, and values for flags whose type alone does not give a valid one
RECOVER = ("--recover", "auto", "--val-windows", 2, "--recover-steps", 2, "--recover-batch", 2, "--recover-val-every", 1,
           "--recover-recon-windows", 2, "--recover-recon-epochs", 1)
HYPER = ("--method", "hypernetwork", "--steps", 2, "--val-every", 1, "--val-windows", 2)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


_TIMED = ("speed", "tokens_per_second_before", "tokens_per_second_after")  # measured or not, not their values


def _without_timings(value):
    if isinstance(value, dict):
        return {k: (v is None) if k in _TIMED else _without_timings(v) for k, v in value.items()
                if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def observed(capsys, tmp_path, argv, out, work) -> tuple:
    code, _, err = run_cli(capsys, *argv)
    if code != 0:
        return (code,)
    report = json.loads((out / "report.json").read_text())
    files = sorted(p.name for p in out.iterdir())
    checkpoints = sorted(str(p.relative_to(work)) for p in work.rglob("*")) if work.is_dir() else []
    return code, json.dumps(_without_timings(report), sort_keys=True), _digest(out), files, checkpoints, bool(err)


def _current(action, base: tuple):
    """The flag's value in the ``base`` run: what it sets there, else its default."""
    flag = action.option_strings[0]
    if type(action).__name__ == "BooleanOptionalAction":
        return True if flag in base else False if f"--no-{flag[2:]}" in base else action.default
    return base[base.index(flag) + 1] if flag in base else action.default


def _alternative(action, word_text, tmp_path, base: tuple) -> list:
    flag = action.option_strings[0]
    current = _current(action, base)
    special = {"--model": None, "--calibration": "ptb", "--eval-text": [word_text, "ptb"],
               "--recover-text": "ptb", "--out": None, "--work-dir": str(tmp_path / "elsewhere"),
               "--device": "meta", "--lr-schedule": "cosine", "--decay-steps": 1, "--recover-lora-alpha": 4.0,
               "--recover-teacher-topk": 8, "--recover-windows": 2, "--eval-seq-len": 8, "--seq-len": 12}
    if flag in special:
        value = special[flag]
        return [] if value is None else [flag, *value] if isinstance(value, list) else [flag, value]
    if type(action).__name__ == "BooleanOptionalAction":
        return [flag] if not current else [f"--no-{flag[2:]}"]
    if action.choices:
        return [flag, next(c for c in action.choices if c != current)]
    if action.type is int:
        return [flag, (current or 1) + 1]
    if action.type is float:
        return [flag, (current or 1.0) * 2 if current != 0 else 0.5]
    raise AssertionError(f"no alternative value for {flag}")


def _context(dest: str) -> tuple:
    from dip_ext.recovery import RecoveryConfig
    from dip_ext.selection.hypernetwork import HypernetworkConfig
    import dataclasses

    if dest in {f.name for f in dataclasses.fields(RecoveryConfig)}:
        return RECOVER
    if dest in {f.name for f in dataclasses.fields(HypernetworkConfig)}:
        return HYPER
    if dest == "refit_damping":
        return ("--refit", "on")
    return ()


def prune_actions():
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    return [a for a in prune._actions if a.option_strings and a.option_strings[0] not in EFFECT_ELSEWHERE]


@pytest.fixture(scope="module")
def dense(tmp_path_factory, word_tokenizer):
    folder = tmp_path_factory.mktemp("dense")
    model = tiny_llama(vocab_size=len(word_tokenizer), max_position_embeddings=64)
    model.save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("action", prune_actions(), ids=lambda a: a.option_strings[0])
def test_every_prune_flag_changes_the_run_or_is_refused(capsys, tmp_path, dense, word_text, action, monkeypatch,
                                                        one_thread):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    flag = action.option_strings[0]
    base = ("prune", "--model", dense, "--calibration", word_text, "--method", "oneshot", "--ratio", 0.4,
            "--refit", "off", "--seq-len", 16, "--calibration-windows", 4, "--eval-text", word_text,
            "--eval-windows", 1, "--eval-seq-len", 16, "--no-speed", "--quiet", *_context(action.dest))
    if flag == "--model":  # another model of the same family and shapes
        other = tmp_path / "other"
        tiny_llama(seed=1, vocab_size=64, max_position_embeddings=64).save_pretrained(other)
        for f in dense.glob("tok*"):
            (other / f.name).write_bytes(f.read_bytes())
        extra = ["--model", other]
    elif flag == "--out":
        extra = ["--out", tmp_path / "second"]
    else:
        extra = _alternative(action, word_text, tmp_path, base)
    if flag in ("--overwrite", "--resume"):  # they act on an existing output / checkpoints: make them first
        assert run_cli(capsys, *base, "--out", tmp_path / "a")[0] == 0
        before = observed(capsys, tmp_path, [*base, "--out", tmp_path / "a"], tmp_path / "a", tmp_path / "a-work")
        after = observed(capsys, tmp_path, [*base, *extra, "--out", tmp_path / "a"], tmp_path / "a", tmp_path / "a-work")
        assert before != after, f"{flag} was accepted and changed nothing"
        return
    out_b = tmp_path / "b" if flag != "--out" else tmp_path / "second"
    before = observed(capsys, tmp_path, [*base, "--out", tmp_path / "a"], tmp_path / "a", tmp_path / "a-work")
    assert before[0] == 0, "the reference run failed"
    argv = [*base, *extra] + ([] if flag == "--out" else ["--out", out_b])
    after = observed(capsys, tmp_path, argv, out_b, tmp_path / "elsewhere" if flag == "--work-dir"
                     else out_b.with_name(out_b.name + "-work"))
    if flag in ("--out", "--work-dir"):  # the same run, written elsewhere
        assert after[0] == 0 and (out_b if flag == "--out" else tmp_path / "elsewhere").is_dir()
        return
    assert after[0] == 2 or after != before, f"{flag} {extra[1:]} was accepted and changed nothing"
