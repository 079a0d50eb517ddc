"""Every flag of every command either changes what the command does or is refused: none is accepted and ignored.

Each flag is given, with a value other than its default, on top of a small run in which it has a role (the
hypernetwork's options on a hypernetwork run, the recovery's on a recovery run, ...); the run's observable result
(exit status, saved report without timings, the saved weights, the files written, whether progress was shown)
must differ from the same run without the flag, or the command must refuse the flag (exit status 2). A few flags
act only on memory, time or interruption; they are listed with the test that shows their effect.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from helpers import run_cli, tiny_llama

from dip_ext.cli import build_parser
from dip_ext.options import flag_dest
from dip_ext.recovery import RecoveryConfig
from dip_ext.recovery.config import bf16_native
from dip_ext.selection.hypernetwork import HypernetworkConfig

#: flags whose effect is on memory, time, or what an interruption leaves, not on a finished run's result
EFFECT_ELSEWHERE = {
    "--checkpoint-every": "test_hypernetwork.py: interrupted runs resume from the last checkpoint",
    "--recover-checkpoint-every": "test_recovery.py: an interrupted distillation resumes exactly",
    "--recover-grad-checkpointing": "test_recovery.py: gradient checkpointing gives the same training",
    "--recover-micro-batch": "test_recovery.py: accumulation over micro-batches gives the same training",
    "-h": "argparse's help",
}
#: the context each group of flags needs, and values for flags whose type alone does not give a valid one
RECOVER = ("--recover", "auto", "--val-windows", 2, "--recover-steps", 2, "--recover-batch", 2,
           "--recover-val-every", 1, "--recover-recon-windows", 2, "--recover-recon-epochs", 1)
HYPER = ("--method", "hypernetwork", "--hypernetwork-steps", 2, "--hypernetwork-val-every", 1, "--val-windows", 2)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


_TIMED = ("speed", "tokens_per_second_before", "tokens_per_second_after",  # measured or not, not their values
          "generation_seconds")


def _without_timings(value):
    if isinstance(value, dict):
        return {k: (v is None) if k in _TIMED else _without_timings(v) for k, v in value.items()
                if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _current(action, base: tuple):
    """The flag's value in the ``base`` run: what it sets there, else its default."""
    flag = action.option_strings[0]
    if type(action).__name__ == "BooleanOptionalAction":
        return True if flag in base else False if f"--no-{flag[2:]}" in base else action.default
    return base[base.index(flag) + 1] if flag in base else action.default


def _alternative(action, word_text, tmp_path, base: tuple) -> list:
    flag = action.option_strings[0]
    current = _current(action, base)
    # --device: a machine without a GPU has no other device that computes; the walk sees the refusal
    special = {"--calibration": "ptb", "--eval-text": [word_text, "ptb"], "--recover-text": "ptb",
               "--work-dir": str(tmp_path / "elsewhere"), "--device": "meta", "--text": "ptb",
               "--split": "calibration", "--max-windows": 1, "--lr-schedule": "cosine", "--decay-steps": 1,
               "--recover-lora-alpha": 4.0, "--recover-teacher-topk": 8, "--recover-windows": 2,
               "--eval-seq-len": 8, "--seq-len": 12,
               "--recover-teacher-dtype": "bfloat16"}  # auto keeps the teacher's dtype under --recover auto
    if flag in special:
        value = special[flag]
        return [] if value is None else [flag, *value] if isinstance(value, list) else [flag, value]
    if type(action).__name__ == "BooleanOptionalAction":
        if current is None:  # an automatic switch: the opposite of what it resolves to in this run
            current = {"--prune-heads": True, "--recover-autocast": bf16_native("cpu")}[flag]  # 2 KV heads a layer
        return [flag] if not current else [f"--no-{flag[2:]}"]
    if action.choices:
        return [flag, next(c for c in action.choices if c != current)]
    if action.type is int:
        return [flag, (current or 1) + 1]
    if action.type is float:
        return [flag, (current or 1.0) * 2 if current != 0 else 0.5]
    raise AssertionError(f"no alternative value for {flag}")


def _context(dest: str) -> tuple:
    """The flags that give ``dest`` a role in a prune run."""
    if dest in {f.name for f in dataclasses.fields(RecoveryConfig)}:
        return RECOVER
    if dest in {flag_dest(f.name, "hypernetwork") for f in dataclasses.fields(HypernetworkConfig)}:
        return HYPER
    if dest == "refit_damping":
        return ("--refit", "on")
    return ()



def command_actions(command: str):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    return [(command, a) for a in parser._actions
            if a.option_strings and a.option_strings[0] not in EFFECT_ELSEWHERE]


