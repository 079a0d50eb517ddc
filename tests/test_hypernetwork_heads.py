"""The hypernetwork learning KV groups (``Budget.heads``; a KV-cache target with ``kv_ratio``): a ``kv_groups`` head
per layer warm-started from the one-shot groups, the sampled group masks applied to the frozen model, the budget
term counting them (plus a KV term under a KV target), a deterministic export meeting both budgets (KV groups never
rounded to ``multiple_of``), compacted ≡ masked reference, exact resume and the fingerprint telling heads on from
off; with heads off everything is as before (fixed expectations recorded with the code before KV groups existed).
Tiny random GQA Llama (4 query heads over 2 KV heads, 3 layers), CPU."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math

import pytest
import torch
from helpers import assert_rel_close, dims_of, perturb_norms_and_biases, tiny_llama

import dip_ext
from dip_ext.calibration import run_calibration
from dip_ext.masking import apply_masks
from dip_ext.masks import ALL_STRUCTURES, KV_GROUPS, STRUCTURES, DispMasks
from dip_ext.params import decoder_linear_params, kv_cache_bytes
from dip_ext.selection.base import SelectionInputs
from dip_ext.selection.budget import Budget
from dip_ext.selection.hypernetwork import (CHECKPOINT_NAME, HyperNetwork, Hypernetwork, HypernetworkConfig, Trainer,
                                            export_masks, read_checkpoint)
from dip_ext.selection.hypernetwork.losses import step_losses
from dip_ext.selection.oneshot import oneshot_masks

LAYERS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def model():
    return perturb_norms_and_biases(tiny_llama(0, num_attention_heads=4, num_key_value_heads=2,
                                               num_hidden_layers=LAYERS))


@pytest.fixture(scope="module")
def dims(model):
    return dims_of(model)


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def val_blocks():
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def calib(model, blocks):
    return run_calibration(model, blocks, progress=False)


def _trainer(model, blocks, budget, init=None, **kw):
    args = {k: kw.pop(k) for k in ("val_windows", "checkpoint_dir", "resume", "seed", "multiple_of", "callback")
            if k in kw}
    return Trainer(model, blocks, budget, HypernetworkConfig(**kw), init_masks=init, progress=False, **args)


def _kept_groups(masks: DispMasks) -> int:
    return sum(w[KV_GROUPS] for w in masks.widths())


def _random_logits(dims, seed, heads=True):
    g = torch.Generator().manual_seed(seed)
    structures = ALL_STRUCTURES if heads else STRUCTURES
    return [{s: torch.randn(dims.size(s), generator=g) for s in structures} for _ in range(dims.num_layers)]


def _digest(masks: DispMasks) -> str:
    return hashlib.sha256(json.dumps(masks.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---- training: both budgets met, warm-started from the one-shot groups ------------------------------------------

@pytest.mark.parametrize("kv_ratio", [None, 0.5])
@pytest.mark.parametrize("multiple_of", [1, 4])
def test_training_with_heads_meets_the_parameter_budget_and_the_kv_target(model, blocks, calib, dims, kv_ratio,
                                                                         multiple_of):
    budget = Budget.for_model(model, 0.4, heads=True, kv_ratio=kv_ratio)
    init = oneshot_masks(calib, budget, multiple_of)
    assert init.prunes_heads
    trainer = _trainer(model, blocks, budget, init, steps=4, lr=0.05, margin=0.5, multiple_of=multiple_of)
    masks, _ = trainer.run()
    log, info = trainer.log, trainer.export_info
    assert masks.prunes_heads and masks != init  # it trained (margin 0.5, lr 0.05: the masks move)
    widths = masks.widths()
    assert budget.kept_linear(widths) <= budget.target_linear
    assert info.kept_decoder_linear == budget.kept_linear(widths)
    assert info.kept_kv_groups == _kept_groups(masks) and info.target_kv_groups == budget.kv_groups_kept
    if kv_ratio is not None:
        assert budget.kv_groups_kept == LAYERS  # half of 3 layers x 2 groups
        assert _kept_groups(masks) <= budget.kv_groups_kept
        assert kv_cache_bytes(model.config, widths) <= (1 - kv_ratio) * kv_cache_bytes(model.config)
    if multiple_of > 1:
        assert all(w[s] % multiple_of == 0 or w[s] == dims.size(s) for w in widths for s in STRUCTURES), widths
    # the deterministic masks the run started from are the warm start's, KV groups included
    assert log[0].kv_kept_ratio == pytest.approx(_kept_groups(init) / (LAYERS * 2))
    assert log[0].kept_ratio == pytest.approx(budget.kept_ratio(init.widths()), rel=1e-6)
    assert all(e.kv_kept_ratio is not None for e in log)


def test_the_method_prunes_heads_warm_started_from_oneshot(model, blocks, calib):
    assert Hypernetwork.prunes_heads is True
    budget = Budget.for_model(model, 0.4, kv_ratio=0.5)
    inputs = SelectionInputs(model, budget, calib, blocks, progress=False)
    # steps=0 returns the warm start: the one-shot masks, KV groups included
    assert Hypernetwork().select(inputs, HypernetworkConfig(steps=0)).masks == oneshot_masks(calib, budget, 1)
    masks = Hypernetwork().select(inputs, HypernetworkConfig(steps=2, lr=0.05, margin=0.5)).masks
    assert masks.prunes_heads and _kept_groups(masks) <= budget.kv_groups_kept
    assert budget.kept_linear(masks.widths()) <= budget.target_linear


# ---- one step's losses: the sampled group masks are applied, the budget terms count them ------------------------

def test_step_losses_apply_the_group_masks_and_count_them(model, blocks, calib, dims):
    budget = Budget.for_model(model, 0.4, kv_ratio=0.5)
    init = oneshot_masks(calib, budget, 1)
    # drop one more group than the one-shot did, so the KV term is not 0
    layers = [dict(layer) for layer in init.layers]
    fuller = next(i for i, layer in enumerate(layers) if layer[KV_GROUPS].numel() > 0)
    layers[fuller][KV_GROUPS] = layers[fuller][KV_GROUPS][1:]
    init = DispMasks(layers)
    ids = blocks[:2]
    lam = 2.0
    h = HyperNetwork(dims, seed=0, heads=True)
    # margin 60 at temperature 0.4: no sampled flip, so the sample is the deterministic mask is `init`
    h.warm_start(init, offset=3.0, margin=60.0)
    with apply_masks(model, None) as masked:
        out = step_losses(h, masked, model, ids, budget, torch.Generator().manual_seed(0), lam=lam,
                          temperature=0.4, offset=3.0)
        masked.set_masks(init)
        with torch.no_grad():
            want_lm = float(model(input_ids=ids, labels=ids).loss)
        masked.set_masks([{s: m for s, m in layer.items() if s != KV_GROUPS} for layer in init.to_masks(dims)])
        with torch.no_grad():
            without_groups = float(model(input_ids=ids, labels=ids).loss)
    assert want_lm != pytest.approx(without_groups, rel=1e-4)  # the premise: the groups matter
    assert float(out.lm_loss.detach()) == pytest.approx(want_lm, rel=1e-5)  # the sampled group masks were applied
    r = float(budget.kept_ratio(init.widths()))  # counts the kept groups' parameters
    k = _kept_groups(init) / (LAYERS * 2)
    q = budget.kv_groups_kept / (LAYERS * 2)
    assert k < q and out.kept_ratio == pytest.approx(r, rel=1e-6) and out.kv_kept_ratio == pytest.approx(k)
    want = lam * abs(math.log(r) - math.log(budget.target_ratio)) + lam * abs(math.log(k) - math.log(q))
    assert float(out.budget_loss.detach()) == pytest.approx(want, rel=1e-5)
    # at margin 1 the keep probabilities are not saturated: the LM loss alone reaches the group head through the
    # masked model, and so do the budget terms (the KV term is the difference to a budget without a KV target)
    h2 = HyperNetwork(dims, seed=0, heads=True)
    h2.warm_start(init, offset=3.0, margin=1.0)
    plain = Budget.for_model(model, 0.4, heads=True)
    with apply_masks(model, None) as masked:
        a = step_losses(h2, masked, model, ids, budget, torch.Generator().manual_seed(0), lam=lam, temperature=0.4,
                        offset=3.0)
        b = step_losses(h2, masked, model, ids, plain, torch.Generator().manual_seed(0), lam=lam, temperature=0.4,
                        offset=3.0)
    kv_term = float(a.budget_loss.detach() - b.budget_loss.detach())
    assert kv_term == pytest.approx(lam * abs(math.log(k) - math.log(q)), rel=1e-5)
    [g_lm] = torch.autograd.grad(a.lm_loss, [h2.w_kv], retain_graph=True)
    assert float(g_lm.abs().sum()) > 0
    g_kv, g_ffn = torch.autograd.grad(a.budget_loss - b.budget_loss, [h2.b_kv, h2.b_ffn])  # the KV term alone
    assert float(g_kv.abs().sum()) > 0 and float(g_ffn.abs().sum()) == 0


# ---- export: both budgets, KV groups never rounded ---------------------------------------------------------------

@pytest.mark.parametrize("multiple_of", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_export_meets_both_budgets_dropping_the_lowest_groups_first(model, dims, multiple_of, seed):
    budget = Budget.for_model(model, 0.3, kv_ratio=0.5)
    logits = _random_logits(dims, seed)
    masks, info = export_masks(logits, budget, multiple_of=multiple_of)
    widths = masks.widths()
    assert budget.kept_linear(widths) <= budget.target_linear and info.kept_decoder_linear == budget.kept_linear(widths)
    assert _kept_groups(masks) <= budget.kv_groups_kept == info.target_kv_groups
    # the groups below the top kv_groups_kept scores over all layers are all dropped
    scores = torch.stack([layer[KV_GROUPS] for layer in logits]).reshape(-1)
    kept = torch.stack([m[KV_GROUPS] for m in masks.to_masks(dims)]).reshape(-1)
    top = torch.sort(scores, descending=True, stable=True).indices[:budget.kv_groups_kept]
    assert kept.sum() > 0 and set(kept.nonzero().flatten().tolist()) <= set(top.tolist())
    for layer, idx in zip(logits, masks.layers):  # every set keeps its best dims; a layer keeps its best groups
        for s in ALL_STRUCTURES:
            n = idx[s].numel()
            if n:
                assert set(idx[s].tolist()) == set(layer[s].topk(n).indices.tolist()), s
        if idx[KV_GROUPS].numel() == 0 or idx["attn_out"].numel() == 0:  # no attention: nothing of it is kept
            assert idx[KV_GROUPS].numel() == idx["attn_out"].numel() == idx["attn_in"].numel() == 0
    if multiple_of > 1:
        assert all(w[s] % multiple_of == 0 or w[s] == dims.size(s) for w in widths for s in STRUCTURES), widths
    assert export_masks(logits, budget, multiple_of=multiple_of)[0] == masks  # deterministic


@pytest.mark.parametrize("kv_ratio", [None, 0.4])
def test_export_does_not_round_kv_groups_to_multiple_of(model, dims, kv_ratio):
    """Every layer's groups score +5 and -5: each keeps one group of two, which rounding to 4 would empty."""
    budget = Budget.for_model(model, 0.2, heads=True, kv_ratio=kv_ratio)
    logits = _random_logits(dims, 4)
    for layer in logits:
        layer[KV_GROUPS] = torch.tensor([5.0, -8.0])
    masks, info = export_masks(logits, budget, offset=3.0, multiple_of=4)
    widths = masks.widths()
    assert [w[KV_GROUPS] for w in widths] == [1] * LAYERS and info.kept_kv_groups == LAYERS
    assert all(w[s] % 4 == 0 or w[s] == dims.size(s) for w in widths for s in STRUCTURES), widths
    assert budget.kept_linear(widths) <= budget.target_linear


