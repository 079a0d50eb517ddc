"""Compacted models as Hugging Face models, for every family (Llama, Mistral, Qwen2, Qwen3, Gemma3, OPT, Phi): optional outputs
keep one entry per layer when blocks are removed, index sets sit on the model's device before any forward, a
compacted checkpoint never loads as the dense class, older checkpoints still load, the classes are declared and
registered, peft finds LoRA targets, and entry points that need a dense model refuse a compacted one.
Tiny random configs, fp32, CPU ("meta" stands in for an accelerator)."""

import copy
import json

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, Gemma3Config, Gemma3ForCausalLM, Gemma3TextConfig,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM,
                          PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from helpers import assert_lora_merges_exactly, assert_rel_close, dims_of, perturb_norms_and_biases, random_masks

import dip_ext
from dip_ext import DispMasks
from dip_ext.families import FAMILIES, adapter_for
from dip_ext.families import hf_classes
from dip_ext.families.hf_classes import LOAD_GUARD
from dip_ext.families.layers import SkippedAttention
from dip_ext.modules import IndexSet, index_sets, place_index_sets

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated",
                                        "ignore:Initializing zero-element tensors is a no-op")

VOCAB, LAYERS = 64, 4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=VOCAB - 1)
FAMILY_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(intermediate_size=48, num_key_value_heads=2, **COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(intermediate_size=48, num_key_value_heads=2,
                                                        sliding_window=5, **COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(intermediate_size=48, num_key_value_heads=2, **COMMON)),
    # head_dim 16 (4 × 16 ≠ 32), sliding-window layers from layer 1 on (window 5 < the generated length)
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(intermediate_size=48, num_key_value_heads=2, head_dim=16,
                                                  use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                                  **COMMON)),
    # MQA, head_dim 16, local (window 5) and global layers, soft-capping, sandwich norms
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        intermediate_size=48, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2), final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, **COMMON)),
    "opt": lambda: OPTForCausalLM(OPTConfig(ffn_dim=48, word_embed_proj_dim=32, **COMMON)),
    "phi": lambda: PhiForCausalLM(PhiConfig(intermediate_size=48, partial_rotary_factor=0.5, **COMMON)),
}
REMOVED_ATTN = (1, 3)  # layers whose attention is pruned away (layer 2 also loses its MLP)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def make_dense(family: str, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILY_MODELS[family]()
    model.config._attn_implementation = attn
    # non-trivial norms and biases so a wrong gather cannot hide
    return perturb_norms_and_biases(model, bias_std=0.1).eval()


def removal_masks(model, seed: int = 0, full_widths: bool = False) -> DispMasks:
    """Random sets (or full ones); attention removed in REMOVED_ATTN, the MLP removed in layer 2."""
    dims = dims_of(model)
    empty = {i: ["attn_out"] for i in REMOVED_ATTN}
    empty[2] = empty.get(2, []) + ["mlp_out"]
    return random_masks(dims, seed, 0.7, full=range(dims.num_layers) if full_widths else (), empty=empty)


def compacted_pair(family: str, attn: str = "eager", full_widths: bool = False):
    dense = make_dense(family, attn)
    masks = removal_masks(dense, full_widths=full_widths)
    return dense, masks, dip_ext.compact(copy.deepcopy(dense), masks)


# ---- optional outputs: one entry per layer ----------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_outputs_keep_one_entry_per_layer(family):
    dense, masks, compacted = compacted_pair(family)
    ids = torch.randint(3, VOCAB - 1, (2, 7))
    kw = dict(output_attentions=True, output_hidden_states=True, use_cache=True)
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense(ids, **kw)
        out = compacted(ids, **kw)
    assert len(ref.attentions) == len(out.attentions) == LAYERS
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        if i in REMOVED_ATTN:  # a layer with no heads, over the same query and key positions
            assert a.shape == (2, 0, 7, 7)
        else:
            assert_rel_close(a, r)
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for h, r in zip(out.hidden_states, ref.hidden_states):
        assert_rel_close(h, r)
    cache = out.past_key_values
    assert len(cache.layers) == LAYERS
    assert [cache.get_seq_length(i) for i in range(LAYERS)] == [7] * LAYERS


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_generate_with_cache_keeps_one_entry_per_layer(family):
    dense, masks, compacted = compacted_pair(family)
    ids = torch.randint(3, VOCAB - 1, (1, 4))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, use_cache=True,
              pad_token_id=0, output_attentions=True, output_hidden_states=True, return_dict_in_generate=True,
              output_logits=True)
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(ids, **kw)
        out = compacted.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, r in zip(out.logits, ref.logits):
        assert_rel_close(a, r)
    assert len(out.attentions) == len(ref.attentions) == 6
    for step, (atts, ref_atts) in enumerate(zip(out.attentions, ref.attentions)):
        assert len(atts) == len(ref_atts) == LAYERS
        for i in REMOVED_ATTN:
            assert atts[i].shape[1] == 0 and atts[i].shape[2:] == ref_atts[i].shape[2:]
        assert_rel_close(atts[0], ref_atts[0])
        assert len(out.hidden_states[step]) == LAYERS + 1


