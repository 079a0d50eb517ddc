"""The DISP hypernetwork: training moves toward the budget, export meets it deterministically, checkpoints
resume exactly, warm start reproduces its masks, bad input is refused clearly. Tiny random Llama only."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import tiny_llama

from dip_ext.families import adapter_for
from dip_ext.masks import STRUCTURES, DispMasks
from dip_ext.selection.budget import Budget
from dip_ext.selection.hypernetwork import (CHECKPOINT_NAME, HyperNetwork, HypernetworkConfig, StepLog, Trainer,
                                            export_masks, read_checkpoint)
from dip_ext.selection.hypernetwork import schedule as hn
from dip_ext.selection.slots import flatten
from dip_ext.space import PrunableSpace, Structure
from dip_ext.training import EpochOrder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dims(model):
    return adapter_for(model).dims(model.config)


_TRAINER_ARGS = {"init_masks", "val_windows", "checkpoint_dir", "resume", "seed", "multiple_of", "placement",
                 "progress", "callback"}


def _trainer(model, blocks, budget, **kw):
    """A Trainer with the options among ``kw`` in its HypernetworkConfig and the rest as its keywords."""
    kw.setdefault("progress", False)
    options = {k: kw.pop(k) for k in list(kw) if k not in _TRAINER_ARGS}
    return Trainer(model, blocks, budget, HypernetworkConfig(**options), **kw)


def _train(model, blocks, ratio=0.5, budget=None, log=None, **kw):
    """``(masks, summary)`` of a run; ``log`` (a list) receives its StepLog entries, also when it is interrupted."""
    trainer = _trainer(model, blocks, budget or Budget.for_model(model, ratio), **kw)
    try:
        return trainer.run()
    finally:
        if log is not None:
            log.extend(trainer.log)


def _run(model, blocks, ratio=0.5, **kw):
    return _train(model, blocks, ratio, **kw)[0]


def _random_logits(dims, seed):
    g = torch.Generator().manual_seed(seed)
    return [{s: torch.randn(dims.size(s), generator=g) for s in STRUCTURES} for _ in range(dims.num_layers)]


def _one_more_exceeds(budget, widths, dims):
    """Some single added dimension would push the kept count over the target (the export is 'full')."""
    for i in range(len(widths)):
        for s in STRUCTURES:
            if widths[i][s] < dims.size(s):
                w = [dict(x) for x in widths]
                w[i][s] += 1
                if budget.kept_linear(w) > budget.target_linear:
                    return True
    return False


def test_training_moves_kept_ratio_toward_target(model, blocks):
    trainer = _trainer(model, blocks, Budget.for_model(model, 0.5), steps=5, lr=0.05)
    # lr 0.05, not the paper's 1e-3: the deterministic mask only changes once a logit moved by the offset (3).
    masks, summary = trainer.run()
    log = trainer.log
    assert all(isinstance(e, StepLog) for e in log)
    assert [e.step for e in log] == [1, 2, 3, 4, 5] and summary.steps == 5 and summary.start_step == 0
    assert log[0].kept_ratio == 1.0  # offset +3: everything kept at the start
    assert log[-1].kept_ratio < log[0].kept_ratio - 0.05
    assert log[-1].expected_ratio < log[0].expected_ratio
    # Gradients flowed only to the hypernetwork: the model is untouched and its flags are restored.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training
    budget = Budget.for_model(model, 0.5)
    assert budget.kept_linear(masks.widths()) <= budget.target_linear
    assert trainer.export_info.kept_decoder_linear == budget.kept_linear(masks.widths())


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("seed", [0, 1])
def test_export_hits_budget(model, dims, ratio, seed):
    budget = Budget.for_model(model, ratio)
    masks, info = export_masks(_random_logits(dims, seed), budget)
    widths = masks.widths()
    kept = budget.kept_linear(widths)
    assert kept <= budget.target_linear
    assert _one_more_exceeds(budget, widths, dims)
    assert info.kept_decoder_linear == kept
    masks.validate(dims)


def test_export_follows_scores_and_is_deterministic(model, dims):
    budget = Budget.for_model(model, 0.3)
    logits = _random_logits(dims, 3)
    a, info = export_masks(logits, budget)
    b, _ = export_masks([{s: t.clone() for s, t in layer.items()} for layer in logits], budget)
    assert a == b
    # One global threshold: every kept dim scores above it, every dropped one below (except the inputs of a
    # block whose output set is empty: those are dropped because the block is gone).
    kept_s, dropped_s = [], []
    for layer, m in zip(logits, a.to_masks(dims)):
        moot = set()
        if m["attn_out"].sum() == 0:
            moot.add("attn_in")
        if m["mlp_out"].sum() == 0:
            moot |= {"mlp_in", "mlp_mid"}
        for s in STRUCTURES:
            kept_s.append(layer[s][m[s] > 0] + 3.0)
            if s not in moot:
                dropped_s.append(layer[s][m[s] == 0] + 3.0)
    assert torch.cat(kept_s).min() > info.threshold > torch.cat(dropped_s).max()


def test_export_keeps_all_when_budget_allows_and_handles_huge_logits(model, dims):
    budget = Budget.for_model(model, 0.5)
    masks, _ = export_masks([{s: torch.full((dims.size(s),), -50.0) for s in STRUCTURES}
                             for _ in range(dims.num_layers)], budget)
    assert budget.kept_linear(masks.widths()) <= budget.target_linear
    bad = _random_logits(dims, 0)
    bad[1]["mlp_mid"][3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        export_masks(bad, budget)
    with pytest.raises(ValueError, match="multiple_of"):
        export_masks(_random_logits(dims, 0), budget, multiple_of=0)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_multiple_of(model, dims, ratio):
    budget = Budget.for_model(model, ratio)
    logits = _random_logits(dims, 5)
    masks, _ = export_masks(logits, budget, multiple_of=4)
    for w in masks.widths():
        assert all(w[s] % 4 == 0 for s in STRUCTURES), w
    assert budget.kept_linear(masks.widths()) <= budget.target_linear
    # The kept dims of each set are that set's highest-scoring ones.
    for layer, idx in zip(logits, masks.layers):
        for s in STRUCTURES:
            k = idx[s].numel()
            if k:
                assert set(idx[s].tolist()) == set(layer[s].topk(k).indices.tolist())


@pytest.mark.parametrize("m", [4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_export_multiple_of_fills_the_budget_like_every_method(model, dims, m, seed):
    """The one rounding policy (dip_ext.selection.budget): no set's next whole chunk would still fit, as for
    one-shot and dependent (tests/test_selection.py::test_selection_multiple_of)."""
    budget = Budget.for_model(model, 0.4)
    masks, info = export_masks(_random_logits(dims, seed), budget, multiple_of=m)
    widths = masks.widths()
    assert info.multiple_of == m and budget.kept_linear(widths) <= budget.target_linear
    for i in range(len(widths)):
        for s in STRUCTURES:
            n = dims.size(s)
            assert widths[i][s] % m == 0 or widths[i][s] == n
            if widths[i][s] < n:
                more = [dict(w) for w in widths]
                more[i][s] += min(m, n - widths[i][s])
                assert budget.kept_linear(more) > budget.target_linear, (i, s, widths)


def test_training_export_multiple_of(model, blocks):
    masks = _run(model, blocks, steps=2, lr=0.05, multiple_of=4)
    assert all(w[s] % 4 == 0 for w in masks.widths() for s in STRUCTURES)


def test_same_seed_same_masks_different_seed_differs(model, blocks):
    a = _run(model, blocks, steps=2, lr=0.05, seed=3)
    b = _run(model, blocks, steps=2, lr=0.05, seed=3)
    c = _run(model, blocks, steps=2, lr=0.05, seed=4)
    assert a == b
    assert a != c


def test_interrupted_and_resumed_equals_uninterrupted(model, blocks, tmp_path):
    kw = dict(steps=5, lr=0.05, seed=7, checkpoint_every=2)
    full_log = []
    full = _run(model, blocks, log=full_log, **kw)

    def stop_at_3(entry):
        if entry.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(model, blocks, checkpoint_dir=tmp_path, callback=stop_at_3, **kw)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name != CHECKPOINT_NAME]  # no temp files left behind
    resumed_log = []
    resumed = _run(model, blocks, checkpoint_dir=tmp_path, resume=True, log=resumed_log, **kw)
    assert [e.step for e in resumed_log] == [3, 4, 5]  # the last checkpoint was step 2
    assert resumed == full
    assert [e.lm_loss for e in resumed_log] == [e.lm_loss for e in full_log[2:]]


def test_run_to_3_then_resume_to_5(model, blocks, tmp_path):
    kw = dict(lr=0.05, seed=2, checkpoint_every=50)
    full = _run(model, blocks, steps=5, **kw)
    _run(model, blocks, steps=3, checkpoint_dir=tmp_path, **kw)  # the final checkpoint is written at the end
    log = []
    resumed = _run(model, blocks, steps=5, checkpoint_dir=tmp_path, resume=True, log=log, **kw)
    assert [e.step for e in log] == [4, 5]
    assert resumed == full
    # Resuming a finished run trains nothing and exports the same masks.
    log2 = []
    assert _run(model, blocks, steps=5, checkpoint_dir=tmp_path, resume=True, log=log2, **kw) == full
    assert log2 == []
    with pytest.raises(ValueError, match="beyond steps=4"):
        _run(model, blocks, steps=4, checkpoint_dir=tmp_path, resume=True, **kw)


def test_checkpoint_refusals(model, blocks, tmp_path):
    _run(model, blocks, steps=1, lr=0.05, seed=0, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="resume=True"):
        _run(model, blocks, steps=2, lr=0.05, seed=0, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different run.*seed"):
        _run(model, blocks, steps=2, lr=0.05, seed=1, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="different run.*ratio"):
        _run(model, blocks, ratio=0.3, steps=2, lr=0.05, seed=0, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="different run.*train_windows"):
        _run(model, blocks.flip(0), steps=2, lr=0.05, seed=0, checkpoint_dir=tmp_path, resume=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    header = json.dumps({"a": 1}).encode()  # a safetensors-looking length prefix and a foreign header
    (foreign / CHECKPOINT_NAME).write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="not a .*checkpoint"):
        _run(model, blocks, steps=2, checkpoint_dir=foreign, resume=True)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(foreign / CHECKPOINT_NAME), metadata={"format": "something.else"})
    with pytest.raises(ValueError, match="not a dip_ext hypernetwork checkpoint"):
        _run(model, blocks, steps=2, checkpoint_dir=foreign, resume=True)
    # resume=True without a checkpoint starts fresh.
    assert isinstance(_run(model, blocks, steps=1, lr=0.05, checkpoint_dir=tmp_path / "new", resume=True),
                      DispMasks)


def _init_masks(dims, budget, seed):
    """Random masks that fill the budget exactly (so no dimension can be added)."""
    masks, _ = export_masks(_random_logits(dims, seed), budget)
    return masks, dataclasses.replace(budget, target_linear=int(budget.kept_linear(masks.widths())))


def test_warm_start_reproduces_init_masks(model, dims):
    init, budget = _init_masks(dims, Budget.for_model(model, 0.4), seed=11)
    h = HyperNetwork(dims, seed=0)
    h.warm_start(init, offset=3.0)
    logits = h()
    for layer, m in zip(logits, init.to_masks(dims)):
        for s in STRUCTURES:
            want = torch.where(m[s] > 0, 0.0, -6.0)  # logit + 3 = +3 on kept, -3 on dropped
            torch.testing.assert_close(layer[s], want, atol=1e-4, rtol=0)
    exported, info = export_masks(logits, budget)
    assert exported == init
    assert info.threshold == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("margin", [0.5, 1.0])
def test_warm_start_margin(model, dims, margin):
    init, budget = _init_masks(dims, Budget.for_model(model, 0.4), seed=13)
    h = HyperNetwork(dims, seed=0)
    h.warm_start(init, offset=3.0, margin=margin)
    for layer, m in zip(h(), init.to_masks(dims)):
        for s in STRUCTURES:
            torch.testing.assert_close(layer[s] + 3.0, torch.where(m[s] > 0, margin, -margin), atol=1e-4, rtol=0)
    assert export_masks(h(), budget)[0] == init


def _mixed_space() -> PrunableSpace:
    """Three layers that differ: layer 1 has no ``mlp_mid`` but 4 ``experts`` (whole units), layer 2 a narrower
    ``mlp_mid`` than layer 0 and no ``kv_groups`` (optional, in layers 0 and 1)."""
    hid = [Structure(s, 8, "hidden") for s in ("attn_in", "attn_out", "mlp_in", "mlp_out")]
    kv = Structure("kv_groups", 2, "kv_groups", optional=True, whole_units=True)
    return PrunableSpace(8, (
        (*hid[:3], Structure("mlp_mid", 12, "ffn"), hid[3], kv),
        (*hid[:3], Structure("experts", 4, "experts", whole_units=True), hid[3], kv),
        (*hid[:3], Structure("mlp_mid", 6, "ffn"), hid[3])))


@pytest.mark.parametrize("optional", [(), ("kv_groups",)])
def test_heterogeneous_space_emits_each_layers_structures(optional):
    space = _mixed_space().select(optional)
    h = HyperNetwork(space, seed=1)
    assert h.heads == bool(optional) and h.structures == space.all_names
    out = h()
    assert [list(layer) for layer in out] == [list(space.names(i)) for i in range(3)]
    for i, layer in enumerate(out):
        for s, t in layer.items():
            assert t.shape == (space.size(i, s),) and t.dtype == torch.float32, (i, s)
    assert torch.equal(h.flat_logits(), flatten(out, space))
    assert h.features().shape == (3, len(space.all_names), 128)
    assert h.w_hidden.shape == (3, 4, 8, 128) and h.w_ffn.shape == (3, 12, 128) and h.w_experts.shape == (3, 4, 128)
    # the optional structure is drawn after everything else: the other heads start as without it
    plain = HyperNetwork(space.required(), seed=1)
    for name in ("w_hidden", "b_hidden", "w_ffn", "b_ffn", "w_experts", "b_experts"):
        assert torch.equal(getattr(plain, name), getattr(h, name))
    # warm start reaches +-margin on every slot; masks without kv_groups keep every group
    g = torch.Generator().manual_seed(0)
    masks = DispMasks([{s: (torch.rand(space.size(i, s), generator=g) < 0.5).nonzero().flatten()
                        for s in space.names(i)} for i in range(3)])
    feats = h.features().detach()
    before = {k: v.detach().clone() for k, v in h.named_parameters()}
    for init in (masks, DispMasks([{s: t for s, t in layer.items() if s != "kv_groups"} for layer in masks.layers])):
        h.warm_start(init, offset=3.0, margin=2.0)
        if init is masks:  # the minimum-norm change: each row's weights move by its bias change times the features
            for i, s in space.slots():
                hidden = space.structure(i, s).axis == "hidden"
                key = "hidden" if hidden else {"mlp_mid": "ffn", "kv_groups": "kv"}.get(s, s)
                row = (i, space.axis_names(i, "hidden").index(s)) if hidden else (i, slice(space.size(i, s)))
                dw = (h.get_parameter(f"w_{key}") - before[f"w_{key}"])[row]
                db = (h.get_parameter(f"b_{key}") - before[f"b_{key}"])[row]
                f = feats[i, space.all_names.index(s)]  # features() columns follow h.structures
                torch.testing.assert_close(dw, db[:, None] * f[None, :], atol=1e-6, rtol=1e-4)
        for i, layer in enumerate(h()):
            for s, t in layer.items():
                kept = torch.zeros(space.size(i, s), dtype=torch.bool)
                kept[init[i][s] if s in init[i] else slice(None)] = True
                torch.testing.assert_close(t + 3.0, torch.where(kept, 2.0, -2.0), atol=1e-4, rtol=0)
    if optional:
        with pytest.raises(ValueError, match="KV groups"):
            plain.warm_start(masks)


def test_distill_loss_is_the_kl_from_the_dense_model(model, blocks, dims):
    from dip_ext.masking import apply_masks
    from dip_ext.selection.hypernetwork.losses import step_losses

    budget = Budget.for_model(model, 0.4)
    ids = blocks[:2]
    with torch.no_grad():
        dense = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    with apply_masks(model, None) as masked:
        # Margin 60 at temperature 0.4: no sampled flip, so the student is the dense model and the KL is 0.
        h = HyperNetwork(dims, seed=0)
        h.warm_start(DispMasks.full(dims), margin=60.0)
        kl = step_losses(h, masked, model, ids, budget, torch.Generator().manual_seed(0), lam=1.0,
                         temperature=0.4, offset=3.0, distill=True).lm_loss
        assert float(kl.detach()) == pytest.approx(0.0, abs=1e-5)
        init, _ = _init_masks(dims, budget, seed=14)
        h.warm_start(init, margin=60.0)
        kl = step_losses(h, masked, model, ids, budget, torch.Generator().manual_seed(0), lam=1.0,
                         temperature=0.4, offset=3.0, distill=True).lm_loss
        kl.backward()
        masked.set_masks(init)
        with torch.no_grad():
            student = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    want = (dense.exp() * (dense - student)).sum(-1).mean()
    assert float(kl.detach()) == pytest.approx(float(want), rel=1e-4)
    assert float(kl.detach()) > 0
    assert h.w_hidden.grad is not None and torch.isfinite(h.w_hidden.grad).all()


def test_distill_and_margin_runs_resume_exactly(model, blocks, tmp_path):
    init, budget = _init_masks(adapter_for(model).dims(model.config), Budget.for_model(model, 0.4), seed=15)
    kw = dict(budget=budget, steps=4, lr=0.05, init_masks=init, margin=1.0, distill=True)
    full_log, part_log = [], []
    whole = _run(model, blocks, log=full_log, **kw)
    _run(model, blocks, **{**kw, "steps": 2}, checkpoint_dir=tmp_path, checkpoint_every=1, log=part_log)
    resumed = _run(model, blocks, **kw, checkpoint_dir=tmp_path, resume=True, log=part_log)
    assert resumed == whole
    assert [e.lm_loss for e in part_log] == pytest.approx([e.lm_loss for e in full_log], rel=1e-6)
    with pytest.raises(ValueError, match="different run.*distill"):
        _run(model, blocks, **{**kw, "distill": False}, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="different run.*margin"):
        _run(model, blocks, **{**kw, "margin": 2.0}, checkpoint_dir=tmp_path, resume=True)


def test_cosine_schedule_lr_per_step_and_exact_resume(model, blocks, tmp_path, monkeypatch):
    assert hn.scheduled_lr(0.1, "cosine", 0, 4) == pytest.approx(0.1)
    assert hn.scheduled_lr(0.1, "cosine", 2, 4) == pytest.approx(0.05)
    assert hn.scheduled_lr(0.1, "constant", 3, 4) == 0.1
    seen = []  # the lr each AdamW step ran with
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    kw = dict(steps=4, lr=0.05, seed=3, lr_schedule="cosine")
    full_log = []
    full = _run(model, blocks, log=full_log, **kw)
    assert seen == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])
    constant = _run(model, blocks, **{**kw, "lr_schedule": "constant"})
    assert seen[4:] == [0.05] * 4 and isinstance(constant, DispMasks)
    def stop_at_2(entry):
        if entry.step == 2:
            raise KeyboardInterrupt

    part_log = []
    with pytest.raises(KeyboardInterrupt):
        _run(model, blocks, **kw, checkpoint_dir=tmp_path, checkpoint_every=1, callback=stop_at_2, log=part_log)
    resumed = _run(model, blocks, **kw, checkpoint_dir=tmp_path, resume=True, log=part_log)
    assert resumed == full
    assert [e.lm_loss for e in part_log] == [e.lm_loss for e in full_log]
    # the cosine is laid out over `steps`: a longer run is another run
    with pytest.raises(ValueError, match="different run.*at step 1 differs.*schedule_steps: checkpoint 4 vs now 6"):
        _run(model, blocks, **{**kw, "steps": 6}, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="different run.*lr_schedule"):
        _run(model, blocks, **{**kw, "lr_schedule": "constant"}, checkpoint_dir=tmp_path, resume=True)


def test_cosine_tail_anneals_a_constant_run_exactly(model, blocks, tmp_path, monkeypatch):
    """A constant run's checkpoint continues as a cosine-tail run (same learning rates so far) and gives the
    masks of an uninterrupted cosine-tail run; a tail that would have started before the checkpoint is refused."""
    assert [hn.scheduled_lr(0.1, "cosine-tail", t, 5, 2) for t in range(5)] == pytest.approx([0.1, 0.1, 0.1, 0.1,
                                                                                                0.05])
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    tail = dict(steps=5, lr=0.05, seed=3, lr_schedule="cosine-tail", decay_steps=2)
    full_log = []
    full = _run(model, blocks, log=full_log, **tail)
    assert seen == pytest.approx([0.05, 0.05, 0.05, 0.05, 0.025])
    part_log = []
    _run(model, blocks, steps=3, lr=0.05, seed=3, checkpoint_dir=tmp_path, log=part_log)  # constant, 3 steps
    assert _run(model, blocks, **tail, checkpoint_dir=tmp_path, resume=True, log=part_log) == full
    assert [e.lm_loss for e in part_log] == [e.lm_loss for e in full_log]
    # the checkpoint (now at step 5) took step 4 at 0.025; a tail over the last 3 of 6 steps would run it at 0.0375
    with pytest.raises(ValueError, match="learning rate at step 4 differs.*decay_steps: checkpoint 2 vs now 3"):
        _run(model, blocks, **{**tail, "steps": 6, "decay_steps": 3}, checkpoint_dir=tmp_path, resume=True)
    # an annealed run cannot be extended as a constant one either
    with pytest.raises(ValueError, match="learning rate at step 4 differs.*lr_schedule: checkpoint 'cosine-tail'"):
        _run(model, blocks, steps=7, lr=0.05, seed=3, checkpoint_dir=tmp_path, resume=True)


def test_corrupt_schedule_in_checkpoint_is_refused(model, blocks, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _run(model, blocks, steps=2, lr=0.05, lr_schedule="cosine", checkpoint_dir=tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["json"])
    meta["fingerprint"]["schedule_steps"] = None
    save_file(tensors, str(path), metadata={**header, "json": json.dumps(meta)})
    with pytest.raises(ValueError, match="corrupt learning-rate schedule.*schedule_steps: checkpoint None vs now 2"):
        _run(model, blocks, steps=2, lr=0.05, lr_schedule="cosine", checkpoint_dir=tmp_path, resume=True)


def _rewrite_meta(path, edit):
    """Rewrites the JSON header of the checkpoint at ``path`` through ``edit(header, meta)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["json"])
    edit(header, meta)
    save_file(tensors, str(path), metadata={**header, "json": json.dumps(meta)})


