"""Every family in vLLM's Transformers backend (``LLM(folder, trust_remote_code=True, model_impl="transformers")``):
a saved compacted folder serves as it is, on its compacted weights and dip_ext's ops, with the tokens and
log-probabilities of ``dip_ext.from_pretrained(folder)``. Tiny models (vllm_helpers.FAMILY_MODELS: GQA, MQA,
biases, head_dim ≠ hidden / heads, sliding windows) with the attention of layer 0 and the MLP of layer 2 removed;
fp32, eager, one engine per family shared by the tests of this file."""

import json

import pytest
import torch
from safetensors import safe_open
from vllm import SamplingParams
from vllm_helpers import FAMILY_MODELS, PROMPTS, greedy, prompt_logprobs

MAX_TOKENS = 8
#: fp32: vLLM's kernels (fused q/k/v and gate/up GEMMs, its attention) against transformers' differ by rounding
FP32_LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def family(request):
    """The family under test; module-scoped, so pytest runs every test of one family before the next engine."""
    return request.param


def test_greedy_tokens_of_a_mixed_batch_equal_dip_ext(family, compacted_folder, vllm_engines, dip_ext_reference):
    folder = compacted_folder(family)
    got = greedy(vllm_engines.get(folder), PROMPTS, MAX_TOKENS)  # 8 prompts of 3..30 tokens, one batch
    assert got == dip_ext_reference.greedy(folder, PROMPTS, MAX_TOKENS)


def test_prompt_logprobs_equal_dip_ext_within_fp32_rounding(family, compacted_folder, vllm_engines,
                                                            dip_ext_reference):
    folder = compacted_folder(family)
    got = prompt_logprobs(vllm_engines.get(folder), PROMPTS)
    expected = dip_ext_reference.logprobs(folder, PROMPTS)
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert g.shape == e.shape == (len(prompt) - 1,)
        assert (g - e).abs().max() <= FP32_LOGPROB_ATOL


def test_sampled_tokens_carry_dip_ext_logprobs(family, compacted_folder, vllm_engines, dip_ext_reference):
    """Random sampling (seeded) walks off the greedy path; each sampled token's log-probability, as vLLM reports it,
    is what the model gives it after the prompt and the tokens sampled before it."""
    folder = compacted_folder(family)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=7, logprobs=0, detokenize=False,
                            ignore_eos=True)
    outs = vllm_engines.get(folder).generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    sampled = [list(o.outputs[0].token_ids) for o in outs]
    assert sampled != greedy(vllm_engines.get(folder), PROMPTS, MAX_TOKENS)
    expected = dip_ext_reference.logprobs(folder, [p + s for p, s in zip(PROMPTS, sampled)])
    for out, tokens, e in zip(outs, sampled, expected):
        got = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)], dtype=torch.float64)
        assert (got - e[-MAX_TOKENS:]).abs().max() <= FP32_LOGPROB_ATOL


def test_engine_runs_the_compacted_layers_and_weights(family, compacted_folder, vllm_engines):
    """Every saving is kept: the engine's decoder linears (vLLM's, q/k/v and gate/up fused) have exactly the
    folder's compacted shapes, fewer weights than the dense model's, in dip_ext's compacted decoder layers."""
    folder = compacted_folder(family)
    stored = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if ".layers." in k and k.endswith("weight")]
            stored += sum(rows * cols for rows, cols in (s for s in shapes if len(s) == 2))

    def inspect(model):
        from vllm.model_executor.layers.linear import LinearBase

        linears = sum(m.input_size * m.output_size for name, m in model.named_modules()
                      if isinstance(m, LinearBase) and ".layers." in name)
        layers = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
        return linears, sorted(layers)

    (linears, layers), = vllm_engines.get(folder).apply_model(inspect)
    dense = json.loads((folder / "config.json").read_text())["disp_dense_params"]["decoder_linear"]
    assert linears == stored < dense
    assert len(layers) == 1 and layers[0].startswith("DipExt")
