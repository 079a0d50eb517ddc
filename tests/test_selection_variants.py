"""Every width from the module it describes: one-shot, dependent and a 2-step hypernetwork run end to end over
tiny Llama-family, Qwen3 and Gemma3 config variants (KV heads 1..heads, attention / MLP biases, tied or untied
embeddings, sliding windows, Gemma3's sandwich norms, head_dim other than hidden / heads): masks valid for the model's dims, budget met,
compacted model equal to the masked dense reference."""

from __future__ import annotations

import copy

import pytest
import torch

import dip_ext
from dip_ext.calibration import run_calibration
from dip_ext.families import adapter_for
from dip_ext.selection import Budget, HypernetworkConfig, SelectionInputs, get_method

transformers = pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

METHODS = {"oneshot": None, "dependent": None, "hypernetwork": HypernetworkConfig(steps=2, lr=0.05, val_every=1)}


def _model(family: str, heads: int, kv_heads: int, head_dim: int, bias: bool, tied: bool, seed: int):
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=64, max_position_embeddings=64,
                  attention_bias=bias, tie_word_embeddings=tied, initializer_range=0.2)
    torch.manual_seed(seed)
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(use_sliding_window=True, sliding_window=8,
                                                                      max_window_layers=1, **common)).eval()
    if family == "gemma3":
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=head_dim,
            final_logit_softcapping=30.0, **common)).eval()
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=8, **common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(mlp_bias=bias, **common)).eval()


def _check_end_to_end(model, seed: int) -> None:
    dims = adapter_for(model).dims(model.config)
    windows = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(seed))
    calib = run_calibration(model, windows[:4], progress=False)
    budget = Budget.for_model(model, 0.4)
    ids = windows[4:]
    for name, options in METHODS.items():
        inputs = SelectionInputs(model, budget, calib, windows[:4], val_windows=windows[4:], seed=seed,
                                 progress=False)
        masks = get_method(name).select(inputs, options).masks
        masks.validate(dims)
        assert budget.kept_linear(masks.widths()) <= budget.target_linear, name
        with torch.no_grad(), dip_ext.apply_masks(model, masks):
            want = model(ids).logits
        compacted = dip_ext.compact(copy.deepcopy(model), masks)
        with torch.no_grad():
            torch.testing.assert_close(compacted(ids).logits, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["llama", "mistral", "qwen3", "gemma3"]), heads=st.sampled_from([2, 4]), data=st.data(),
       bias=st.booleans(), tied=st.booleans(), seed=st.integers(0, 3))
def test_methods_end_to_end_over_config_variants(family, heads, data, bias, tied, seed):
    kv_heads = data.draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]), label="kv_heads")
    _check_end_to_end(_model(family, heads, kv_heads, 32 // heads, bias, tied, seed), seed)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma3"])
def test_methods_end_to_end_when_head_dim_times_heads_is_not_hidden(family):
    _check_end_to_end(_model(family, 4, 2, 12, False, False, 0), 0)
