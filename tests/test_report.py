"""The report is typed and serialized once: ``report.json`` reloads into the same report and into the configs that
made it (and those configs rerun the same run: its checkpoints are accepted); configs round-trip through
``to_dict`` / ``from_dict`` with a format version; a report of the earlier format is refused naming it."""

import json

import pytest
import torch
from helpers import tiny_llama

import dip_ext
from dip_ext import (EvalConfig, HypernetworkConfig, PruneConfig, PruneReport, RecoveryConfig, RefitConfig,
                     RunConfigs, TrainingSummary)
from dip_ext.recovery.config import bf16_native
from dip_ext.selection import registry

WINDOWS = torch.randint(3, 60, (24, 16), generator=torch.Generator().manual_seed(0))
NO_EVAL = EvalConfig(eval_windows=0, speed=False)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield one_thread


def run(work_dir=None, resume=False, **kwargs):
    return dip_ext.prune_and_compact(tiny_llama(), None, calibration=WINDOWS, progress=False, work_dir=work_dir,
                                     resume=resume, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A hypernetwork run with a refit and a recovery, its work folder and its saved report."""
    folder = tmp_path_factory.mktemp("report")
    configs = dict(config=PruneConfig(ratio=0.4, val_windows=2, seq_len=16, calibration_windows=12),
                   method=HypernetworkConfig(steps=2, val_every=1, lr=0.01), refit=RefitConfig(refit="on"),
                   recovery=RecoveryConfig(recover="distill", recover_steps=1, recover_batch=1), evaluation=NO_EVAL)
    _, report = run(work_dir=folder / "work", **configs)
    report.save(folder)
    return report, folder


@pytest.mark.parametrize("options", [
    PruneConfig(method="oneshot", ratio=0.25, ratio_of="total", calibration="ptb", seq_len=32, multiple_of=8, seed=3),
    RefitConfig(refit="on", refit_damping=0.5),
    EvalConfig(eval_text=["ptb"], eval_windows=None, eval_seq_len=64, speed=False),
    RecoveryConfig(recover="distill", recover_steps=7, recover_lr=3e-4),
    HypernetworkConfig(steps=11, lr=0.02, lr_schedule="cosine", distill=True, margin=1.5),
], ids=lambda o: type(o).__name__)
def test_configs_round_trip_through_json(options):
    data = json.loads(json.dumps(options.to_dict()))
    back = type(options).from_dict(data, version=type(options).VERSION)
    assert back == options and back.to_dict() == options.to_dict()
    assert type(options).from_dict({}) == type(options)()  # a field left out takes its default


def test_config_records_name_what_they_cannot_read():
    with pytest.raises(ValueError, match=r"PruneConfig has no option 'ratoi' \(its options: method, ratio"):
        PruneConfig.from_dict({"ratoi": 0.3})
    with pytest.raises(ValueError, match=r"format version 7; this dip_ext reads version 1"):
        RefitConfig.from_dict({}, version=7)
    with pytest.raises(ValueError, match=r"ratio must be a finite number in \(0, 1\), got 2"):
        PruneConfig.from_dict({"ratio": 2})
    with pytest.raises(ValueError, match=r"method 'oneshot' takes no options, but the record has options"):
        RunConfigs.from_dict({**RunConfigs(PruneConfig(method="oneshot"), RefitConfig(), EvalConfig(),
                                           RecoveryConfig()).to_dict(),
                              "method_options": {"version": 1, "fields": {}}})


def test_report_json_reloads_into_the_same_typed_report(trained):
    report, folder = trained
    loaded = PruneReport.load(folder)
    assert loaded == report  # every member, typed
    assert isinstance(loaded.selection, TrainingSummary) and isinstance(loaded.refit, dip_ext.RefitResult)
    assert isinstance(loaded.params_after, dip_ext.ParamReport) and isinstance(loaded.masks, dip_ext.DispMasks)
    assert loaded.to_markdown() == report.to_markdown()
    native = bf16_native("cpu")  # the report records the automatic choices as they were made
    assert loaded.configs == RunConfigs(
        prune=PruneConfig(method="hypernetwork", ratio=0.4, val_windows=2, seq_len=16, calibration_windows=12,
                          prune_heads=True),  # a Llama with two KV heads per layer
        refit=RefitConfig(refit="on"), evaluation=NO_EVAL,
        recovery=RecoveryConfig(recover="distill", recover_steps=1, recover_batch=1, recover_data="text",
                                recover_autocast=native, recover_teacher_dtype="bfloat16" if native else "same"),
        method_options=HypernetworkConfig(steps=2, val_every=1, lr=0.01))
    assert loaded.recovery.mode == "distill" and loaded.refit.mode == "on" and loaded.selection.steps == 2


def test_the_reloaded_configs_rerun_the_same_run(trained, tmp_path):
    """Same options, same serialization, same fingerprint: a resume in the first run's work folder accepts its
    checkpoints (the hypernetwork continues from its last step) and picks the same masks."""
    report, folder = trained
    configs = PruneReport.load(folder / "report.json").configs
    _, again = run(work_dir=folder / "work", resume=True, **configs.kwargs())
    assert again.resumed and again.selection.start_step == report.selection.steps
    assert again.masks == report.masks and again.configs == report.configs
    # changed options are refused by the same checkpoints, naming the option
    changed = configs.kwargs() | {"method": HypernetworkConfig(steps=2, val_every=1, lr=0.02)}
    with pytest.raises(ValueError, match=r"lr"):
        run(work_dir=folder / "work", resume=True, **changed)


def test_a_trained_method_renders_its_own_lines(trained):
    report, _ = trained
    lines = "\n".join(report.selection.markdown_lines("my_method", 5))
    assert lines.startswith("\nmy_method: trained 2 steps") and "on 5 held-out calibration windows" in lines
    assert "hypernetwork: trained 2 steps" in report.to_markdown()
    assert "Refit (on):" in report.to_markdown() and "## Recovery" in report.to_markdown()


def test_a_report_of_the_earlier_format_is_refused(tmp_path):
    old = {"model": "m", "method": "oneshot", "ratio": 0.3, "ratio_of": "decoder_linear", "options": {}}
    (tmp_path / "report.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"earlier dip_ext \(report format 1\); this one reads format 2"):
        PruneReport.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no report at"):
        PruneReport.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"report format version 9"):
        PruneReport.from_dict({"format": "dip_ext.report", "version": 9})


class Counted:
    """A method that 'trains' (it reports a training summary) and renders its own report lines."""

    name = "counted"
    options_class = None

    def uses_validation(self, options) -> bool:
        return False

    def select(self, inputs, options):
        chosen = registry.get_method("oneshot").select(inputs, None)
        return dip_ext.SelectionResult("counted", chosen.masks, training=TrainingSummary(steps=5))

    def report_lines(self, training, val_windows):
        return ["", f"Counted {training.steps} sheep (held out: {val_windows})."]


def test_a_method_renders_its_own_lines_and_a_report_reads_without_it(tmp_path):
    registry.register_method(Counted)
    try:
        _, report = run(config=PruneConfig(method="counted", ratio=0.4, seq_len=16), evaluation=NO_EVAL,
                        refit=RefitConfig(refit="off"), recovery=RecoveryConfig(recover="off"))
        assert "Counted 5 sheep (held out: 0)." in report.to_markdown()
        report.save(tmp_path)
    finally:
        registry.unregister_method("counted")
    # without the method: reloading is refused by name (its configs name it), and a report in memory renders the
    # training summary's own lines instead
    with pytest.raises(ValueError, match="unknown method 'counted'"):
        PruneReport.load(tmp_path)
    assert "counted: trained 5 steps." in report.to_markdown()


def test_a_run_that_prunes_kv_groups_reports_its_kv_cache(tmp_path):
    """The report gives the KV-cache bytes per token before and after, and the kept groups per layer in the widths
    table, the plot and report.json; a run that keeps every head reports an unchanged cache and no group column."""
    model, report = run(config=PruneConfig(ratio=0.4, kv_ratio=0.5, seq_len=16, calibration_windows=12,
                                           val_windows=0), recovery=RecoveryConfig(recover="off"), evaluation=NO_EVAL)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    groups = [w["kv_groups"] if w["attn_out"] else 0 for w in model.disp_masks.widths()]
    dense, kept = report.budget["kv_cache_bytes_per_token_dense"], report.budget["kv_cache_bytes_per_token_kept"]
    assert dense == config.num_hidden_layers * config.num_key_value_heads * 2 * head_dim * 4  # fp32 weights
    assert kept == sum(groups) * 2 * head_dim * 4 and kept <= dense / 2
    markdown = report.to_markdown()
    assert f"| KV-cache bytes per token (float32) | {dense:,} | {kept:,} |" in markdown
    assert "| layer | attn_in | attn_out | mlp_in | mlp_mid | mlp_out | kv_groups |" in markdown
    assert f"| full | {config.hidden_size} |" in markdown and markdown.count(f" | {config.num_key_value_heads} |") >= 1
    report.save(tmp_path)
    assert (tmp_path / "widths.png").stat().st_size > 0
    again = PruneReport.load(tmp_path)
    assert again.masks == report.masks and again.masks.prunes_heads and again.budget == report.budget

    _, plain = run(config=PruneConfig(ratio=0.4, seq_len=16, calibration_windows=12, val_windows=0, prune_heads=False),
                   recovery=RecoveryConfig(recover="off"), evaluation=NO_EVAL)
    assert plain.budget["kv_cache_bytes_per_token_kept"] == plain.budget["kv_cache_bytes_per_token_dense"] == dense
    assert "kv_groups" not in plain.to_markdown() and not plain.masks.prunes_heads
