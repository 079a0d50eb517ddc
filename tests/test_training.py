"""The training kit (dip_ext.training) on its own: the seeded epoch order and its rank shares, optimizer state
through tensors and back, the digest, the checkpoint file and its refusals, best-state tracking and the
requires_grad scope. The loops that use it are tested (resume included) in test_hypernetwork, test_recovery and
test_selection."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dip_ext.training import (BestState, CheckpointFormat, EpochOrder, copy_into, digest, load_optimizer_state,
                              optimizer_state, requires_grad_only, snapshot, tensor_fingerprint)

# ---- EpochOrder -------------------------------------------------------------------------------------------------


def test_epoch_order_is_the_order_of_earlier_releases():
    """Recorded from the hypernetwork's and the distillation's orders before they became one: a single process
    sees exactly the batches it saw (the goldens and every resumed run depend on it), negative seeds included."""
    assert [EpochOrder(7, 3, seed=5).indices(t) for t in range(5)] == [
        [4, 3, 6], [1, 5, 2], [0, 3, 1], [5, 6, 2], [0, 4, 1]]
    assert [EpochOrder(5, 2, seed=-3).indices(t) for t in range(4)] == [[1, 2], [3, 0], [4, 2], [4, 0]]


def test_epoch_order_is_deterministic_and_a_function_of_the_step_only():
    order = EpochOrder(11, 4, seed=2)
    stream = [i for t in range(11) for i in order.indices(t)]  # 44 windows = 4 epochs
    assert stream == [i for t in range(11) for i in EpochOrder(11, 4, seed=2).indices(t)]
    assert [order.indices(t) for t in (7, 3, 7)] == [stream[28:32], stream[12:16], stream[28:32]]
    for e in range(4):  # each pass over the windows sees every window once
        assert sorted(stream[11 * e:11 * (e + 1)]) == list(range(11))
    assert stream[:11] != stream[11:22]
    assert stream != [i for t in range(11) for i in EpochOrder(11, 4, seed=3).indices(t)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_rank_shares_cover_the_global_batch_without_overlap_or_loss(world, batch):
    order = EpochOrder(6, batch, seed=1)
    for step in range(4):
        shares = [order.share(step, r, world) for r in range(world)]
        assert Counter(i for share in shares for i in share) == Counter(order.indices(step))
        positions = [range(len(order.indices(step)))[r::world] for r in range(world)]  # disjoint by construction
        assert [[order.indices(step)[p] for p in pos] for pos in positions] == shares
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert order.share(3) == order.indices(3)


def test_epoch_order_refuses_bad_arguments():
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        EpochOrder(0, 2)
    with pytest.raises(ValueError, match="batch must be an integer, got 1.5"):
        EpochOrder(3, 1.5)
    with pytest.raises(ValueError, match="step must be >= 0"):
        EpochOrder(3, 1).indices(-1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        EpochOrder(3, 1).share(0, 2, 2)


# ---- optimizer state --------------------------------------------------------------------------------------------


def _trained(opt_cls, steps=3, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = opt_cls(model.parameters(), **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # changes the groups' lr
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt


def _same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for key, v in sa["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][key])), (i, key)
    assert sa["param_groups"] == sb["param_groups"]


@pytest.mark.parametrize("opt_cls, kw", [(torch.optim.AdamW, dict(lr=0.1, weight_decay=0.05, betas=(0.8, 0.9))),
                                          (torch.optim.Adam, dict(lr=0.1)),
                                          (torch.optim.SGD, dict(lr=0.1, momentum=0.9))])
def test_optimizer_state_round_trip_is_exact(opt_cls, kw, tmp_path):
    model, opt = _trained(opt_cls, **kw)
    tensors, groups = optimizer_state(opt)
    assert all(k.startswith("opt.") for k in tensors) and all(t.device.type == "cpu" for t in tensors.values())
    fmt = CheckpointFormat("dip_ext.optimizer-test", 1, "test checkpoint")  # through a file, as a loop does
    fmt.write(tmp_path / "opt", tensors, {"fingerprint": {}, "groups": groups})
    tensors, meta = fmt.read(tmp_path / "opt")
    groups = meta["groups"]
    twin = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    fresh = opt_cls(twin.parameters(), **{**kw, "lr": 9.0})
    load_optimizer_state(fresh, {**tensors, "param.x": torch.zeros(1)}, groups)
    _same_state(opt, fresh)
    for m, o in ((model, opt), (twin, fresh)):  # and the next step is the same step
        torch.manual_seed(1)
        m(torch.randn(5, 4)).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_optimizer_state_without_groups_keeps_the_optimizers_own():
    _, opt = _trained(torch.optim.AdamW, lr=0.1)
    tensors, _ = optimizer_state(opt)
    fresh = torch.optim.AdamW(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).parameters(), lr=0.7)
    load_optimizer_state(fresh, tensors)
    assert fresh.param_groups[0]["lr"] == 0.7 and fresh.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="2 parameter groups"):
        load_optimizer_state(fresh, tensors, [{}, {}])


# ---- digest -----------------------------------------------------------------------------------------------------


def test_digest_is_stable():
    """The same parts give the same 16 hex characters in every process and release: checkpoints and cache folders
    of earlier runs are found by them (this value is a calibration file's window digest of earlier releases)."""
    blocks = torch.arange(12).reshape(3, 4)
    assert digest(str((3, 4)), blocks) == "4d342c941a8823b0"
    assert digest("abc") == hashlib.sha256(b"abc").hexdigest()[:16] == digest(b"abc") == digest("a", b"b", "c")
    assert digest(blocks) == hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:16]
    assert digest(blocks.t().contiguous().t()) == digest(blocks)  # the layout in memory does not count
    assert digest(blocks.to(torch.int32)) != digest(blocks)  # the dtype does
    assert digest(torch.tensor([True, False])) != digest(torch.tensor([False, True]))
    assert tensor_fingerprint(blocks) == [3, 4, digest(blocks)] and tensor_fingerprint(None) is None
    with pytest.raises(TypeError, match="got int"):
        digest(3)


