"""dip_ext's native vLLM model (dip_ext.vllm_model, registered by the ``vllm.general_plugins`` entry point): a saved
LLaMA-style folder (Llama, Mistral, Qwen2, Qwen3) serves with ``LLM(folder)`` as it is, no remote code, no
``model_impl``: vLLM's own linears at the compacted widths, its attention with each layer's own heads, dip_ext's ops
for the norm + gather and the scatter-add. Tokens and log-probabilities equal ``dip_ext.from_pretrained(folder)``'s
(tiny models of vllm_helpers: the attention of layer 0 and the MLP of layer 2 removed; fp32 unless a test says)."""

import json

import pytest
import torch
from safetensors import safe_open
from vllm import SamplingParams
from vllm_helpers import KEPT_GROUPS, PROMPTS, greedy, prompt_logprobs, save_compacted, save_head_pruned

MAX_TOKENS = 8
#: fp32: vLLM's fused GEMMs and attention against transformers' differ by rounding (measured: ~2e-6)
FP32_LOGPROB_ATOL = 1e-4
#: bf16 against the fp32 model (see test_vllm_engine.py: the same tiny models, the same bound)
BF16_LOGPROB_ATOL = 0.15
NATIVE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: the native route as a user takes it: vLLM picks the model class, nothing trusted from the folder
NATIVE = dict(model_impl="auto", trust_remote_code=False)


def native(vllm_engines, folder, **kwargs):
    return vllm_engines.get(folder, **{**NATIVE, **kwargs})


@pytest.fixture(scope="module", params=NATIVE_FAMILIES)
def family(request):
    return request.param


def test_tokens_and_logprobs_equal_dip_ext(family, compacted_folder, vllm_engines, dip_ext_reference):
    folder = compacted_folder(family)
    assert greedy(native(vllm_engines, folder), PROMPTS, MAX_TOKENS) == \
        dip_ext_reference.greedy(folder, PROMPTS, MAX_TOKENS)
    got = prompt_logprobs(native(vllm_engines, folder), PROMPTS)
    for prompt, g, e in zip(PROMPTS, got, dip_ext_reference.logprobs(folder, PROMPTS)):
        assert g.shape == e.shape == (len(prompt) - 1,)
        assert (g - e).abs().max() <= FP32_LOGPROB_ATOL


def test_the_engine_builds_dip_ext_native_model_at_the_compacted_shapes(family, compacted_folder, vllm_engines):
    """vLLM built dip_ext's class (not its Transformers backend), whose linears hold exactly the folder's compacted
    weights; the removed attention (layer 0) and MLP (layer 2) have no module, and no KV-cache entry for layer 0."""
    folder = compacted_folder(family)
    stored = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            stored += sum(a * b for a, b in (f.get_slice(k).get_shape() for k in f.keys() if ".layers." in k
                                             and k.endswith("proj.weight")))

    def inspect(model):
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.linear import LinearBase

        linears = sum(m.input_size * m.output_size for m in model.modules() if isinstance(m, LinearBase))
        layers = model.model.layers
        # vLLM gives each Attention module a KV-cache entry (its name holds the layer's index)
        cached = [name for name, m in model.named_modules() if isinstance(m, Attention)]
        return type(model).__name__, linears, layers[0].self_attn is None, layers[2].mlp is None, cached

    (name, linears, no_attn0, no_mlp2, attention_layers), = native(vllm_engines, folder).apply_model(inspect)
    dense = json.loads((folder / "config.json").read_text())["disp_dense_params"]["decoder_linear"]
    assert name == "DipExtVllmForCausalLM"
    assert linears == stored < dense
    assert no_attn0 and no_mlp2
    assert attention_layers == [f"model.layers.{i}.self_attn.attn" for i in (1, 2, 3)]


def test_sampled_tokens_carry_dip_ext_logprobs(compacted_folder, vllm_engines, dip_ext_reference):
    folder = compacted_folder("qwen3")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=7, logprobs=0, detokenize=False,
                            ignore_eos=True)
    outs = native(vllm_engines, folder).generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    sampled = [list(o.outputs[0].token_ids) for o in outs]
    assert sampled != greedy(native(vllm_engines, folder), PROMPTS, MAX_TOKENS)
    expected = dip_ext_reference.logprobs(folder, [p + s for p, s in zip(PROMPTS, sampled)])
    for out, tokens, e in zip(outs, sampled, expected):
        got = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)], dtype=torch.float64)
        assert (got - e[-MAX_TOKENS:]).abs().max() <= FP32_LOGPROB_ATOL


def test_each_layer_runs_its_own_kv_heads(tmp_path_factory, vllm_engines, dip_ext_reference):
    """KV groups pruned (vllm_helpers.save_head_pruned: 8 query heads over 4 KV heads; layers keep 0, 3, 1, 2 groups):
    each layer's attention has the kept heads (2 query heads per KV head) and the tokens are the compacted model's.
    vLLM's Transformers backend cannot run this folder (it refuses it); the native model can."""
    folder = save_head_pruned(tmp_path_factory.mktemp("native-heads") / "compacted")

    def inspect(model):
        return [(layer.self_attn.attn.num_heads, layer.self_attn.attn.num_kv_heads)
                for layer in model.model.layers if layer.self_attn is not None]

    (heads,), = [native(vllm_engines, folder).apply_model(inspect)]
    assert heads == [(2 * len(g), len(g)) for g in KEPT_GROUPS[1:]] == [(6, 3), (2, 1), (4, 2)]
    assert greedy(native(vllm_engines, folder), PROMPTS, MAX_TOKENS) == \
        dip_ext_reference.greedy(folder, PROMPTS, MAX_TOKENS)
    got = prompt_logprobs(native(vllm_engines, folder), PROMPTS)
    for g, e in zip(got, dip_ext_reference.logprobs(folder, PROMPTS)):
        assert (g - e).abs().max() <= FP32_LOGPROB_ATOL


