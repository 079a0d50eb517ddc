"""The one budget fitter (dip_ext.selection.budget.fit_multiple / fit_layer_widths): round down to multiples
(a whole set stays whole), then whole chunks added back in the caller's preference while any fits."""

from __future__ import annotations

import pytest
import torch

from dip_ext.masks import STRUCTURES
from dip_ext.selection import Budget, fit_layer_widths
from dip_ext.selection.budget import round_down

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def budget():
    cfg = transformers.LlamaConfig(hidden_size=36, intermediate_size=60, num_hidden_layers=2, num_attention_heads=3,
                                   num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    return Budget.for_model(transformers.LlamaForCausalLM(cfg), 0.5)


def test_round_down_keeps_whole_sets_whole():
    sizes = torch.tensor([36, 36, 60, 60])
    assert round_down(torch.tensor([36, 35, 60, 7]), sizes, 8).tolist() == [36, 32, 60, 0]
    with pytest.raises(ValueError, match="multiple_of"):
        round_down(torch.tensor([1]), torch.tensor([2]), 0)
    with pytest.raises(ValueError, match="counts must lie"):
        round_down(torch.tensor([3]), torch.tensor([2]), 1)


def test_fit_layer_widths(budget):
    raw = [{"attn_in": 36, "attn_out": 20, "mlp_in": 36, "mlp_mid": 13, "mlp_out": 30},
           {"attn_in": 11, "attn_out": 36, "mlp_in": 17, "mlp_mid": 29, "mlp_out": 36}]
    assert budget.kept_linear(raw) <= budget.target_linear
    # prefer the second layer's sets: they are raised first
    pri = [{s: 0.0 for s in STRUCTURES}, {s: 1.0 for s in STRUCTURES}]
    out = fit_layer_widths(budget, raw, 8, pri)
    assert budget.kept_linear(out) <= budget.target_linear
    for i, w in enumerate(out):
        for s in STRUCTURES:
            n = 60 if s == "mlp_mid" else 36
            assert w[s] % 8 == 0 or w[s] == n
            if w[s] == n and raw[i][s] == n:
                continue
            if w[s] < n:  # no further chunk fits
                more = [dict(x) for x in out]
                more[i][s] += min(8, n - w[s])
                assert budget.kept_linear(more) > budget.target_linear
    assert out[0]["attn_in"] == 36 and out[1]["attn_out"] == 36  # whole sets (36 is no multiple of 8) stay whole
    with pytest.raises(ValueError, match="exceed the budget"):
        fit_layer_widths(budget, [{s: 36 if s != "mlp_mid" else 60 for s in STRUCTURES}] * 2, 8)
    with pytest.raises(ValueError, match="2 layers"):
        fit_layer_widths(budget, raw[:1], 8)