def test_checkpoint_from_before_an_option_resumes_under_its_default(model, blocks, tmp_path):
    """A checkpoint written before ``margin`` / ``distill`` existed (no such fingerprint keys) ran with their
    defaults: it resumes under the defaults and is refused under other values."""
    whole = _run(model, blocks, steps=3, lr=0.05)
    _run(model, blocks, steps=2, lr=0.05, checkpoint_dir=tmp_path)

    def drop(header, meta):
        for key in ("margin", "distill"):
            del meta["fingerprint"][key]
    _rewrite_meta(tmp_path / CHECKPOINT_NAME, drop)
    with pytest.raises(ValueError, match="different run.*distill: checkpoint False vs now True"):
        _run(model, blocks, steps=3, lr=0.05, checkpoint_dir=tmp_path, resume=True, distill=True)
    assert _run(model, blocks, steps=3, lr=0.05, checkpoint_dir=tmp_path, resume=True) == whole


def test_checkpoint_from_before_the_space_was_recorded_resumes(model, blocks, tmp_path):
    """The fingerprint records the model's prunable space; a checkpoint written before it did (no ``space`` key)
    was of the built-in layout its other entries pin down, and resumes."""
    whole = _run(model, blocks, steps=3, lr=0.05)
    _run(model, blocks, steps=2, lr=0.05, checkpoint_dir=tmp_path)
    _, meta = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert meta["fingerprint"]["space"] == adapter_for(model).space(model.config).as_dict()

    def drop(header, meta):
        del meta["fingerprint"]["space"]
    _rewrite_meta(tmp_path / CHECKPOINT_NAME, drop)
    assert _run(model, blocks, steps=3, lr=0.05, checkpoint_dir=tmp_path, resume=True) == whole


