"""Parameter reports, the pruning report, the exports and the loading checks read the family's prunable space.

Reports of a family whose layers differ list every structure any layer has, ``-`` where a layer lacks one, and a
``full`` row of the widths the layers agree on; the zero-padded exports know only the built-in layout and refuse
another in one line; vLLM's partial-group check reads each layer's group count from the space.
"""

import copy
import json

import pytest
from helpers import tiny_llama
from transformers import AttentionInterface

import dip_ext
from dip_ext import (DispMasks, EvalConfig, ParamReport, PruneConfig, PruneReport, RecoveryConfig, RefitConfig,
                     RunConfigs, UnsupportedModelError, export_decilm, param_report)
from dip_ext.benchmarking import random_masks
from dip_ext.families import adapter_for
from dip_ext.space import PrunableSpace, Structure
from dip_ext.zero_pad import check_exportable

H = 8
DENSE = (Structure("attn_in", H, "hidden"), Structure("mlp_mid", 12, "ffn"), Structure("mlp_out", H, "hidden"))
EXPERT = (Structure("attn_in", H, "hidden"), Structure("experts", 4, "experts", whole_units=True),
          Structure("mlp_out", H, "hidden"))
SPACE = PrunableSpace(H, (DENSE, EXPERT, DENSE))


def hetero_report() -> ParamReport:
    widths = [{"attn_in": 4, "mlp_mid": 6, "mlp_out": 8}, {"attn_in": 8, "experts": 3, "mlp_out": 2},
              {"attn_in": 2, "mlp_mid": 12, "mlp_out": 5}]
    return ParamReport(100, 60, 200, 150, widths, SPACE.full_widths())


def test_a_table_shows_what_each_layer_has():
    report = hetero_report()
    assert report.structures == ("attn_in", "mlp_mid", "mlp_out", "experts")
    lines = report.table().splitlines()
    assert lines[2].split() == ["layer", "attn_in", "mlp_mid", "mlp_out", "experts"]
    assert lines[4].split() == ["1", "8", "-", "2", "3"] and lines[5].split() == ["2", "2", "12", "5", "-"]
    assert lines[6].split() == ["full", "8", "12", "8", "4"]
    odd = ParamReport(1, 1, 1, 1, [{"mlp_mid": 3}, {"mlp_mid": 3}], [{"mlp_mid": 4}, {"mlp_mid": 6}])
    assert odd.table().splitlines()[-1].split() == ["full", "varies"]


def test_param_report_records_per_layer_full_widths_and_reads_the_earlier_form():
    report = hetero_report()
    assert ParamReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    earlier = {**report.to_dict(), "full_widths": {"attn_in": 8, "mlp_mid": 12, "mlp_out": 8}}
    assert ParamReport.from_dict(earlier).full_widths == [{"attn_in": 8, "mlp_mid": 12, "mlp_out": 8}] * 3


def test_param_report_of_a_dense_model_follows_the_space(monkeypatch):
    model = tiny_llama()
    adapter = adapter_for(model)
    full = adapter.space(model.config)
    layers = list(full.layers)
    layers[1] = tuple(s for s in layers[1] if s.name != "mlp_mid")
    monkeypatch.setattr(adapter, "space", lambda config: PrunableSpace(full.hidden, tuple(layers)))
    report = param_report(model)
    assert "mlp_mid" in report.full_widths[0] and "mlp_mid" not in report.full_widths[1]
    assert all("kv_groups" not in f for f in report.full_widths)  # optional: only where masks prune heads
    assert report.widths == report.full_widths and report.table().splitlines()[4].split()[4] == "-"


def test_the_markdown_and_the_plot_of_a_heterogeneous_report(tmp_path):
    masks = random_masks(hetero_report().widths, SPACE, seed=0)
    configs = RunConfigs(PruneConfig(), RefitConfig(), EvalConfig(), RecoveryConfig())
    before = ParamReport(200, 150, 200, 150, SPACE.full_widths(), SPACE.full_widths())
    report = PruneReport("toy", configs, before, hetero_report(), masks)
    markdown = report.to_markdown()
    assert "| layer | attn_in | mlp_mid | mlp_out | experts |" in markdown
    assert "| 1 | 8 | - | 2 | 3 |" in markdown and "| 2 | 2 | 12 | 5 | - |" in markdown
    assert "| full | 8 | 12 | 8 | 4 |" in markdown
    report.plot(tmp_path / "widths.png")
    assert (tmp_path / "widths.png").stat().st_size > 0


def test_exports_refuse_a_space_other_than_the_built_in_layout(monkeypatch, tmp_path):
    model = tiny_llama()
    check_exportable(model.config, "a DeciLM folder")  # the built-in layout: exportable
    adapter = adapter_for(model)
    full = adapter.space(model.config)
    layers = (full.layers[0], tuple(s for s in full.layers[1] if s.name != "mlp_mid"))  # layer 1 without mlp_mid
    monkeypatch.setattr(adapter, "space", lambda config: PrunableSpace(full.hidden, layers))
    with pytest.raises(UnsupportedModelError, match=r"cannot export a llama model as a DeciLM folder: the export "
                                                     r"pads only the built-in prunable layout") as e:
        export_decilm(model, tmp_path / "out")
    assert "\n" not in str(e.value) and "attn_in, attn_out, mlp_in, mlp_out, kv_groups)" in str(e.value)


def test_vllms_partial_group_check_reads_each_layers_groups(monkeypatch):
    """Built by vLLM's Transformers backend, a compacted model refuses a layer keeping some but not all of its own
    KV groups (the count the space gives that layer)."""
    monkeypatch.setitem(AttentionInterface._global_mapping, "vllm", AttentionInterface._global_mapping["sdpa"])
    model = tiny_llama()
    adapter = adapter_for(model)
    full = adapter.space(model.config)
    groups = lambda layer, g: tuple(  # noqa: E731
        Structure(s.name, g, s.axis, s.optional, s.whole_units) if s.name == "kv_groups" else s for s in layer)
    space = PrunableSpace(full.hidden, (groups(full.layers[0], 2), groups(full.layers[1], 4)))
    masks = DispMasks.full(full, heads=True)
    compacted = dip_ext.compact(model, masks)
    config = copy.deepcopy(compacted.config)
    config._attn_implementation = "vllm"
    monkeypatch.setattr(adapter, "space", lambda config: space)
    kept = [dict(layer) for layer in masks.layers]  # layer 0: its 2 groups; layer 1: 2 of its 4
    config.disp_masks = DispMasks(kept).to_config(space)
    with pytest.raises(ValueError, match=r"layers \[1\] of this compacted model keep fewer KV groups than its 4"):
        type(compacted)(config)