def test_export_refuses_logits_without_groups_for_a_heads_budget(model, dims):
    with pytest.raises(ValueError, match="kv_groups"):
        export_masks(_random_logits(dims, 0, heads=False), Budget.for_model(model, 0.3, heads=True))


# ---- compacted model == masked reference; warm start ------------------------------------------------------------

def test_compacted_equals_masked_reference_for_the_exported_masks(model, blocks, calib, dims):
    budget = Budget.for_model(model, 0.5, kv_ratio=0.5)
    trained, _ = _trainer(model, blocks, budget, oneshot_masks(calib, budget, 1), steps=3, lr=0.05,
                          margin=0.5).run()
    assert trained.prunes_heads and 0 < _kept_groups(trained) < LAYERS * 2
    # and an export whose every layer keeps one group of its two (a strict subset: which query heads go matters)
    logits = _random_logits(dims, 6)
    for i, layer in enumerate(logits):
        layer[KV_GROUPS] = torch.tensor([5.0, -8.0] if i % 2 else [-8.0, 5.0])
    one_each, _ = export_masks(logits, Budget.for_model(model, 0.3, heads=True))
    assert [layer[KV_GROUPS].tolist() for layer in one_each.layers] == [[1], [0], [1]]
    ids = blocks[:3]
    for masks, b in ((trained, budget), (one_each, Budget.for_model(model, 0.3, heads=True))):
        with torch.no_grad(), apply_masks(model, masks):
            want = model(input_ids=ids).logits
        compacted = dip_ext.compact(copy.deepcopy(model), masks)
        with torch.no_grad():
            got = compacted(input_ids=ids).logits
        assert_rel_close(got, want, rtol=1e-5)
        assert decoder_linear_params(compacted) == b.kept_linear(masks.widths())