def test_checkpoint_of_format_v1_is_refused_naming_why(model, blocks, tmp_path):
    """v1 checkpoints record no digest of the model's weights: nothing shows which model wrote them."""
    _run(model, blocks, steps=2, lr=0.05, checkpoint_dir=tmp_path)

    def to_v1(header, meta):
        header["format"] = meta["format"] = "dip_ext.hypernetwork-checkpoint.v1"
        del meta["fingerprint"]["weights"]
    _rewrite_meta(tmp_path / CHECKPOINT_NAME, to_v1)
    with pytest.raises(ValueError, match="cannot be resumed: .*older dip_ext.*not record the model's weights.*v1"):
        _run(model, blocks, steps=3, lr=0.05, checkpoint_dir=tmp_path, resume=True)


def test_resume_on_another_model_of_the_same_shape_is_refused(model, blocks, tmp_path):
    """The reported fault: a work folder written for model A, resumed with model B of the same shape, must not
    return A's masks. Also another dtype of the same weights is another run."""
    _run(model, blocks, steps=2, lr=0.05, checkpoint_dir=tmp_path)
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(model.config).eval()  # same config and shapes, other weights
    with pytest.raises(ValueError, match=r"different run.*\(weights: checkpoint '[0-9a-f]{16}' vs now '[0-9a-f]{16}'\)"):
        _run(other, blocks, steps=3, lr=0.05, checkpoint_dir=tmp_path, resume=True)
    half = transformers.LlamaForCausalLM(model.config).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.float64)
    with pytest.raises(ValueError, match="different run.*dtype: checkpoint 'torch.float32' vs now 'torch.float64'"):
        _run(half, blocks, steps=3, lr=0.05, checkpoint_dir=tmp_path, resume=True)
    # the same weights in another model object: the same run, resumed
    same = transformers.LlamaForCausalLM(model.config).eval()
    same.load_state_dict(model.state_dict())
    assert _run(same, blocks, steps=3, lr=0.05, checkpoint_dir=tmp_path, resume=True) == \
        _run(model, blocks, steps=3, lr=0.05)


