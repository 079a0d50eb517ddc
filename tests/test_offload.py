"""A dense model that accelerate placed partly on disk or on the meta device is refused up front, naming the
offloaded modules and what to do instead, by every entry point that reads or rewrites its weights."""

import re

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM

import dip_ext
from dip_ext import PruneConfig, Pruner
from dip_ext.calibration import run_calibration

WINDOWS = torch.randint(3, 60, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield one_thread


@pytest.fixture
def saved(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    return tmp_path


def load(saved, device_map):
    return AutoModelForCausalLM.from_pretrained(saved / "dense", device_map=device_map,
                                                offload_folder=str(saved / "offload"), use_kernels=False)


PART_ON_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("device_map, named", [(PART_ON_DISK, "model.layers.1"), ({"": "disk"}, "(the whole model)")])
def test_offloaded_model_is_refused_by_every_entry_point(saved, device_map, named):
    model = load(saved, device_map)
    with torch.no_grad():  # the model itself runs: accelerate brings the weights in around each forward
        assert torch.isfinite(model(input_ids=WINDOWS[:1]).logits).all()
    masks = dip_ext.DispMasks.from_dict({"layers": [
        {"attn_in": list(range(16)), "attn_out": list(range(16)), "mlp_in": list(range(16)),
         "mlp_mid": list(range(32)), "mlp_out": list(range(16))} for _ in range(2)]})
    calls = [lambda: dip_ext.prune_and_compact(model, None, calibration=WINDOWS, method="oneshot", seq_len=16,
                                               eval_texts=(), progress=False),
             lambda: Pruner(model, None, PruneConfig(method="oneshot"), calibration_tokens=WINDOWS),
             lambda: dip_ext.compact(model, masks),
             lambda: dip_ext.apply_masks(model, masks),
             lambda: run_calibration(model, WINDOWS, progress=False)]
    for call in calls:
        with pytest.raises(ValueError, match=rf"accelerate keeps {re.escape(named)}.* offloaded .*without offloading"):
            call()


def test_a_model_in_memory_is_not_refused(saved):
    model = load(saved, {"": "cpu"})
    assert dip_ext.model_state.offloaded_modules(model) == []
    pruned, report = dip_ext.prune_and_compact(model, None, calibration=WINDOWS, method="oneshot", seq_len=16,
                                               val_windows=0, refit="off", eval_texts=(), measure_speed=False,
                                               progress=False)
    assert dip_ext.is_compacted(pruned)