def test_warm_start_reproduces_masks_with_groups(model, calib, dims):
    budget = Budget.for_model(model, 0.4, kv_ratio=0.5)
    init = oneshot_masks(calib, budget, 1)
    # a budget the init masks fill exactly (no dimension can be added, no group either)
    exact = dataclasses.replace(budget, target_linear=int(budget.kept_linear(init.widths())),
                                kv_groups_kept=_kept_groups(init))
    h = HyperNetwork(dims, seed=0, heads=True)
    h.warm_start(init, offset=3.0, margin=2.0)
    logits = h()
    for layer, m in zip(logits, init.to_masks(dims)):
        assert list(layer) == list(ALL_STRUCTURES)
        for s in ALL_STRUCTURES:
            torch.testing.assert_close(layer[s] + 3.0, torch.where(m[s] > 0, 2.0, -2.0), atol=1e-4, rtol=0)
    assert export_masks(logits, exact)[0] == init
    # masks without groups keep every group; a network without the head refuses masks with groups
    plain = DispMasks([{s: layer[s] for s in STRUCTURES} for layer in init.layers])
    h.warm_start(plain, offset=3.0, margin=2.0)
    assert all(bool((layer[KV_GROUPS] + 3.0 > 1.9).all()) for layer in h())
    with pytest.raises(ValueError, match="KV groups"):
        HyperNetwork(dims, seed=0).warm_start(init)
    with pytest.raises(ValueError, match="prune KV groups but the budget does not"):
        Trainer(model, torch.zeros(2, 16, dtype=torch.long), Budget.for_model(model, 0.4),
                HypernetworkConfig(steps=1), init_masks=init)
    with pytest.raises(ValueError, match="KV groups"):
        HyperNetwork(dataclasses.replace(dims, kv_groups=0), heads=True)


