"""The DeciLM export (``dip_ext.export_decilm``) in stock vLLM: its own ``DeciLMForCausalLM``
(vllm/model_executor/models/nemotron_nas.py, ``model_impl="vllm"``: no dip_ext code runs in the engine) serves the
zero-padded folder with the tokens and log-probabilities of the compacted model it was exported from
(``dip_ext.from_pretrained`` in the reference process). The tiny models of vllm_helpers lose their attention in layer
0 (which vLLM's implementation cannot start with: the export writes a zero attention there) and their MLP in layer 2
(a no-op block); the engine's layers keep the per-layer MLP widths."""

import json

import pytest
from vllm_helpers import PROMPTS, greedy, native, prompt_logprobs

import dip_ext

MAX_TOKENS = 8
FP32_LOGPROB_ATOL = 1e-4
#: the Llama-shaped families the DeciLM export takes (the others are refused: tests/test_export_decilm.py)
FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, compacted_folder, tmp_path_factory):
    """(compacted folder, its DeciLM export) of one family; module-scoped, so one engine serves a family's tests."""
    folder = compacted_folder(request.param)
    out = tmp_path_factory.mktemp(f"decilm-{request.param}") / "decilm"
    dip_ext.export_decilm(folder, out)
    return folder, out


def test_greedy_tokens_of_a_mixed_batch_equal_the_compacted_model(exported, vllm_engines, dip_ext_reference):
    folder, out = exported
    assert greedy(native(vllm_engines, out), PROMPTS, MAX_TOKENS) == dip_ext_reference.greedy(folder, PROMPTS,
                                                                                             MAX_TOKENS)


def test_prompt_logprobs_equal_the_compacted_model(exported, vllm_engines, dip_ext_reference):
    folder, out = exported
    got = prompt_logprobs(native(vllm_engines, out), PROMPTS)
    for prompt, g, e in zip(PROMPTS, got, dip_ext_reference.logprobs(folder, PROMPTS)):
        assert g.shape == e.shape == (len(prompt) - 1,)
        assert (g - e).abs().max() <= FP32_LOGPROB_ATOL


def test_the_engine_runs_vllms_own_decilm_with_per_layer_widths(exported, vllm_engines):
    _, out = exported
    blocks = json.loads((out / "config.json").read_text())["block_configs"]

    def inspect(model):
        layers = model.model.layers
        return (type(model).__name__,
                [None if getattr(layer, "_is_no_op_ffn", True) else layer.mlp.down_proj.input_size for layer in layers],
                [bool(layer._is_no_op_attention) for layer in layers])

    (name, widths, no_attention), = native(vllm_engines, out).apply_model(inspect)
    assert name == "DeciLMForCausalLM"
    assert widths == [None if b["ffn"]["no_op"] else b["ffn"]["intermediate_size"] for b in blocks]
    assert widths[2] is None and no_attention == [False] * len(blocks)  # layer 0: the export's zero attention
