"""The Pruner's stages one by one, their typed results, reuse of a calibration pass, and a selection method of
one's own: one class plus one registration line, found by the pipeline and the command line by name."""

import dataclasses
import json

import pytest
import torch
from helpers import tiny_llama

import dip_ext
from dip_ext import EvalConfig, PruneConfig, Pruner, RefitConfig
from dip_ext.recovery import RecoveryConfig
from dip_ext.cli import main
from dip_ext.selection import SelectionResult, registry
from dip_ext.selection.oneshot import oneshot_masks

VOCAB, SEQ = 64, 16
WINDOWS = torch.randint(0, VOCAB, (10, SEQ), generator=torch.Generator().manual_seed(0))
NO_EVAL = EvalConfig(eval_windows=0)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield one_thread


class RandomScores:
    """An example selection method: one-shot's budgeted greedy fill on random scores (seeded)."""

    name = "random_scores"
    options_class = None

    def uses_validation(self, options) -> bool:
        return False

    def select(self, inputs, options=None) -> SelectionResult:
        g = torch.Generator().manual_seed(inputs.seed)
        scores = [{s: torch.rand(t.shape, generator=g, dtype=torch.float64) for s, t in layer.items()}
                  for layer in inputs.calibration.scores]
        calib = dataclasses.replace(inputs.calibration, scores=scores)
        return SelectionResult(self.name, oneshot_masks(calib, inputs.budget, inputs.multiple_of))


@pytest.fixture
def random_scores(monkeypatch):
    monkeypatch.setitem(registry._METHODS, "random_scores", RandomScores)  # removed again after the test
    registry.register_method(RandomScores)  # the one registration line a user writes
    yield RandomScores


def test_stages_one_by_one_match_prune_and_compact():
    pruner = Pruner(tiny_llama(), None, PruneConfig(ratio=0.4, method="oneshot", val_windows=0),
                    refit=RefitConfig(refit="on"), recovery=RecoveryConfig(recover="off"), evaluation=NO_EVAL,
                    calibration_tokens=WINDOWS, progress=False)
    windows = pruner.windows()
    assert windows.val is None and torch.equal(windows.train, WINDOWS)
    calib = pruner.calibrate()
    assert isinstance(calib, dip_ext.calibration.CalibrationResult) and calib.windows == WINDOWS.shape[0]
    selection = pruner.select()
    assert selection.method == "oneshot" and selection.training is None
    refit = pruner.refit()
    assert isinstance(refit, dip_ext.RefitResult) and refit.mode == "on" and refit.weights > 0
    compaction = pruner.compact()
    assert dip_ext.is_compacted(compaction.model) and compaction.params_after.removed_decoder_linear > 0.39
    model, report = pruner.run()  # the stages that ran do not run again; the dense model is gone: no "before"
    assert model is compaction.model and set(pruner.seconds) == {"calibration data", "calibration pass",
                                                                 "selection", "refit", "compaction", "eval after"}
    ref, ref_report = dip_ext.prune_and_compact(tiny_llama(), None, ratio=0.4, calibration=WINDOWS, method="oneshot", val_windows=0,
                                                refit="on", recover="off", eval_texts=(), progress=False)
    assert ref_report.masks == report.masks
    with torch.no_grad():
        assert torch.equal(ref(WINDOWS[:2]).logits, model(WINDOWS[:2]).logits)


def test_a_stage_runs_the_stages_before_it():
    pruner = Pruner(tiny_llama(), None, PruneConfig(ratio=0.3, method="dependent"), refit=RefitConfig(refit="off"),
                    evaluation=NO_EVAL, calibration_tokens=WINDOWS, progress=False)
    assert pruner.compact().model is not None and pruner.refit() is None
    assert "calibration pass" in pruner.seconds and "refit" not in pruner.seconds