# ---- checkpoints: exact resume, heads on and off told apart -----------------------------------------------------

def test_interrupted_run_with_heads_resumes_exactly(model, blocks, calib, val_blocks, tmp_path):
    budget = Budget.for_model(model, 0.4, kv_ratio=0.5)
    init = oneshot_masks(calib, budget, 1)
    kw = dict(steps=5, lr=0.05, margin=0.5, seed=7, checkpoint_every=2, val_windows=val_blocks, val_every=2)
    full = _trainer(model, blocks, budget, init, **kw)
    whole, _ = full.run()

    def stop_at_3(entry):
        if entry.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _trainer(model, blocks, budget, init, checkpoint_dir=tmp_path, callback=stop_at_3, **kw).run()
    tensors, meta = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert "hnet.w_kv" in tensors and "hnet.b_kv" in tensors
    assert meta["fingerprint"]["prune_heads"] is True and meta["fingerprint"]["kv_groups_kept"] == LAYERS
    resumed = _trainer(model, blocks, budget, init, checkpoint_dir=tmp_path, resume=True, **kw)
    masks, _ = resumed.run()
    assert [e.step for e in resumed.log] == [3, 4, 5]
    assert masks == whole and masks.prunes_heads
    assert [e.lm_loss for e in resumed.log] == [e.lm_loss for e in full.log[2:]]
    assert [e.kv_kept_ratio for e in resumed.log] == [e.kv_kept_ratio for e in full.log[2:]]
    # the same folder under other head settings is another run
    with pytest.raises(ValueError, match="different run.*prune_heads: checkpoint True vs now False"):
        _trainer(model, blocks, Budget.for_model(model, 0.4), checkpoint_dir=tmp_path, resume=True, **kw).run()
    with pytest.raises(ValueError, match="different run.*kv_ratio: checkpoint 0.5 vs now None"):
        _trainer(model, blocks, Budget.for_model(model, 0.4, heads=True), init, checkpoint_dir=tmp_path,
                 resume=True, **kw).run()
    # the groups' rounding step shapes the exports the early stopping compares
    assert meta["fingerprint"]["heads_multiple_of"] == 1
    with pytest.raises(ValueError, match="different run.*heads_multiple_of: checkpoint 1 vs now 2"):
        _trainer(model, blocks, Budget.for_model(model, 0.4, kv_ratio=0.5, heads_multiple_of=2), init,
                 checkpoint_dir=tmp_path, resume=True, **kw).run()