def test_weights_digest_sees_a_single_changed_sample():
    from dip_ext.model_state import model_digest as weights_digest

    lin = torch.nn.Linear(300, 7)
    d = weights_digest(lin)
    assert d == weights_digest(lin) and len(d) == 16
    with torch.no_grad():
        lin.weight.view(-1)[0] += 1.0  # the first of the evenly spaced samples
    assert weights_digest(lin) != d
    with pytest.raises(ValueError, match="samples"):
        weights_digest(lin, samples=0)


def test_warm_started_training_stays_near_init(model, blocks, dims):
    init, budget = _init_masks(dims, Budget.for_model(model, 0.4), seed=12)
    log = []
    masks = _run(model, blocks, budget=budget, steps=1, init_masks=init, log=log)
    assert log[0].kept_ratio == pytest.approx(budget.kept_ratio(init.widths()), abs=1e-6)
    assert masks == init  # one step at lr 1e-3 cannot move a logit by 3


def test_batch_order_is_seeded_epoch_shuffles():
    n, bs = 5, 2
    stream = torch.tensor([i for t in range(5) for i in EpochOrder(n, bs, seed=3).indices(t)])  # 10 = two epochs
    assert sorted(stream[:5].tolist()) == list(range(5)) and sorted(stream[5:].tolist()) == list(range(5))
    assert not torch.equal(stream[:5], stream[5:]) or n < 3
    assert stream.tolist() == [i for t in range(5) for i in EpochOrder(n, bs, seed=3).indices(t)]
    assert stream.tolist() != [i for t in range(5) for i in EpochOrder(n, bs, seed=4).indices(t)]


