"""Calibration, the masked reference and the refit read the family's prunable space, layer by layer.

A tiny Llama whose adapter declares a hand-made space (layer 1 without ``mlp_mid``; or a structure of its own,
per-head units at the attention output projection's input) stands in for a family whose layers differ: what a
layer does not declare is neither scored nor masked nor refitted, and what it declares is scored exactly as in the
built-in layout (a mask of ones changes nothing, so the gradients are the same).
"""

import pytest
import torch
from helpers import perturb_norms_and_biases, tiny_llama

from dip_ext import DispMasks, MaskError
from dip_ext.calibration import FORMAT, STAT_POINTS, CalibrationResult, run_calibration
from dip_ext.families import adapter_for
from dip_ext.masking import MaskedModel
from dip_ext.refit import collect_input_grams
from dip_ext.space import PrunableSpace, Structure
from dip_ext.training import CheckpointFormat

BLOCKS = torch.randint(3, 60, (3, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield one_thread


def model():
    return perturb_norms_and_biases(tiny_llama(seed=3), bias_std=0.1)


def without_mlp_mid(space: PrunableSpace, layer: int) -> PrunableSpace:
    layers = list(space.layers)
    layers[layer] = tuple(s for s in layers[layer] if s.name != "mlp_mid")
    return PrunableSpace(space.hidden, tuple(layers))


@pytest.fixture
def no_mlp_mid_in_layer_1(monkeypatch):
    """The tiny Llama's adapter declaring no ``mlp_mid`` in layer 1 (its full space, KV groups included)."""
    m = model()
    adapter = adapter_for(m)
    full = adapter.space(m.config)
    space = without_mlp_mid(full, 1)
    monkeypatch.setattr(adapter, "space", lambda config: space)
    return m, full, space


def test_calibration_scores_each_layers_own_structures(no_mlp_mid_in_layer_1, tmp_path, monkeypatch):
    m, full, space = no_mlp_mid_in_layer_1
    res = run_calibration(m, BLOCKS, progress=False)
    assert res.space == space and [tuple(layer) for layer in res.scores] == [space.names(i) for i in range(2)]
    assert "mlp_mid" not in res.scores[1] and "kv_groups" in res.scores[1]
    assert res.stats["mlp_mid"][1] is None and res.stats["mlp_mid"][0] is not None
    assert all(res.stats[p][1] is not None for p in STAT_POINTS if p != "mlp_mid")
    # the structures both spaces declare are scored exactly as in the built-in layout
    monkeypatch.setattr(adapter_for(m), "space", lambda config: full)
    ref = run_calibration(m, BLOCKS, progress=False)
    for i, layer in enumerate(res.scores):
        for s, t in layer.items():
            assert torch.equal(t, ref.scores[i][s]), (i, s)
    assert torch.equal(res.tied_hidden, ref.tied_hidden)
    assert torch.equal(res.stats["mlp_mid"][0].sumsq, ref.stats["mlp_mid"][0].sumsq)
    # the file keeps the space and the layers without statistics
    res.save(tmp_path / "calib.safetensors")
    back = CalibrationResult.load(tmp_path / "calib.safetensors")
    assert back.space == space and back.stats["mlp_mid"][1] is None and back.windows == res.windows
    assert all(torch.equal(back.scores[i][s], t) for i, layer in enumerate(res.scores) for s, t in layer.items())
    # a resume of another model's space is refused naming it
    with pytest.raises(ValueError, match="the model's prunable space"):
        run_calibration(m, BLOCKS, progress=False, checkpoint=tmp_path / "calib.safetensors")


def test_empty_result_of_a_hand_made_space_round_trips(tmp_path):
    space = PrunableSpace(8, ((Structure("attn_in", 8, "hidden"), Structure("mlp_mid", 12, "ffn")),
                              (Structure("attn_in", 8, "hidden"), Structure("experts", 3, "experts",
                                                                             whole_units=True))))
    res = CalibrationResult.empty(space)
    assert [sorted(layer) for layer in res.scores] == [["attn_in", "mlp_mid"], ["attn_in", "experts"]]
    assert res.scores[1]["experts"].shape == (3,) and res.tied_hidden.shape == (8,)
    res.save(tmp_path / "c.safetensors")
    back = CalibrationResult.load(tmp_path / "c.safetensors")
    assert back.space == space and back.fingerprint() == res.fingerprint() and back.stats == {}


def test_a_calibration_file_of_the_earlier_format_is_refused(tmp_path):
    old = CheckpointFormat(FORMAT.name, 3, FORMAT.what, remedy=FORMAT.remedy)
    old.write(tmp_path / "old.safetensors", {"tied_hidden": torch.zeros(2, dtype=torch.float64)},
              {"fingerprint": {"dims": [1, 2, 2, 0]}, "windows": 0, "losses": []})
    with pytest.raises(ValueError, match=r"an older .*'dip_ext.calibration.v4'"):
        CalibrationResult.load(tmp_path / "old.safetensors")


def test_masked_reference_masks_only_declared_structures(no_mlp_mid_in_layer_1):
    m, full, space = no_mlp_mid_in_layer_1
    ids = BLOCKS[:1]
    masks = DispMasks.full(space)
    assert "mlp_mid" not in masks[1]
    with torch.no_grad(), MaskedModel(m, masks):
        kept = m(input_ids=ids).logits
    assert torch.equal(kept, m(input_ids=ids).logits)
    bad = [dict(layer) for layer in masks.to_masks(space)]
    bad[1]["mlp_mid"] = torch.ones(full.size(1, "mlp_mid"))
    with pytest.raises(MaskError, match=r"layer 1: unknown structure 'mlp_mid' \(layer 1 has: \['attn_in', "):
        MaskedModel(m, bad)


def test_a_unit_mask_covers_equal_contiguous_blocks(monkeypatch):
    """A structure of the family's own (one unit per query head at o_proj's input) is masked block by block; a
    width the activation does not divide is refused naming the layer and structure."""
    m = model()
    adapter = adapter_for(m)
    base = adapter.space(m.config).required()
    points = adapter.dense_mask_points

    def space_with(units):
        heads = Structure("heads", units, "heads", whole_units=True)
        return PrunableSpace(base.hidden, tuple(layer + (heads,) for layer in base.layers))

    monkeypatch.setattr(adapter, "dense_mask_points",
                        lambda layer: {**points(layer), "heads": [(layer.self_attn.o_proj, "input")]})
    ids, head_dim = BLOCKS[:1], m.config.hidden_size // m.config.num_attention_heads
    monkeypatch.setattr(adapter, "space", lambda config: space_with(4))
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])
    with torch.no_grad(), MaskedModel(m, [{"heads": keep}, {}]):
        got = m(input_ids=ids).logits
    o_proj = m.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        o_proj.weight[:, head_dim:2 * head_dim] = 0  # head 1's columns: what the unit mask must drop
        assert torch.allclose(got, m(input_ids=ids).logits, atol=1e-6)
    monkeypatch.setattr(adapter, "space", lambda config: space_with(3))
    with MaskedModel(m, [{"heads": torch.ones(3)}, {}]), pytest.raises(MaskError, match="layer 0 heads: a mask"):
        m(input_ids=ids)


def test_refit_skips_structures_a_layer_lacks(no_mlp_mid_in_layer_1):
    m, _, space = no_mlp_mid_in_layer_1
    masks = DispMasks([{s: idx[: max(1, idx.numel() // 2)] for s, idx in layer.items()}
                       for layer in DispMasks.full(space).layers])
    grams = collect_input_grams(m, masks, BLOCKS, structures=("mlp_in", "mlp_mid"), progress=False)
    assert sorted(grams) == [(0, "mlp_in"), (0, "mlp_mid"), (1, "mlp_in")]
    assert grams[(0, "mlp_mid")].shape == (space.size(0, "mlp_mid"),) * 2