def test_a_run_without_heads_records_no_head_keys_and_refuses_heads(model, blocks, tmp_path):
    _trainer(model, blocks, Budget.for_model(model, 0.4), steps=1, lr=0.05, checkpoint_dir=tmp_path).run()
    tensors, meta = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert not {"prune_heads", "kv_ratio", "kv_groups_kept", "heads_multiple_of"} & set(meta["fingerprint"])
    assert not [k for k in tensors if "kv" in k]
    with pytest.raises(ValueError, match="different run.*prune_heads: checkpoint False vs now True"):
        _trainer(model, blocks, Budget.for_model(model, 0.4, heads=True), steps=2, lr=0.05, checkpoint_dir=tmp_path,
                 resume=True).run()


# ---- heads off: exactly as before ----------------------------------------------------------------------------

#: digests of what the code before KV groups existed produced on this model (recorded from commit 1890c50's
#: hypernetwork, which had no heads): the network's initial state and the masks of three runs
BEFORE = {"init": "dbeecd9c99ddb475", "plain": "f598daaeee505bcf", "multiple4-val": "20aecedcca69936e",
          "warm": "a50c071b81d892e4"}


def _state_digest(h: HyperNetwork) -> str:
    sha = hashlib.sha256()
    for k, v in h.state_dict().items():
        sha.update(k.encode())
        sha.update(v.detach().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


def test_heads_off_is_exactly_as_before(model, blocks, val_blocks, calib, dims):
    h = HyperNetwork(dims, seed=3)
    assert h.structures == STRUCTURES and not hasattr(h, "w_kv")
    assert _state_digest(h) == BEFORE["init"]
    budget = Budget.for_model(model, 0.5)
    assert _digest(_trainer(model, blocks, budget, steps=4, lr=0.05, seed=2).run()[0]) == BEFORE["plain"]
    assert _digest(_trainer(model, blocks, budget, steps=4, lr=0.05, seed=2, multiple_of=4, val_windows=val_blocks,
                            val_every=2).run()[0]) == BEFORE["multiple4-val"]
    init = oneshot_masks(calib, budget, 1)
    assert not init.prunes_heads
    assert _digest(_trainer(model, blocks, budget, init, steps=3, lr=0.05, margin=0.5).run()[0]) == BEFORE["warm"]


def test_heads_on_starts_the_other_heads_as_heads_off(dims):
    off, on = HyperNetwork(dims, seed=3), HyperNetwork(dims, seed=3, heads=True)
    for name in ("w_hidden", "b_hidden", "w_ffn", "b_ffn"):
        assert torch.equal(getattr(off, name), getattr(on, name))
    assert torch.equal(on.inputs.view(LAYERS, 6, -1)[:, :5].reshape(-1, on.inputs.shape[1]), off.inputs)
    assert on.w_kv.shape == (LAYERS, 2, 128) and on.b_kv.shape == (LAYERS, 2)
    assert [list(layer) for layer in on()] == [list(ALL_STRUCTURES)] * LAYERS