@pytest.mark.parametrize("bad, kw, err, match", [
    ("blocks", dict(), ValueError, "train_windows is empty"),
    ("float", dict(), ValueError, "train_windows must be a 2-D LongTensor"),
    ("1d", dict(), ValueError, "train_windows must be a 2-D LongTensor"),
    ("list", dict(), ValueError, "train_windows must be a LongTensor"),
    ("vocab", dict(), ValueError, "train_windows hold token ids outside"),
    (None, dict(steps=-1), ValueError, "steps must be an integer >= 0"),
    (None, dict(steps=2.5), ValueError, "steps must be an integer"),
    (None, dict(batch_size=0), ValueError, "batch_size"),
    (None, dict(lr=0.0), ValueError, "lr"),
    (None, dict(temperature=-1.0), ValueError, "temperature"),
    (None, dict(lam=float("nan")), ValueError, "lam"),
    (None, dict(multiple_of=0), ValueError, "multiple_of"),
    (None, dict(seed=-1), ValueError, "seed"),
    (None, dict(checkpoint_every=0), ValueError, "checkpoint_every"),
    (None, dict(val_every=0), ValueError, "val_every"),
    (None, dict(margin=0.0), ValueError, "margin"),
    (None, dict(margin=float("inf")), ValueError, "margin"),
    (None, dict(lr_schedule="linear"), ValueError, "lr_schedule must be one of constant, cosine, cosine-tail"),
    (None, dict(lr_schedule="cosine-tail"), ValueError, "needs decay_steps, an integer >= 1, got None"),
    (None, dict(lr_schedule="cosine-tail", decay_steps=0), ValueError, "decay_steps must be an integer >= 1"),
    (None, dict(steps=4, lr_schedule="cosine-tail", decay_steps=9), ValueError, r"decay_steps \(9\) must not exceed steps"),
    (None, dict(decay_steps=2), ValueError, "decay_steps is only for lr_schedule 'cosine-tail', not 'constant'"),
    (None, dict(val_windows=torch.zeros(0, 16, dtype=torch.long)), ValueError, "val_windows is empty"),
    (None, dict(val_windows=torch.zeros(2, 16)), ValueError, "val_windows must be"),
    (None, dict(val_windows=torch.full((2, 16), 99)), ValueError, "val_windows hold token ids outside"),
    (None, dict(placement="single"), ValueError, "placement must be"),
    (None, dict(callback=3), ValueError, "callback must be callable"),
])
def test_bad_input(model, blocks, bad, kw, err, match):
    b = {"blocks": blocks[:0], "float": blocks.float(), "1d": blocks[0], "list": blocks.tolist(),
         "vocab": blocks + 64, None: blocks}[bad]
    with pytest.raises(err, match=match):
        _run(model, b, **kw)


