"""Distillation of a compacted student from its dense teacher: AdamW, warm-up + cosine, accumulation, early stopping
on held-out windows, exact resume, data-parallel ranks.

Each optimizer step takes ``recover_batch`` training windows in a seeded order (a fresh permutation per pass over
the windows, a function of seed and pass only), so the windows of step s never depend on how the run got there:
a resumed run, or N ranks each taking every N-th window of the step's batch, see exactly the windows of an
uninterrupted one-process run. The objective (:mod:`.losses`) is summed over the step's predicted tokens on every
rank, divided by the global count, gradients are summed over ranks, clipped to norm 1 and applied identically on
every rank, so all ranks hold the same weights.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .. import distributed as dist
from ..distributed import Placement
from ..eval import mean_window_loss
from ..families import adapter_for
from ..model_state import model_device, model_digest
from ..options import as_dict
from .checkpoint import load_optimizer, optimizer_tensors, resume_state, save_training_state
from .checks import check_lockstep_batch
from .config import RecoveryConfig
from .losses import window_objective
from .teacher_cache import TeacherTopK

__all__ = ["DistillRun", "distill", "step_windows", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "distill.safetensors"
#: gradient-norm clip (global L2 norm over the trainable tensors)
MAX_GRAD_NORM = 1.0
#: the cosine decays the learning rate to this fraction of its peak at the last step
MIN_LR_RATE = 0.1


@dataclass
class DistillRun:
    """What one distillation did. ``curve``: ``(step, training tokens so far, seconds so far, held-out LM loss)``
    at each scoring (step 0 = the student as given); ``losses``: ``(step, objective per predicted token)`` of every
    step; ``best_step`` / ``best_val_loss``: the kept state (its weights are in the student on return)."""

    steps: int
    best_step: int
    best_val_loss: float
    curve: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: Optional[int] = None
    #: windows this run passed through the teacher to fill its top-k cache (0 without one, or when reused)
    cached_windows: int = 0


def step_windows(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Indices (into ``n`` training windows) of the global batch of 0-based ``step``: positions
    ``step·batch … step·batch + batch − 1`` of the concatenated seeded permutations (one per pass)."""
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters distillation updates: every parameter inside the decoder layers that requires grad (the
    LoRA adapters when they are on), in a fixed order. Embeddings, final norm and LM head stay as they are."""
    layers = adapter_for(model).decoder_layers(model)
    return [(f"layers.{i}.{n}", p) for i, layer in enumerate(layers) for n, p in layer.named_parameters()
            if p.requires_grad]


def _fingerprint(student, train, val, config: RecoveryConfig, placement: Placement) -> dict:
    opts = as_dict(config)
    for key in ("recover", "recover_val_every", "recover_checkpoint_every"):
        opts.pop(key)  # how often a run scores or saves does not change its steps
    return {"options": opts, "student": model_digest(student), "world": placement.world_size,
            "train": [int(train.shape[0]), int(train.shape[1]), _tensor_digest(train)],
            "val": None if val is None else [int(val.shape[0]), _tensor_digest(val)]}


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def distill(student: nn.Module, teacher: nn.Module, train: torch.Tensor, val: Optional[torch.Tensor],
            config: RecoveryConfig, *, work_dir: Optional[Path] = None, resume: bool = False,
            placement: Optional[Placement] = None, progress: bool = True,
            callback: Optional[Callable[[dict], None]] = None) -> DistillRun:
    """Trains ``student``'s trainable parameters (see :func:`trainable_parameters`; the caller sets requires_grad)
    for ``config.recover_steps`` steps toward ``teacher`` (frozen, run without grad; None: no KL, the LM loss
    alone with ``recover_lm_weight`` > 0, e.g. a dense-model control fine-tuned on the same text) on ``train`` windows
    ``[n, seq_len]`` and returns the run; the student ends holding the weights of the step with the lowest LM loss
    on ``val`` (scored every ``recover_val_every`` steps and at the end; without ``val`` the last step's).

    ``work_dir``: checkpoint folder (``distill.safetensors`` every ``recover_checkpoint_every`` steps, rank 0
    writes, atomically); ``resume`` continues from it exactly: the same windows, optimizer state, schedule and
    RNG, so the losses equal an uninterrupted run's (ValueError when the checkpoint belongs to other options,
    windows, ranks or another student). ``callback`` receives each step's log dict (tests inject interruptions).

    ``recover_teacher_topk`` = k > 0: before the first step the teacher fills a top-k cache
    (:mod:`.teacher_cache`, in ``work_dir``, or a temporary folder removed on return) for every window this rank
    will train on, is then moved to the CPU if it sits on an accelerator (in place), and is not run again; the
    KL is :func:`~.losses.topk_kl_sum`. ValueError with ``recover_hidden_weight`` > 0 (the cache holds logits).

    ``placement``: the student's (data-parallel ranks each hold a whole student; ValueError for a sharded one).
    The teacher may be FSDP-sharded over the same ranks (:mod:`dip_ext.sharding`, for a dense model that does not
    fit one device): its forwards are collectives, so the step's batch must give every rank the same number of
    micro-batches of the same size (ValueError otherwise, before any work; see
    :func:`~dip_ext.recovery.checks.check_lockstep_batch`).
    """
    placement = placement or Placement.of(student)
    if teacher is None and not config.recover_lm_weight > 0:
        raise ValueError("without a teacher the only objective is the LM loss: set recover_lm_weight > 0")
    if placement.sharded:
        raise ValueError("distillation runs data-parallel (a whole student per rank); a sharded (FSDP) student is "
                         "not supported")
    topk = config.recover_teacher_topk if teacher is not None else 0
    if topk and config.recover_hidden_weight > 0:
        raise ValueError("--recover-teacher-topk caches the teacher's logits only: it cannot be combined with the "
                         "hidden-state loss (--recover-hidden-weight > 0)")
    if teacher is not None and dist.is_sharded(teacher):  # its forwards are collectives: ranks run them in step
        check_lockstep_batch(config.recover_batch, config.recover_micro_batch, placement.world_size)
    named = trainable_parameters(student)
    if not named:
        raise ValueError("the student has no trainable parameter in its decoder layers")
    params = [p for _, p in named]
    device = model_device(student)
    steps, batch = config.recover_steps, config.recover_batch
    mb = min(config.recover_micro_batch, batch)
    optimizer = torch.optim.AdamW(params, lr=config.recover_lr, weight_decay=config.recover_weight_decay)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, min(config.recover_warmup, steps),
                                                           max(steps, 1), min_lr_rate=MIN_LR_RATE)
    fingerprint = _fingerprint(student, train, val, config, placement)
    ckpt = Path(work_dir) / CHECKPOINT_NAME if work_dir is not None else None
    run = DistillRun(steps=steps, best_step=0, best_val_loss=math.inf)
    best: Optional[list[torch.Tensor]] = None
    start, seconds0 = 0, 0.0
    loaded = resume_state(ckpt, resume, fingerprint, "a run with other recovery options, windows, ranks or student")
    if loaded is not None:
        meta, tensors = loaded
        start = int(meta["step"])
        if start > steps:
            raise ValueError(f"{ckpt} is at step {start}, beyond recover_steps {steps}")
        with torch.no_grad():
            for name, p in named:
                p.copy_(tensors[f"param.{name}"])
        if meta["has_best"]:
            best = [tensors[f"best.{name}"].to(device) for name, _ in named]
        load_optimizer(optimizer, tensors, meta["groups"])
        with warnings.catch_warnings():  # replaying the schedule's steps, not skipping an optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):
                schedule.step()
        torch.set_rng_state(tensors["rng"])
        run.curve, run.losses = [tuple(c) for c in meta["curve"]], [tuple(x) for x in meta["losses"]]
        run.best_step, run.best_val_loss = int(meta["best_step"]), float(meta["best_val_loss"])
        seconds0, run.resumed_from = float(meta["seconds"]), start

    seq_len = int(train.shape[1])
    tokens_per_step = batch * seq_len
    t0 = time.perf_counter()

    def elapsed() -> float:
        return seconds0 + time.perf_counter() - t0

    def score(step: int) -> None:
        nonlocal best
        if val is None:
            return
        loss = mean_window_loss(student, val)
        run.curve.append((step, step * tokens_per_step, round(elapsed(), 3), loss))
        if loss < run.best_val_loss:
            run.best_step, run.best_val_loss = step, loss
            best = [p.detach().clone() for p in params]

    def save(step: int) -> None:
        if ckpt is None or not placement.is_main:
            return
        tensors, groups = optimizer_tensors(optimizer)
        tensors.update({f"param.{n}": p.detach() for n, p in named})
        if best is not None:
            tensors.update({f"best.{n}": b for (n, _), b in zip(named, best)})
        tensors["rng"] = torch.get_rng_state()
        meta = {"fingerprint": fingerprint, "step": step, "groups": groups, "has_best": best is not None,
                "curve": run.curve, "losses": run.losses, "best_step": run.best_step,
                "best_val_loss": run.best_val_loss if math.isfinite(run.best_val_loss) else None,
                "seconds": elapsed()}
        save_training_state(ckpt, meta, tensors)

    if start == 0 and not run.curve:
        score(0)
    was_training = student.training
    student.train()

    def rank_windows(step: int) -> list[int]:  # this rank's share of the global batch of ``step``
        return step_windows(step, batch, int(train.shape[0]), config.recover_seed)[placement.rank::placement.world_size]

    stack = ExitStack()  # the temporary cache folder, if any, goes on return
    cache: Optional[TeacherTopK] = None
    bar = tqdm(total=steps, initial=start, desc="distill", unit="step", disable=not (progress and placement.is_main))
    try:
        if topk:
            folder = work_dir if work_dir is not None else stack.enter_context(tempfile.TemporaryDirectory())
            cache = TeacherTopK.for_teacher(folder, teacher, train, topk, config.recover_temperature)
            mine = [i for step in range(start, steps) for i in rank_windows(step)]
            run.cached_windows = cache.fill(teacher, mine, micro_batch=mb, progress=progress and placement.is_main)
            if model_device(teacher).type != "cpu" and not dist.is_sharded(teacher):
                teacher.to("cpu")  # training reads the cache; the device keeps room for the student alone
        for step in range(start, steps):
            idx = rank_windows(step)
            parts_sum: dict[str, float] = {}
            total = 0.0
            for k in range(0, len(idx), mb):
                ids = train[idx[k:k + mb]].to(device)
                cached = cache.targets(idx[k:k + mb], device) if cache is not None else None
                total += _micro_step(student, teacher, ids, config, tokens=batch * (seq_len - 1), parts=parts_sum,
                                     cached=cached)
            if placement.world_size > 1:
                dist.all_reduce_sum_([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
                sums = torch.tensor([total], dtype=torch.float64)
                dist.all_reduce_sum_([sums])
                total = float(sums[0])
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss = total / (batch * (seq_len - 1))
            run.losses.append((step + 1, loss))
            entry = {"step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"]}
            bar.set_postfix(loss=f"{loss:.4f}", best=f"{run.best_val_loss:.4f}")
            bar.update(1)
            done = step + 1
            if done == steps or (config.recover_val_every and done % config.recover_val_every == 0):
                score(done)
                student.train()
            if done == steps or (config.recover_checkpoint_every and done % config.recover_checkpoint_every == 0):
                save(done)
            if callback is not None:
                callback(entry)
    finally:
        bar.close()
        student.train(was_training)
        stack.close()
    if best is not None:
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
    run.tokens = steps * tokens_per_step
    run.seconds = elapsed()
    if run.best_step == 0 and not math.isfinite(run.best_val_loss):
        run.best_step = steps
    return run


def _micro_step(student, teacher, ids, config: RecoveryConfig, *, tokens: int, parts: dict, cached=None) -> float:
    """Forward + backward of one micro-batch; the objective is divided by the global predicted-token count
    ``tokens`` before the backward (gradients accumulate in ``.grad``). ``cached``: the teacher's top-k targets of
    these windows, in place of a teacher forward. Returns the micro-batch's summed objective."""
    hidden = config.recover_hidden_weight > 0 and teacher is not None
    t_out = None
    if teacher is not None and cached is None:
        with torch.no_grad():
            t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    autocast = config.recover_autocast and ids.device.type in ("cpu", "cuda")
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        s_out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    total, p = window_objective(s_out, t_out, ids, temperature=config.recover_temperature,
                                lm_weight=config.recover_lm_weight, hidden_weight=config.recover_hidden_weight,
                                teacher_topk=cached)
    (total / tokens).backward()
    for k, v in p.items():
        parts[k] = parts.get(k, 0.0) + v
    return float(total.detach())