# ---- index sets on the model's device --------------------------------------------------------------------------

def all_index_sets(model) -> list[IndexSet]:
    return [s for m in model.modules() for s in index_sets(m)]


def assert_sets_on(model, device: str, at_least: int):
    sets = all_index_sets(model)
    assert len(sets) >= at_least
    missing = [s for s in sets if torch.device(device) not in s._copies]
    assert not missing, f"{len(missing)} of {len(sets)} index sets have no {device} copy"


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_index_sets_follow_to_and_to_empty(family):
    _, _, compacted = compacted_pair(family)
    # every compacted layer holds its two residual sets, every norm its gather set
    assert all(len(index_sets(layer)) >= 2 for layer in adapter_for(compacted).decoder_layers(compacted))
    assert_sets_on(copy.deepcopy(compacted).to("meta"), "meta", 2 * LAYERS)
    assert_sets_on(copy.deepcopy(compacted).to_empty(device="meta"), "meta", 2 * LAYERS)
    moved = copy.deepcopy(compacted).to(torch.float16)  # a dtype cast makes no device copy
    assert all(not s._copies for s in all_index_sets(moved))


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_index_sets_placed_by_device_map_loading(tmp_path, family):
    """from_pretrained(device_map=...) places weights without Module.to; the loaded model's sets must be there."""
    _, _, compacted = compacted_pair(family)
    compacted.save_pretrained(tmp_path)
    loaded = dip_ext.from_pretrained(tmp_path, device_map={"": "meta"})
    assert next(loaded.parameters()).device.type == "meta"
    assert_sets_on(loaded, "meta", 2 * LAYERS)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, device_map={"": "meta"})
    assert_sets_on(remote, "meta", 2 * LAYERS)


def test_index_sets_placed_after_the_weights_reach_their_device(tmp_path, monkeypatch):
    """The models are built on "meta" and the loader then puts the weights on the device_map's device: the
    placement must run after that (on a GPU the copies would otherwise be made lazily inside the first forward)."""
    _, _, compacted = compacted_pair("llama")
    compacted.save_pretrained(tmp_path)
    seen = []
    monkeypatch.setattr(hf_classes, "place_index_sets",
                        lambda model: seen.append({p.device.type for p in model.parameters()}))
    for load in (dip_ext.from_pretrained, AutoModelForCausalLM.from_pretrained):
        seen.clear()
        load(tmp_path, device_map="cpu")
        assert seen[0] == {"meta"} and seen[-1] == {"cpu"}


def test_place_index_sets_uses_accelerate_execution_device():
    """Offloaded layers keep their weights elsewhere; the hook's execution device is where they compute."""
    _, _, compacted = compacted_pair("llama")
    layer = compacted.model.layers[0]
    layer._hf_hook = type("Hook", (), {"execution_device": "meta"})()
    place_index_sets(compacted)
    assert_sets_on(layer, "meta", 3)  # the layer's residual sets and its norms' sets (children inherit)
    others = [s for m in compacted.model.layers[1:] for s in index_sets(m)]
    assert others and all(torch.device("meta") not in s._copies for s in others)


def test_model_built_on_meta_device_has_meta_sets():
    _, _, compacted = compacted_pair("phi")
    with torch.device("meta"):
        rebuilt = type(compacted)(compacted.config)
    assert_sets_on(rebuilt, "meta", 2 * LAYERS)


# ---- loading: never as the dense class; old checkpoints; declared classes -----------------------------------------

def loaders(folder):
    """The three ways a compacted checkpoint loads (eager attention, as the models it is compared with)."""
    kw = dict(attn_implementation="eager")
    return (dip_ext.from_pretrained(folder, **kw), AutoModelForCausalLM.from_pretrained(folder, **kw),
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw))


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_dense_class_refuses_a_compacted_checkpoint(tmp_path, family):
    """Full widths everywhere but attention removed in two layers: without the guard the dense class would load
    it with those attentions randomly initialised (only warnings)."""
    dense, _, compacted = compacted_pair(family, full_widths=True)
    compacted.config.use_cache = False
    compacted.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["use_cache"] == LOAD_GUARD and cfg["disp_use_cache"] is False
    for loader in (type(dense), AutoModelForCausalLM.from_config(dense.config).__class__):
        with pytest.raises(Exception, match="dip_ext compacted checkpoint, not a dense model"):
            loader.from_pretrained(tmp_path)
    with pytest.raises(Exception, match="dip_ext compacted checkpoint"):
        type(dense.config).from_pretrained(tmp_path)
    ids = torch.randint(3, VOCAB - 1, (1, 6))
    with torch.no_grad():
        expected = compacted(ids).logits
        for loaded in loaders(tmp_path):
            assert type(loaded) is type(compacted) and loaded.config.use_cache is False
            assert torch.equal(loaded(ids).logits, expected)
    assert AutoConfig.from_pretrained(tmp_path).use_cache is False