def test_bad_budget_and_init_masks(model, blocks, dims):
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="budget was made"):
        _run(model, blocks, budget=Budget.for_model(other, 0.5), steps=1)
    with pytest.raises(ValueError, match="Budget"):
        Trainer(model, blocks, 0.5, HypernetworkConfig(steps=1))
    with pytest.raises(ValueError, match="HypernetworkConfig"):
        Trainer(model, blocks, Budget.for_model(model, 0.5), {"steps": 1})
    wrong = DispMasks.full(dataclasses.replace(dims, num_layers=3))
    with pytest.raises(ValueError, match="layers"):
        _run(model, blocks, steps=1, init_masks=wrong)


# ---- validation: early stopping on held-out windows ---------------------------------------------------------

@pytest.fixture(scope="module")
def val_blocks():
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(5))


def _masked_loss(model, masks, windows):
    from dip_ext.masking import apply_masks

    with torch.no_grad(), apply_masks(model, masks):
        return float(model(input_ids=windows, labels=windows).loss)


def test_validation_returns_the_best_scoring_export(model, blocks, val_blocks):
    """The returned masks are the export of the step with the lowest held-out loss (recomputed here from
    scratch), and that loss is what the run recorded."""
    log = []
    kw = dict(steps=6, lr=0.05, seed=3, val_windows=val_blocks, val_every=2)
    masks, report = _train(model, blocks, log=log, **kw)
    history = report.val_history
    assert [h[0] for h in history] == [0, 2, 4, 6]
    assert [e.step for e in log if e.val_loss is not None] == [2, 4, 6]
    best_step, best_loss = min(history, key=lambda h: (h[1], h[0]))
    assert report.best_step == best_step and report.best_val_loss == best_loss
    assert _masked_loss(model, masks, val_blocks) == pytest.approx(best_loss, rel=1e-5)
    assert 0 < best_step < 6  # this seed's run peaks mid-way: neither the start nor the last step is returned
    # The export at the best step, recomputed by stopping a run of the same seed there:
    assert masks == _run(model, blocks, **{**kw, "steps": best_step, "val_windows": None})
    last = _run(model, blocks, **{**kw, "val_windows": None})
    assert _masked_loss(model, last, val_blocks) >= best_loss - 1e-6  # never worse than the last step's export