def test_calibration_pass_reused_across_ratios_and_refused_for_other_windows_or_weights():
    first = Pruner(tiny_llama(), None, PruneConfig(ratio=0.3, method="oneshot"), refit=RefitConfig(refit="off"),
                   evaluation=NO_EVAL, calibration_tokens=WINDOWS, progress=False)
    calib = first.calibrate()
    again = Pruner(tiny_llama(), None, PruneConfig(ratio=0.5, method="oneshot"), refit=RefitConfig(refit="off"),
                   evaluation=NO_EVAL, calibration_tokens=WINDOWS, calibration=calib, progress=False)
    assert again.calibrate() is calib and "calibration pass" not in again.seconds
    other_windows = Pruner(tiny_llama(), None, PruneConfig(ratio=0.5, method="oneshot"),
                           refit=RefitConfig(refit="off"), evaluation=NO_EVAL, calibration_tokens=WINDOWS[:8],
                           calibration=calib, progress=False)
    with pytest.raises(ValueError, match="other windows"):
        other_windows.calibrate()
    other_weights = Pruner(tiny_llama(seed=1), None, PruneConfig(ratio=0.5, method="oneshot"),
                           refit=RefitConfig(refit="off"), evaluation=NO_EVAL, calibration_tokens=WINDOWS,
                           calibration=calib, progress=False)
    with pytest.raises(ValueError, match="other weights"):
        other_weights.calibrate()


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=PruneConfig(method="magic")), "unknown method 'magic'"),
    (dict(config=PruneConfig(method="oneshot"), method_options=dip_ext.HypernetworkConfig()), "takes no options"),
    (dict(config="oneshot"), "config must be a PruneConfig"),
    (dict(config=PruneConfig(seq_len=128)), "longer than the model's 64 positions"),
    (dict(evaluation=EvalConfig(eval_seq_len=65)), "eval_seq_len 65 is longer"),
])
def test_bad_pruner_arguments_are_refused_before_any_work(kwargs, match):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"config": PruneConfig(method="oneshot"), "evaluation": NO_EVAL, "calibration_tokens": WINDOWS, **kwargs}
    with pytest.raises(ValueError, match=match):
        Pruner(model, None, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_compacted_model_is_refused():
    model, _ = dip_ext.prune_and_compact(tiny_llama(), None, ratio=0.3, calibration=WINDOWS, method="oneshot", refit="off", eval_texts=(),
                                         progress=False)
    with pytest.raises(ValueError, match="needs the dense model"):
        Pruner(model, None, PruneConfig(method="oneshot"), evaluation=NO_EVAL, calibration_tokens=WINDOWS)


def test_a_method_of_ones_own_runs_in_the_pipeline(random_scores):
    assert "random_scores" in dip_ext.method_names()
    model, report = dip_ext.prune_and_compact(tiny_llama(), None, ratio=0.4, calibration=WINDOWS, method="random_scores", refit="off",
                                              eval_texts=(), progress=False)
    assert report.method == "random_scores" and dip_ext.is_compacted(model)
    assert report.budget["removed_fraction_decoder_linear"] == pytest.approx(0.4, abs=0.02)
    oneshot, _ = dip_ext.prune_and_compact(tiny_llama(), None, ratio=0.4, calibration=WINDOWS, method="oneshot", refit="off", eval_texts=(),
                                           progress=False)
    assert report.masks != dip_ext.DispMasks.from_config(oneshot.config.disp_masks)


def test_a_method_of_ones_own_on_the_command_line(random_scores, tmp_path, word_tokenizer, word_text, capsys):
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    code = main(["prune", "--model", str(folder), "--method", "random_scores", "--calibration", word_text,
                 "--seq-len", "16", "--calibration-windows", "4", "--eval-windows", "0", "--refit", "off",
                 "--quiet", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = dip_ext.PruneReport.load(tmp_path / "out")
    assert report.method == "random_scores" and dip_ext.from_pretrained(tmp_path / "out") is not None
    # an option of another method is refused rather than ignored
    code = main(["prune", "--model", str(folder), "--method", "random_scores", "--steps", "9",
                 "--calibration", word_text, "--out", str(tmp_path / "out2")])
    assert code == 2 and "--hypernetwork-steps is an option of --method hypernetwork" in capsys.readouterr().err


def test_register_method_checks_the_protocol():
    class NoName:
        options_class = None

    class NoSelect:
        name = "no_select"
        options_class = None

        def uses_validation(self, options):
            return False

    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        registry.register_method(NoName)
    with pytest.raises(TypeError, match="has no method select"):
        registry.register_method(NoSelect)


@pytest.mark.parametrize("entry", ["calibration", "refit", "statistics", "hypernetwork", "budget"])
def test_every_entry_point_that_needs_a_dense_model_says_so(entry):
    from dip_ext.calibration import run_calibration
    from dip_ext.refit import collect_input_grams, refit_pruned_inputs
    from dip_ext.selection import Budget
    from dip_ext.selection.hypernetwork import Trainer

    dense = tiny_llama()
    masks = dip_ext.DispMasks.full(dip_ext.families.adapter_for(dense).dims(dense.config))
    compacted = dip_ext.compact(tiny_llama(), masks)
    budget = Budget.for_model(dense, 0.3)
    calls = {"calibration": lambda m: run_calibration(m, WINDOWS, progress=False),
             "refit": lambda m: refit_pruned_inputs(m, masks, WINDOWS, progress=False),
             "statistics": lambda m: collect_input_grams(m, masks, WINDOWS, progress=False),
             "hypernetwork": lambda m: Trainer(m, WINDOWS, budget, dip_ext.HypernetworkConfig(steps=1)),
             "budget": lambda m: Budget.for_model(m, 0.3)}
    with pytest.raises(ValueError, match="needs the dense model; this one is already compacted"):
        calls[entry](compacted)
    if entry != "budget":  # the dense model passes the same entry point's check
        calls[entry](dense)


def test_recovery_stage_runs_after_compaction_and_reaches_the_report(tmp_path, word_tokenizer, word_text):
    from dip_ext.recovery import RecoveryConfig

    pruner = Pruner(tiny_llama(), word_tokenizer, PruneConfig(ratio=0.4, method="oneshot", calibration=word_text,
                                                              seq_len=16, calibration_windows=4, val_windows=2),
                    refit=RefitConfig(refit="off"),
                    recovery=RecoveryConfig(recover="distill", recover_steps=3, recover_lr=1e-2, recover_batch=2,
                                            recover_val_every=1),
                    evaluation=EvalConfig(eval_text=[word_text], eval_windows=2, eval_seq_len=16, speed=False),
                    progress=False)
    assert pruner.windows().val is not None  # recovery early-stops on held-out windows
    model, report = pruner.run()
    assert report.recovery.mode == "distill" and "recovery" in report.seconds
    if report.recovery.chosen:  # the recovered model was scored again
        assert set(report.perplexity_recovered) == {word_text}
    assert report.recovery.val_loss_after <= report.recovery.val_loss_before  # the best step is kept
    report.save(tmp_path)
    assert "## Recovery" in (tmp_path / "report.md").read_text() and (tmp_path / "recovery.png").is_file()


def test_recovery_teacher_is_the_dense_model_as_loaded_not_the_refit_one(monkeypatch):
    from dip_ext import pipeline
    from dip_ext.recovery import RecoveryConfig

    original = tiny_llama()
    seen = {}

    def capture(student, teacher, *args, **kwargs):  # the stage's call, recorded instead of training
        seen["teacher"] = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        return pipeline.RecoveryResult(mode="distill", options={})

    monkeypatch.setattr(pipeline, "recover", capture)
    pruner = Pruner(tiny_llama(), None, PruneConfig(ratio=0.4, method="oneshot", val_windows=0),
                    refit=RefitConfig(refit="on"), recovery=RecoveryConfig(recover="distill", recover_steps=1),
                    evaluation=NO_EVAL, calibration_tokens=WINDOWS, progress=False)
    assert pruner.refit().weights > 0  # the refit rewrote dense weights in place before the compaction
    pruner.recover()
    for name, p in original.named_parameters():
        assert torch.equal(seen["teacher"][name], p), name
