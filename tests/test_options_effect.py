"""Every option takes effect or is refused; a refused resume names what differs; the installed versions are the
tested ones and dip_ext's loaders keep hub kernels off."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_llama
from packaging.requirements import Requirement
from transformers import PreTrainedModel

import dip_ext
from dip_ext import PruneConfig, Pruner, RefitConfig
from dip_ext.config import EvalConfig
from dip_ext.recovery import RecoveryConfig

ROOT = Path(__file__).resolve().parents[1]
NO_EVAL = EvalConfig(eval_windows=0, speed=False)
WINDOWS = torch.randint(3, 60, (12, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield one_thread


def other_value(field: dataclasses.Field, word_text: str) -> str:
    """A valid non-default value of a recovery option, as its flag's argument."""
    default = field.default
    hint = typing.get_type_hints(RecoveryConfig)[field.name]
    kind = typing.get_origin(hint) or hint
    text = str(hint)
    if kind is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != default)
    if default is None and "str" in text:
        return word_text
    if isinstance(default, bool):
        return ""  # a store_true / --no- flag, handled by the caller
    if isinstance(default, int) or (default is None and "int" in text):
        return str((default or 1) + 1)
    if isinstance(default, float) or (default is None and "float" in text):
        return str((default or 1.0) * 2 if default != 0 else 0.5)
    raise AssertionError(f"no test value for {field.name} ({kind})")


def flag_args(field: dataclasses.Field, word_text: str) -> list[str]:
    name = "--" + field.name.replace("_", "-")
    if bool in (typing.get_args(typing.get_type_hints(RecoveryConfig)[field.name]) or (type(field.default),)):
        # a switch (an automatic one defaults to None): given as the flag that is not the default
        return [name] if field.default is not True else ["--no-" + field.name.replace("_", "-")]
    return [name, other_value(field, word_text)]


def cli(capsys, *argv):
    code, _, err = run_cli(capsys, *argv)
    return code, err


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(RecoveryConfig) if f.name != "recover"],
                         ids=lambda f: f.name)
def test_every_recovery_flag_is_refused_with_recovery_off(capsys, tmp_path, word_text, field):
    """Given with ``--recover off`` a recovery flag would change nothing: refused in one line."""
    code, err = cli(capsys, "prune", "--calibration", word_text, "--out", tmp_path / "o", "--recover", "off",
                    *flag_args(field, word_text))
    assert code == 2 and err.count("\n") == 1, err
    assert f"--{field.name.replace('_', '-')} has no effect with --recover off" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("refit", ["off", "auto"])
def test_refit_damping_is_refused_where_it_is_not_used(capsys, tmp_path, word_text, refit):
    code, err = cli(capsys, "prune", "--calibration", word_text, "--out", tmp_path / "o", "--refit", refit,
                    "--refit-damping", "0.5")
    assert code == 2 and f"--refit-damping has no effect with --refit {refit}" in err


def _recovered_windows(monkeypatch, word_tokenizer, **recovery) -> torch.Tensor:
    from dip_ext import pipeline

    seen = {}

    def capture(student, teacher, train, *args, **kwargs):  # the stage's call, recorded instead of training
        seen["train"] = train.clone()
        return pipeline.RecoveryResult(mode="distill", options={})

    monkeypatch.setattr(pipeline, "recover", capture)
    pruner = Pruner(tiny_llama(vocab_size=len(word_tokenizer)), word_tokenizer,
                    PruneConfig(ratio=0.4, method="oneshot", val_windows=2, seq_len=16,
                                calibration=recovery.pop("calibration")),
                    refit=RefitConfig(refit="off"), recovery=RecoveryConfig(recover="distill", **recovery),
                    evaluation=NO_EVAL, progress=False)
    pruner.recover()
    return seen["train"]


def test_prune_recovery_trains_on_recover_text_and_recover_windows(monkeypatch, word_tokenizer, word_text,
                                                                     tmp_path):
    plain = _recovered_windows(monkeypatch, word_tokenizer, calibration=word_text)
    capped = _recovered_windows(monkeypatch, word_tokenizer, calibration=word_text, recover_windows=3)
    assert capped.shape[0] == 3 < plain.shape[0]
    assert all(any(torch.equal(w, p) for p in plain) for w in capped)  # a subset of the same windows
    other = tmp_path / "other.txt"
    other.write_text(" ".join(["alpha beta gamma"] * 400))
    elsewhere = _recovered_windows(monkeypatch, word_tokenizer, calibration=word_text, recover_text=f"file:{other}")
    assert not any(torch.equal(w, p) for w in elsewhere for p in plain)


def test_prune_refuses_an_evaluation_text_as_recovery_text(word_tokenizer, word_text):
    with pytest.raises(ValueError, match="also an evaluation text"):
        Pruner(tiny_llama(vocab_size=len(word_tokenizer)), word_tokenizer, PruneConfig(calibration=word_text),
               recovery=RecoveryConfig(recover="distill", recover_text="ptb"),
               evaluation=EvalConfig(eval_text=[word_text, "ptb"]))