def test_validation_keeps_the_warm_start_when_training_only_hurts(model, blocks, val_blocks, dims):
    """A learning rate that wrecks the hypernetwork: the warm start (step 0) stays the answer."""
    budget = Budget.for_model(model, 0.4)
    init = _run(model, blocks, budget=budget, steps=1, lr=1e-6)
    masks, report = _train(model, blocks, budget=budget, steps=4, lr=5.0, init_masks=init, seed=1,
                           val_windows=val_blocks, val_every=1)
    losses = dict(report.val_history)
    assert sorted(losses) == [0, 1, 2, 3, 4]
    assert min(v for k, v in losses.items() if k > 0) > losses[0]  # the premise: every step made it worse
    assert report.best_step == 0 and masks == init


def test_validation_state_survives_interruption(model, blocks, val_blocks, tmp_path):
    kw = dict(steps=6, lr=0.05, seed=4, checkpoint_every=2, val_windows=val_blocks, val_every=2)
    full, full_report = _train(model, blocks, **kw)

    def stop_at_5(entry):
        if entry.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(model, blocks, checkpoint_dir=tmp_path, callback=stop_at_5, **kw)
    masks, report = _train(model, blocks, checkpoint_dir=tmp_path, resume=True, **kw)
    assert masks == full and report.start_step == 4
    assert report.val_history == full_report.val_history and report.best_step == full_report.best_step
    with pytest.raises(ValueError, match="val_windows"):  # other validation windows: another run
        _run(model, blocks, checkpoint_dir=tmp_path, resume=True, **{**kw, "val_windows": val_blocks[:2]})