def test_prefix_caching_and_chunked_prefill_keep_the_tokens(compacted_folder, vllm_engines, dip_ext_reference):
    folder = compacted_folder("llama")
    engine = dict(block_size=32, enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=32,
                  max_num_seqs=4)
    prefix = (PROMPTS[-1] * 3)[:70]
    prompts = [prefix, prefix + [5, 6, 7], prefix[:66] + PROMPTS[1], prefix[:40] + [9]]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, detokenize=False, ignore_eos=True)
    first = native(vllm_engines, folder, **engine).generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    outs = native(vllm_engines, folder, **engine).generate([{"prompt_token_ids": p} for p in prompts[1:]], params,
                                                           use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [64, 64, 32]
    got = [list(o.outputs[0].token_ids) for o in first + outs]
    assert got == dip_ext_reference.greedy(folder, prompts, MAX_TOKENS)


def test_bfloat16_stays_within_bf16_rounding_of_the_model(compacted_folder, vllm_engines, dip_ext_reference):
    folder = compacted_folder("qwen2")
    got = prompt_logprobs(native(vllm_engines, folder, dtype="bfloat16"), PROMPTS)
    for g, e in zip(got, dip_ext_reference.logprobs(folder, PROMPTS)):
        assert (g - e).abs().max() <= BF16_LOGPROB_ATOL
    continuations = greedy(native(vllm_engines, folder, dtype="bfloat16"), PROMPTS, MAX_TOKENS)
    shortfalls = dip_ext_reference.shortfalls(folder, PROMPTS, continuations)
    assert max(float(s.max()) for s in shortfalls) <= BF16_LOGPROB_ATOL


def test_torch_compile_keeps_the_tokens(compacted_folder, vllm_engines, dip_ext_reference):
    """vLLM's default: the decoder stack compiled (dip_ext's ops traced through their fake kernels)."""
    folder = compacted_folder("llama")
    assert greedy(native(vllm_engines, folder, enforce_eager=False), PROMPTS, MAX_TOKENS) == \
        dip_ext_reference.greedy(folder, PROMPTS, MAX_TOKENS)
    got = prompt_logprobs(native(vllm_engines, folder, enforce_eager=False), PROMPTS)
    for g, e in zip(got, dip_ext_reference.logprobs(folder, PROMPTS)):
        assert (g - e).abs().max() <= FP32_LOGPROB_ATOL


def test_other_families_fall_back_to_the_transformers_backend(tmp_path, vllm_engines, dip_ext_reference):
    """A family without a native class (Gemma3) still serves with ``LLM(folder, trust_remote_code=True)``: vLLM
    falls back to its Transformers backend over the folder's remote code."""
    folder = save_compacted("gemma3", tmp_path / "gemma3")
    llm = native(vllm_engines, folder, trust_remote_code=True)
    (name,) = llm.apply_model(lambda model: type(model).__name__)
    assert name != "DipExtVllmForCausalLM"
    assert greedy(native(vllm_engines, folder, trust_remote_code=True), PROMPTS, MAX_TOKENS) == \
        dip_ext_reference.greedy(folder, PROMPTS, MAX_TOKENS)


def _save_block(folder, empty: str, **config):
    """The tiny Llama of vllm_helpers with every set kept but ``empty`` in layer 1 (so that block writes but reads
    nothing, or keeps no channel but its output bias)."""
    from helpers import make_word_tokenizer, perturb_norms_and_biases
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm_helpers import COMMON, FFN

    import dip_ext
    from dip_ext import DispMasks

    torch.manual_seed(0)
    dense = perturb_norms_and_biases(LlamaForCausalLM(LlamaConfig(intermediate_size=FFN, num_attention_heads=4,
                                                                  num_key_value_heads=2, **COMMON, **config)).eval(),
                                     bias_std=0.1)
    full = {"attn_in": COMMON["hidden_size"], "attn_out": COMMON["hidden_size"], "mlp_in": COMMON["hidden_size"],
            "mlp_mid": FFN, "mlp_out": COMMON["hidden_size"]}
    layers = [{s: torch.arange(0 if (i == 1 and s == empty) else n) for s, n in full.items()}
              for i in range(COMMON["num_hidden_layers"])]
    dip_ext.compact(dense, DispMasks(layers)).save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("empty,config,message", [
    ("attn_in", {}, "layer 1 keeps attn_out but reads no input (attn_in is empty)"),
    ("mlp_in", {}, "layer 1 keeps mlp_out but reads no input (mlp_in is empty)"),
    ("mlp_mid", {"mlp_bias": True}, "layer 1 keeps no MLP channel but adds its down_proj bias"),
])
def test_blocks_the_native_model_cannot_run_are_refused_naming_the_layer(tmp_path, vllm_engines, empty, config,
                                                                          message):
    """dip_ext serves these folders (from_pretrained); the native vLLM model refuses them in one message that names
    the layer and the Transformers backend that runs them."""
    folder = _save_block(tmp_path / empty, empty, **config)
    with pytest.raises(Exception, match=r"--model-impl transformers") as err:
        native(vllm_engines, folder)
    assert message in str(err.value), str(err.value)[-2000:]
