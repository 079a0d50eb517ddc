"""``prune_and_compact(model, tokenizer, config, *, method, refit, recovery, evaluation, ...)``: every option in
its config, keyword overrides checked against the configs, the options object picks the method, recovery
reachable; the method registry refuses duplicates."""

from dataclasses import dataclass

import pytest
import torch
from helpers import tiny_llama

import dip_ext
from dip_ext import EvalConfig, HypernetworkConfig, PruneConfig, RecoveryConfig, RefitConfig
from dip_ext.options import option
from dip_ext.recovery.config import bf16_native
from dip_ext.selection import registry
from dip_ext.selection.hypernetwork import Hypernetwork as HypernetworkMethod

WINDOWS = torch.randint(3, 60, (24, 16), generator=torch.Generator().manual_seed(0))
QUIET = dict(evaluation=EvalConfig(eval_windows=0, speed=False), progress=False)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield one_thread


def prune(**kw):
    return dip_ext.prune_and_compact(tiny_llama(), None, calibration=WINDOWS, **{**QUIET, **kw})


def test_the_options_object_picks_the_method_and_overrides_reach_their_config():
    _, report = prune(config=PruneConfig(ratio=0.4, val_windows=2, seq_len=16), method=HypernetworkConfig(steps=2),
                      refit=RefitConfig(refit="off"), lam=4.0)
    assert report.method == "hypernetwork" and report.ratio == 0.4
    assert report.configs.method_options == HypernetworkConfig(steps=2, lam=4.0)
    # the report records what ran: KV groups compete by default in a Llama with several KV heads per layer
    assert report.configs.prune == PruneConfig(method="hypernetwork", ratio=0.4, val_windows=2, seq_len=16,
                                               prune_heads=True)
    _, same = prune(ratio=0.4, val_windows=2, seq_len=16, method="hypernetwork", steps=2, refit="off", lam=4.0)
    assert same.masks == report.masks  # the short form is the same run


def test_recovery_is_reachable():
    _, report = prune(ratio=0.4, val_windows=2, seq_len=16, method="oneshot", refit="off",
                      recovery=RecoveryConfig(recover="distill", recover_steps=1, recover_batch=1))
    assert report.recovery is not None and report.recovery.mode == "distill"
    native = bf16_native("cpu")  # the automatic choices as made here: no tokenizer, so the recovery text alone
    assert report.configs.recovery == RecoveryConfig(
        recover="distill", recover_steps=1, recover_batch=1, recover_data="text", recover_autocast=native,
        recover_teacher_dtype="bfloat16" if native else "same")


@pytest.mark.parametrize("kw, error, match", [
    (dict(ratioo=0.3), TypeError, "unexpected keyword argument 'ratioo'"),
    (dict(method="oneshot", steps=5), TypeError, "steps is an option of HypernetworkConfig"),
    (dict(hypernetwork_options={"steps": 5}), TypeError, r"hypernetwork_options is gone; pass method=Hyper"),
    (dict(method_options=HypernetworkConfig()), TypeError, "method_options is gone"),
    (dict(config=0.3), TypeError, "config must be a PruneConfig, got float"),
    (dict(recovery="distill"), TypeError, "expected a RecoveryConfig, got str"),
    (dict(ratio=2.0), ValueError, "ratio must be"),
    (dict(method=RefitConfig()), ValueError, "RefitConfig is not the options class of a registered method"),
])
def test_bad_options_are_refused_naming_them(kw, error, match):
    with pytest.raises(error, match=match):
        prune(**kw)


def test_old_keywords_keep_working():
    _, report = prune(ratio=0.3, method="oneshot", refit="off", seq_len=16, val_windows=0, eval_texts=(),
                      measure_speed=False)
    assert report.method == "oneshot" and report.perplexity_before == {}


def test_the_registry_refuses_a_taken_name_or_options_class():
    class Impostor(HypernetworkMethod):
        pass

    with pytest.raises(ValueError, match="already registered as 'hypernetwork'"):
        registry.register_method(Impostor)
    assert registry.get_method("hypernetwork").__class__ is HypernetworkMethod

    class Twin(HypernetworkMethod):
        name = "twin"

    with pytest.raises(ValueError, match="HypernetworkConfig already picks the method 'hypernetwork'"):
        registry.register_method(Twin)
    registry.register_method(Impostor, replace=True)
    try:
        assert registry.get_method("hypernetwork").__class__ is Impostor
    finally:
        registry.register_method(HypernetworkMethod, replace=True)


# ---- a second trained method on the command line --------------------------------------------------------------

@dataclass(frozen=True)
class ToyConfig:
    """A trained method's options with the names the hypernetwork's also has."""

    _argument_group_name = "toy (--method toy)"
    steps: int = option(7, "steps", minimum=0)
    lr: float = option(0.5, "learning rate", above=0.0)
    batch_size: int = option(1, "windows per step", minimum=1)


class Toy:
    """Every dimension kept whatever it learns: what is checked here is where its options come from."""

    name = "toy"
    options_class = ToyConfig
    seen: list = []

    def uses_validation(self, options) -> bool:
        return False

    def select(self, inputs, options: ToyConfig):
        Toy.seen.append(options)
        return registry.get_method("oneshot").select(inputs, None)


@pytest.fixture
def toy():
    registry.register_method(Toy)
    Toy.seen.clear()
    yield Toy
    registry.unregister_method("toy")


def test_a_second_trained_method_gets_flags_of_its_own(toy, capsys, tmp_path, word_tokenizer, word_text):
    from helpers import run_cli

    code, out, _ = run_cli(capsys, "prune", "--help")
    assert code == 0 and "--toy-steps" in out and "--hypernetwork-steps" in out and "--toy-batch-size" in out
    folder = tmp_path / "dense"
    tiny_llama(vocab_size=len(word_tokenizer)).save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    run = ("prune", "--model", folder, "--calibration", word_text, "--method", "toy", "--seq-len", 16,
           "--refit", "off", "--eval-windows", 0, "--no-speed", "--quiet")
    code, _, err = run_cli(capsys, *run, "--toy-steps", 3, "--toy-lr", 0.1, "--out", tmp_path / "o")
    assert code == 0, err
    assert Toy.seen == [ToyConfig(steps=3, lr=0.1)]
    code, _, err = run_cli(capsys, *run, "--steps", 3, "--out", tmp_path / "o2")  # the hypernetwork's alias
    assert code == 2 and "--hypernetwork-steps is an option of --method hypernetwork, not of --method toy" in err