# ---- a refused resume names what differs --------------------------------------------------------------------

def _calibrate(work, resume, dtype=torch.float32, **config):
    model = tiny_llama().to(dtype)
    pruner = Pruner(model, None, PruneConfig(ratio=0.4, method="oneshot", val_windows=0, **config),
                    refit=RefitConfig(refit="off"), evaluation=NO_EVAL, calibration_tokens=WINDOWS,
                    work_dir=work, resume=resume, progress=False)
    return pruner.calibrate()


def test_calibration_resume_names_the_option_that_differs(tmp_path):
    _calibrate(tmp_path / "w", resume=False)
    with pytest.raises(ValueError, match=r"different run.*\(settings\.dtype: checkpoint 'float32' vs now 'float64'"):
        _calibrate(tmp_path / "w", resume=True, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"calibration_windows: checkpoint 64 vs now 5"):
        _calibrate(tmp_path / "w", resume=True, calibration_windows=5)
    assert _calibrate(tmp_path / "w", resume=True).windows == WINDOWS.shape[0]


def test_recovery_resume_names_the_option_that_differs(tmp_path, word_tokenizer, word_text, capsys):
    dense = tmp_path / "dense"
    tiny_llama(vocab_size=len(word_tokenizer)).save_pretrained(dense)
    word_tokenizer.save_pretrained(dense)
    argv = ("prune", "--model", dense, "--calibration", word_text, "--method", "oneshot", "--refit", "off",
            "--seq-len", 16, "--val-windows", 2, "--eval-windows", 0, "--no-speed", "--quiet", "--recover", "distill",
            "--recover-steps", 2, "--recover-batch", 1, "--recover-checkpoint-every", 1, "--out", tmp_path / "out")
    assert cli(capsys, *argv)[0] == 0
    code, err = cli(capsys, *argv, "--resume", "--recover-lr", "0.001")
    assert code == 2 and "recover_lr: checkpoint 0.0003 vs now 0.001" in err, err


# ---- versions: what was tested is what installs --------------------------------------------------------------

def _requirements(path: Path) -> list[Requirement]:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln]


def test_the_lock_pins_every_development_requirement_inside_its_range():
    locked = {r.name.lower().replace("_", "-"): r for r in _requirements(ROOT / "requirements-lock.txt")}
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in locked.values())
    for req in _requirements(ROOT / "requirements-dev.txt"):
        pin = locked.get(req.name.lower().replace("_", "-"))
        assert pin is not None, f"{req.name} is not in requirements-lock.txt"
        version = next(iter(pin.specifier)).version
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} outside {req.specifier}"


def test_package_ranges_admit_the_locked_versions_and_stop_at_the_tested_ones():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = {r.name.lower().replace("_", "-"): next(iter(r.specifier)).version
              for r in _requirements(ROOT / "requirements-lock.txt")}
    for line in project["dependencies"]:
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert req.specifier.contains(locked[name], prereleases=True), f"{line} excludes the locked {locked[name]}"
        exact = any(s.operator == "==" for s in req.specifier)
        assert exact or any(s.operator in ("<", "<=") for s in req.specifier), f"{line} has no upper bound"


def test_loading_keeps_hub_kernels_off_unless_asked(monkeypatch, tmp_path):
    model = tiny_llama()
    masks = dip_ext.DispMasks.from_dict({"layers": [
        {"attn_in": list(range(0, 32, 2)), "attn_out": list(range(0, 32, 2)), "mlp_in": list(range(32)),
         "mlp_mid": list(range(0, 64, 2)), "mlp_out": list(range(32))} for _ in range(model.config.num_hidden_layers)]})
    dip_ext.compact(model, masks)
    model.save_pretrained(tmp_path)
    seen = []
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("use_kernels"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    dip_ext.from_pretrained(tmp_path)
    dip_ext.from_pretrained(tmp_path, device_map={"": "meta"})
    assert seen == [False, False]
    with pytest.raises(Exception, match=re.compile("kernel", re.I)):
        dip_ext.from_pretrained(tmp_path, use_kernels=True, kernel_config=object())


@pytest.mark.parametrize("mode, field, value", [("distill", "recover_recon_lr", 1e-3),
                                                ("distill", "recover_recon_windows", 8),
                                                ("reconstruct", "recover_steps", 5),
                                                ("reconstruct", "recover_lora_rank", 4)])
def test_an_option_of_the_other_recovery_method_is_refused(mode, field, value):
    with pytest.raises(ValueError, match=f"{field} has no effect with recover='{mode}'"):
        RecoveryConfig(recover=mode, **{field: value})
    RecoveryConfig(recover="auto", **{field: value})  # auto runs both: accepted