OLD_SHIM = ('"""Written by dip_ext: lets AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) load this\n'
            'DISP-compacted checkpoint. It needs the dip_ext package (its compiled kernels) installed."""\n'
            "from dip_ext.modeling import DipExtLlamaConfig, DipExtLlamaForCausalLM, DipExtMistralConfig, "
            "DipExtMistralForCausalLM, DipExtQwen2Config, DipExtQwen2ForCausalLM, DipExtOPTConfig, "
            "DipExtOPTForCausalLM, DipExtPhiConfig, DipExtPhiForCausalLM  # noqa: F401\n")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_checkpoint_saved_before_the_guard_still_loads(tmp_path, family):
    """Checkpoints written before: a plain bool use_cache, the shim importing every class from dip_ext.modeling."""
    _, _, compacted = compacted_pair(family)
    compacted.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["use_cache"] = cfg.pop("disp_use_cache")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "modeling_dip_ext.py").write_text(OLD_SHIM)
    ids = torch.randint(3, VOCAB - 1, (2, 5))
    with torch.no_grad():
        expected = compacted(ids).logits
        for loaded in loaders(tmp_path):
            assert type(loaded).__name__ == cfg["architectures"][0]
            assert torch.equal(loaded(ids).logits, expected)


def test_classes_are_declared_with_distinct_names():
    import dip_ext.modeling as modeling

    names = []
    for family in FAMILIES:
        module = f"dip_ext.families.{family.base_model_type.removesuffix('_text')}"
        for cls in (family.config, family.model):
            assert getattr(modeling, cls.__name__) is cls  # the names saved checkpoints import
            assert cls.__module__ == module
            names.append(cls.__name__)
        assert type(AutoConfig.for_model(family.config.model_type)) is family.config
        assert family.config.model_type == f"dip_ext_{family.base_model_type}"
        name = family.base_model_type.removesuffix("_text")
        dense = make_dense(name)
        compacted = dip_ext.compact(dense, removal_masks(dense))
        assert type(compacted) is family.model
        layers = adapter_for(compacted).decoder_layers(compacted)
        dense_layer = type(make_dense(name).get_decoder().layers[0])
        for layer in layers:  # subclasses of the dense layer (HF tooling finds them), named apart from it
            assert isinstance(layer, dense_layer) and type(layer).__name__ == "DipExt" + dense_layer.__name__
            assert type(layer).__module__ == module and type(layer).__name__ in family.model._no_split_modules
        placeholder = layers[REMOVED_ATTN[0]].attn_placeholder
        assert isinstance(placeholder, SkippedAttention) and type(placeholder).__module__ == module
        assert layers[0].attn_placeholder is None
        names += [type(layers[0]).__name__, type(placeholder).__name__]
    assert len(set(names)) == len(names) == 4 * len(FAMILIES)


# ---- peft -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_lora_without_target_modules_merges_exactly(family):
    peft = pytest.importorskip("peft")
    _, _, compacted = compacted_pair(family)
    ids = torch.randint(3, VOCAB - 1, (2, 6))
    config, merged = assert_lora_merges_exactly(peft, compacted, ids)  # no target_modules given
    assert config.target_modules  # peft found the family's defaults
    assert type(merged).__name__.startswith("DipExt")


# ---- entry points that need a dense model -------------------------------------------------------------------

def test_dense_entry_points_refuse_a_compacted_model():
    _, masks, compacted = compacted_pair("llama")
    calls = {"compact()": lambda: dip_ext.compact(compacted, masks),
             "apply_masks()": lambda: dip_ext.apply_masks(compacted, masks),
             "MaskedModel": lambda: dip_ext.MaskedModel(compacted, masks)}
    for what, call in calls.items():
        with pytest.raises(ValueError) as e:
            call()
        message = str(e.value)
        assert what in message and "already compacted" in message and "\n" not in message
    with pytest.raises(ValueError, match="needs the dense model; this one is already compacted"):
        dip_ext.require_dense(compacted, "calibration")
    dip_ext.require_dense(make_dense("llama"), "calibration")  # a dense model passes
    layer = compacted.model.layers[0]
    with pytest.raises(ValueError, match="already compacted"):
        adapter_for(compacted).mask_points(layer)


def test_multimodal_gemma3_is_refused_naming_the_text_class():
    with pytest.raises(dip_ext.UnsupportedModelError, match="model_type 'gemma3'.*supported: .*Gemma3ForCausalLM"):
        adapter_for(Gemma3Config())
