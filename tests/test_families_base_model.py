"""The compacted base models (``DipExt<Family>Model``): what ``AutoModel`` loads from a saved folder and what
serving engines build (vLLM's Transformers backend builds ``auto_map``'s ``AutoModel`` entry; tests/vllm runs it).
Every family, tiny random configs in fp32, blocks removed (test_families_hf's models)."""

import json

import pytest
import torch
from helpers import assert_rel_close
from test_families_hf import FAMILY_MODELS, REMOVED_ATTN, VOCAB, compacted_pair
from transformers import AutoModel, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import dip_ext
import dip_ext.modeling as modeling
from dip_ext.families import FAMILIES, family_for, llama, qwen3
from dip_ext.families.hf_classes import DipExtForCausalLM, DipExtModel, Family
from dip_ext.families.layers import REMOVED_ATTENTION

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_automodel_loads_the_base_model_of_a_saved_folder(tmp_path, family):
    dense, masks, compacted = compacted_pair(family)
    compacted.save_pretrained(tmp_path)
    record = family_for(compacted)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == f"modeling_dip_ext.{record.base_model.__name__}"
    assert record.base_model.__name__ in (tmp_path / "modeling_dip_ext.py").read_text()
    ids = torch.randint(3, VOCAB - 1, (2, 7))
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):  # the masked dense model: the exact reference
            expected = dense(ids, output_hidden_states=True).hidden_states[-1]
        for remote in (False, True):  # registered by `import dip_ext`, and through auto_map's remote code
            base = AutoModel.from_pretrained(tmp_path, trust_remote_code=remote, attn_implementation="eager")
            assert type(base) is record.base_model and isinstance(base, DipExtModel)
            assert_rel_close(base(ids).last_hidden_state, expected)


def test_base_models_are_declared_per_family_and_exported():
    names = set()
    for record in FAMILIES:
        base = record.base_model
        assert getattr(modeling, base.__name__) is base and base.__name__ in modeling.__all__
        assert base.__module__ == record.model.__module__  # declared in the family's module, beside its CausalLM
        assert base.config_class is record.config and base.disp_adapter is record.adapter
        dense_base = base.__bases__[1]  # the dense family's base model, from the module of its CausalLM
        assert base.__bases__[0] is DipExtModel and dense_base.__module__ == record.dense_model.__module__
        assert any(n.startswith("DipExt") for n in base._no_split_modules)  # device_map="auto" keeps layers whole
        names.add(base.__name__)
    assert len(names) == len(FAMILIES)


def test_a_family_record_refuses_another_familys_base_model():
    class Mismatched(DipExtForCausalLM, LlamaForCausalLM):
        config_class = llama.DipExtLlamaConfig
        disp_adapter = llama.DipExtLlamaModel.disp_adapter
        disp_base_model = qwen3.DipExtQwen3Model

    with pytest.raises(TypeError, match="Mismatched.disp_base_model must be a DipExtModel .* got DipExtQwen3Model"):
        Family.of(Mismatched)


def test_a_removed_attention_dispatches_through_the_attention_interface():
    """Engines that give each layer an attention find it by this dispatch (vLLM's Transformers backend): the
    placeholder of every removed attention calls the interface's entry once per forward."""
    _, _, compacted = compacted_pair("llama")
    calls = []
    removed = ALL_ATTENTION_FUNCTIONS[REMOVED_ATTENTION]
    ALL_ATTENTION_FUNCTIONS.register(
        REMOVED_ATTENTION, lambda module, *a, **k: calls.append(module.layer_idx) or removed(module, *a, **k))
    try:
        with torch.no_grad():
            compacted(torch.randint(3, VOCAB - 1, (1, 5)))
    finally:
        ALL_ATTENTION_FUNCTIONS.register(REMOVED_ATTENTION, removed)
    assert calls == list(REMOVED_ATTN)