@pytest.fixture(scope="module")
def models(tmp_path_factory, word_tokenizer):
    """A dense tiny Llama folder, another of the same shapes (other weights) and a compacted one."""
    import dip_ext

    folders = {}
    for name, seed in (("dense", 0), ("other", 1), ("pruned", 0)):
        folder = tmp_path_factory.mktemp(name)
        model = tiny_llama(seed=seed, vocab_size=len(word_tokenizer), max_position_embeddings=64)
        if name == "pruned":
            keep = list(range(0, 32, 2))
            dip_ext.compact(model, dip_ext.DispMasks.from_dict({"layers": [
                {"attn_in": keep, "attn_out": keep, "mlp_in": keep, "mlp_mid": list(range(0, 64, 2)),
                 "mlp_out": keep} for _ in range(model.config.num_hidden_layers)]}))
        model.save_pretrained(folder)
        word_tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


def _base(command: str, dest: str, models: dict, word_text: str) -> tuple:
    if command == "prune":
        return ("prune", "--model", models["dense"], "--calibration", word_text, "--method", "oneshot", "--ratio",
                0.4, "--refit", "off", "--seq-len", 16, "--calibration-windows", 4, "--eval-text", word_text,
                "--eval-windows", 1, "--eval-seq-len", 16, "--no-speed", "--quiet", *_context(dest))
    if command == "recover":
        return ("recover", "--model", models["pruned"], "--teacher", models["dense"], "--calibration", word_text,
                "--seq-len", 16, *RECOVER[2:], "--eval-text", word_text, "--eval-windows", 1, "--eval-seq-len",
                16, "--quiet")
    if command == "export":
        return ("export", "--model", models["pruned"], "--to", "decilm")
    if command == "eval":
        return ("eval", "--model", models["dense"], "--text", word_text, "--seq-len", 16, "--max-windows", 2,
                "--quiet")
    return ("info", "--no-assets")


def observe(capsys, argv, out: Path, work: Path) -> tuple:
    """What a run did: exit status, then stdout for commands that write nothing, else the saved report (without
    timings), the saved weights, the files written and the checkpoints; and whether progress was shown."""
    code, stdout, err = run_cli(capsys, *argv)
    if code != 0:
        return (code,)
    if not out.is_dir():
        return code, stdout, bool(err)
    report = json.loads(next(p for p in (out / "report.json", out / "recovery.json", out / "export.json")
                             if p.is_file()).read_text())
    files = sorted(p.name for p in out.iterdir())
    checkpoints = sorted(str(p.relative_to(work)) for p in work.rglob("*")) if work.is_dir() else []
    return code, json.dumps(_without_timings(report), sort_keys=True), _digest(out), files, checkpoints, bool(err)


ALL = [*command_actions("prune"), *command_actions("recover"), *command_actions("eval"), *command_actions("export"),
       *command_actions("info")]


@pytest.mark.parametrize("command, action", ALL, ids=[f"{c} {a.option_strings[0]}" for c, a in ALL])
def test_every_flag_changes_the_run_or_is_refused(capsys, tmp_path, models, word_text, command, action,
                                                  monkeypatch, one_thread):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    flag = action.option_strings[0]
    base = _base(command, action.dest, models, word_text)
    writes = command in ("prune", "recover", "export")
    if flag == "--model":  # prune: another dense model of the same shapes; recover: a dense one (refused)
        extra = [flag, models["dense" if command == "recover" else "other"]]
    elif flag == "--teacher":
        extra = [flag, models["other"]]
    elif flag == "--out":
        extra = ["--out", tmp_path / "second"]
    elif (command, flag) == ("info", "--device"):  # a device that exists, given without --selftest
        extra = [flag, "cpu"]
    elif (command, flag) == ("export", "--dtype"):  # the model's own dtype (float32) would change nothing
        extra = [flag, "bfloat16"]
    else:
        extra = _alternative(action, word_text, tmp_path, base)
    first = tmp_path / "a"
    second = first if flag in ("--overwrite", "--resume") else tmp_path / ("second" if flag == "--out" else "b")
    if flag in ("--overwrite", "--resume"):  # they act on an existing output and its checkpoints: made first
        assert run_cli(capsys, *base, "--out", first)[0] == 0
    before = observe(capsys, [*base, *(["--out", first] if writes else [])], first, tmp_path / "a-work")
    work = tmp_path / "elsewhere" if flag == "--work-dir" else second.with_name(second.name + "-work")
    given_out = ["--out", second] if writes and flag != "--out" else []
    after = observe(capsys, [*base, *extra, *given_out], second, work)
    if flag in ("--out", "--work-dir"):  # the same run, written elsewhere
        assert after[0] == 0 and (work.is_dir() or command == "export") and second.is_dir()
        assert after[1:3] == before[1:3]
        return
    assert after[0] == 2 or after != before, f"{command} {flag} {extra[1:]} was accepted and changed nothing"