# ---- CheckpointFormat -------------------------------------------------------------------------------------------

FMT = CheckpointFormat("dip_ext.test-checkpoint", 3, "test checkpoint", remedy="remove it",
                       refused={"dip_ext.test-checkpoint.v1": "its windows were counted differently"})


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "c.safetensors"
    FMT.write(path, {"w": torch.arange(3.0)}, {"fingerprint": {"a": 1, "b": {"c": [1, 2]}}, "step": 4})
    tensors, meta = FMT.read(path)
    assert torch.equal(tensors["w"], torch.arange(3.0))
    assert meta == {"format": "dip_ext.test-checkpoint.v3", "fingerprint": {"a": 1, "b": {"c": [1, 2]}}, "step": 4}
    assert FMT.read_if_present(path)[1] == meta and FMT.read_if_present(tmp_path / "none") is None
    assert not list(tmp_path.glob(".tmp-*"))
    assert FMT.load_matching(path, {"a": 1, "b": {"c": [1, 2]}})[1]["step"] == 4


def test_checkpoint_refusal_names_each_differing_key(tmp_path):
    path = tmp_path / "c.safetensors"
    FMT.write(path, {}, {"fingerprint": {"seed": 0, "lr": 0.1, "same": "x", "opts": {"k": 2, "j": 1}}})
    now = {"seed": 1, "lr": 0.2, "same": "x", "opts": {"k": 3, "j": 1}, "new": True}
    with pytest.raises(ValueError) as e:
        FMT.load_matching(path, now, labels={"seed": "the seed of the order"})
    msg = str(e.value)
    assert msg.startswith(f"{path} was written by a different run and cannot be resumed (")
    for part in ("lr: checkpoint 0.1 vs now 0.2", "new: checkpoint None vs now True", "opts.k: checkpoint 2 vs now 3",
                 "the seed of the order: checkpoint 0 vs now 1"):
        assert part in msg
    assert "same" not in msg and "opts.j" not in msg and msg.endswith("; remove it")
    FMT.check_fingerprint(path, {"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 0.1}, keys={"lr"})  # only those keys


def test_checkpoint_of_another_version_or_kind_is_refused_by_name(tmp_path):
    path = tmp_path / "c.safetensors"
    cases = {"dip_ext.test-checkpoint.v2": r"cannot be resumed: it was written by an older dip_ext \(format "
                                          r"'dip_ext.test-checkpoint.v2'; this version reads 'dip_ext.test-checkpoint.v3'\)",
             "dip_ext.test-checkpoint.v4": "cannot be resumed: it was written by a newer dip_ext",
             "dip_ext.test-checkpoint.v1": r"cannot be resumed: its windows were counted differently \(format "
                                          "'dip_ext.test-checkpoint.v1'",
             "something.else": "is not a dip_ext test checkpoint \\(format 'something.else'\\); remove it"}
    for fmt, match in cases.items():
        save_file({"x": torch.zeros(1)}, str(path), metadata={"format": fmt, "json": json.dumps({"fingerprint": {}})})
        with pytest.raises(ValueError, match=match):
            FMT.read(path)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": FMT.tag, "json": "{}"})
    with pytest.raises(ValueError, match="records no fingerprint"):
        FMT.read(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="is not a readable test checkpoint.*; remove it"):
        FMT.read(path)


# ---- BestState --------------------------------------------------------------------------------------------------


def test_best_state_keeps_the_strictly_lowest_and_survives_a_checkpoint(tmp_path):
    best, calls = BestState(), []

    def snap(value):
        return lambda: calls.append(value) or {"w": torch.tensor([value])}

    assert best.step is None and best.loss == math.inf and best.tensors() == {}
    assert best.meta() == {"best_step": None, "best_val_loss": None, "val_history": []}
    assert best.offer(0, 2.0, snap(0.0)) and not best.offer(1, 2.0, snap(1.0))  # a tie keeps the earlier
    assert best.offer(2, 1.5, snap(2.0)) and not best.offer(3, float("nan"), snap(3.0))
    assert calls == [0.0, 2.0]  # a snapshot only of what is kept
    assert (best.step, best.loss) == (2, 1.5) and torch.equal(best.state["w"], torch.tensor([2.0]))
    fmt = CheckpointFormat("dip_ext.best-test", 1, "test checkpoint")
    fmt.write(tmp_path / "b", best.tensors(), {"fingerprint": {}, **best.meta()})
    back = BestState.from_checkpoint(*fmt.read(tmp_path / "b"))
    assert (back.step, back.loss, back.history[:3]) == (2, 1.5, [(0, 2.0), (1, 2.0), (2, 1.5)])
    assert math.isnan(back.history[3][1]) and torch.equal(back.state["w"], torch.tensor([2.0]))
    with pytest.raises(ValueError, match="records a best step but holds no best"):
        BestState.from_checkpoint({}, best.meta())
    assert BestState.from_checkpoint({}, BestState().meta()).state is None


# ---- requires_grad scope, snapshots -----------------------------------------------------------------------------


def test_requires_grad_only_scopes_and_restores_every_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].bias.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(KeyboardInterrupt):
        with requires_grad_only(model, [model[1].weight]):
            assert [p.requires_grad for p in model.parameters()] == [False, False, True, False]
            with requires_grad_only(model[0], model[0].parameters()):  # nested: the inner scope opens layer 0
                assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
            assert [p.requires_grad for p in model.parameters()] == [False, False, True, False]
            raise KeyboardInterrupt
    assert [p.requires_grad for p in model.parameters()] == before


def test_snapshot_and_copy_into():
    model = nn.Linear(2, 2)
    saved = snapshot(model.named_parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(saved["weight"], model.weight)
    copy_into(model.named_parameters(), {f"p.{k}": v for k, v in saved.items()}, prefix="p.")
    assert torch.equal(saved["weight"], model.weight) and model.weight.requires_grad
    with torch.no_grad():
        model.weight.add_(1.0)
    changed = model.weight.detach().clone()
    with pytest.raises(ValueError, match="holds no 'bias'"):
        copy_into(model.named_parameters(), {"weight": saved["weight"]})
    assert torch.equal(model.weight, changed)  # nothing copied before the refusal
