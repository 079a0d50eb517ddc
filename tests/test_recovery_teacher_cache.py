"""The teacher's top-k logits cached on disk for distillation (dip_ext.recovery.teacher_cache): the coarsened KL
against the full one, a cached run against a run with the live teacher, reuse, resume and bad input. Tiny random
Llama models, fp32, one thread (helpers from test_recovery)."""

from __future__ import annotations

import pytest
import torch

from dip_ext.recovery import recover
from dip_ext.recovery.losses import kl_sum, topk_kl_sum
from dip_ext.recovery.teacher_cache import TeacherTopK
from dip_ext.training import EpochOrder
from test_recovery import VOCAB, config, held_out_kl, pair, windows

pytestmark = pytest.mark.usefixtures("one_thread")


def _targets(teacher_logits: torch.Tensor, k: int, t: float):
    z = teacher_logits[:, :-1].double() / t
    values, indices = z.topk(k, dim=-1)
    return values, indices, torch.logsumexp(z, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_kl_equals_full_kl_when_one_token_is_left_and_bounds_it_below(temperature):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 9, VOCAB, generator=g, dtype=torch.float64) * 3
    student = torch.randn(2, 9, VOCAB, generator=g, dtype=torch.float64)
    full_s = student.clone().requires_grad_(True)
    full = kl_sum(full_s, teacher.clone(), temperature)
    (full_grad,) = torch.autograd.grad(full, full_s)
    top_s = student.clone().requires_grad_(True)
    top = topk_kl_sum(top_s, *_targets(teacher, VOCAB - 1, temperature), temperature)
    (top_grad,) = torch.autograd.grad(top, top_s)
    assert float(top.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    torch.testing.assert_close(top_grad, full_grad, rtol=1e-4, atol=1e-6)
    previous = 0.0
    for k in (1, 4, 16, 48):  # a coarser partition loses information: the KL only grows with k, up to the full one
        value = float(topk_kl_sum(student, *_targets(teacher, k, temperature), temperature))
        assert previous <= value <= float(full) + 1e-4
        previous = value


def test_topk_kl_refuses_mismatched_targets():
    logits = torch.zeros(1, 5, VOCAB)
    values, indices, lse = _targets(torch.randn(1, 5, VOCAB), 3, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        topk_kl_sum(logits, values, indices[:, :, :2], lse)
    with pytest.raises(ValueError, match="do not match"):
        topk_kl_sum(torch.zeros(1, 6, VOCAB), values, indices, lse)


def test_cached_distillation_with_all_but_one_token_equals_the_live_teacher(tmp_path):
    train, val = windows(8, 1), windows(3, 2)
    live_student, teacher = pair()
    live = recover(live_student, teacher, train, val, config(), progress=False)
    student, teacher = pair()
    cached = recover(student, teacher, train, val, config(recover_teacher_topk=VOCAB - 1), progress=False,
                     work_dir=tmp_path)
    a = [loss for _, loss in live.distillation["losses"]]
    b = [loss for _, loss in cached.distillation["losses"]]
    assert b == pytest.approx(a, rel=1e-4)
    for p, q in zip(student.parameters(), live_student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    used = {i for s in range(6) for i in EpochOrder(8, 2, 0).indices(s)}
    assert cached.distillation["teacher_cached_windows"] == len(used)


def test_small_k_distillation_learns_and_a_second_run_reuses_the_cache(tmp_path):
    train, val = windows(12, 1), windows(4, 2)
    cfg = config(recover_steps=20, recover_lr=1e-2, recover_teacher_topk=8)
    student, teacher = pair()
    before = held_out_kl(student, teacher, val)
    first = recover(student, teacher, train, None, cfg, work_dir=tmp_path, progress=False)
    assert held_out_kl(student, teacher, val) < 0.8 * before
    assert first.distillation["teacher_cached_windows"] == 12  # 40 window-steps over 12 windows: each once
    files = sorted(p.name for p in tmp_path.glob("teacher-topk-*/w*.safetensors"))
    assert len(files) == 12
    again, teacher = pair()
    second = recover(again, teacher, train, None, cfg, work_dir=tmp_path, progress=False)
    assert second.distillation["teacher_cached_windows"] == 0
    assert second.distillation["losses"] == first.distillation["losses"]
    other, teacher = pair(seed=1)  # another teacher: another cache folder, never the first one's targets
    third = recover(other, teacher, train, None, cfg, work_dir=tmp_path, progress=False)
    assert third.distillation["teacher_cached_windows"] == 12
    assert len(list(tmp_path.glob("teacher-topk-*"))) == 2


def test_cached_run_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    train, val = windows(10, 1), windows(3, 2)
    cfg = config(recover_steps=6, recover_checkpoint_every=1, recover_teacher_topk=5)
    ref_student, teacher = pair()
    ref = recover(ref_student, teacher, train, val, cfg, work_dir=tmp_path / "ref", progress=False)

    def stop(entry):
        if entry["step"] == 3:
            raise KeyboardInterrupt

    student, teacher = pair()
    with pytest.raises(KeyboardInterrupt):
        recover(student, teacher, train, val, cfg, work_dir=tmp_path / "run", progress=False, callback=stop)
    student, teacher = pair()
    resumed = recover(student, teacher, train, val, cfg, work_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed.resumed and resumed.distillation["losses"] == ref.distillation["losses"]
    for a, b in zip(student.parameters(), ref_student.parameters()):
        assert torch.equal(a, b)


def test_bad_cache_settings_and_damaged_files_are_refused(tmp_path):
    train = windows(6, 1)
    with pytest.raises(ValueError, match="vocabulary size - 1"):
        recover(*pair(), train, None, config(recover_teacher_topk=VOCAB), progress=False)
    with pytest.raises(ValueError, match="hidden-state loss"):
        recover(*pair(), train, None, config(recover_teacher_topk=4, recover_hidden_weight=1.0), progress=False)
    student, teacher = pair()
    cache = TeacherTopK.for_teacher(tmp_path, teacher, train, 4, 1.0)
    assert cache.fill(teacher, [0, 1, 1], progress=False) == 2 and cache.missing(range(6)) == [2, 3, 4, 5]
    cache.path(1).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="w000001.safetensors"):
        cache.targets([0, 1])
    with pytest.raises(ValueError, match="missing"):
        cache.targets([2])
