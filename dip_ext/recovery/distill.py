"""Distillation of a compacted student from its dense teacher: AdamW, warm-up + cosine, accumulation, early stopping
on held-out windows, exact resume, data-parallel ranks.

Each optimizer step takes ``recover_batch`` training windows in a seeded order (:class:`dip_ext.training.EpochOrder`:
a fresh permutation per pass over the windows, a function of seed and pass only), so the windows of step s never
depend on how the run got there: a resumed run, or N ranks each taking every N-th window of the step's batch, see
exactly the windows of an uninterrupted one-process run. The objective (:mod:`.losses`) is summed over the step's
predicted tokens on every rank, divided by the global count, gradients are summed over ranks, clipped to norm 1
and applied identically on every rank, so all ranks hold the same weights.
"""

from __future__ import annotations

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
from ..model_state import model_device
from ..training import BestState, EpochOrder, copy_into, load_optimizer_state, optimizer_state, snapshot
from .checkpoint import DISTILL_FORMAT, LABELS, distill_fingerprint
from .checks import check_lockstep_batch
from .config import RecoveryConfig
from .losses import window_objective
from .teacher_cache import TeacherTopK

__all__ = ["DistillRun", "distill", "decoder_parameters", "trainable_parameters", "micro_step", "CHECKPOINT_NAME"]

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


def decoder_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter inside ``model``'s decoder layers as ``(layers.<i>.<name>, parameter)``, in a fixed order:
    what recovery may train (embeddings, final norm and LM head stay as they are)."""
    layers = adapter_for(model).decoder_layers(model)
    return [(f"layers.{i}.{n}", p) for i, layer in enumerate(layers) for n, p in layer.named_parameters()]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters distillation updates: the :func:`decoder_parameters` that require grad (the LoRA adapters
    when they are on)."""
    return [(name, p) for name, p in decoder_parameters(model) if p.requires_grad]


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
    RNG, so the losses equal an uninterrupted run's (ValueError naming each difference when the checkpoint
    belongs to other options, windows, ranks or another student). ``callback`` receives each step's log dict
    (tests inject interruptions).

    ``recover_teacher_topk`` = k > 0: before the first step the teacher fills a top-k cache
    (:mod:`.teacher_cache`, in ``work_dir``, or a temporary folder removed on return) for every window this rank
    will train on, is then moved to the CPU if it sits on an accelerator (in place), and is not run again; the
    KL is :func:`~.losses.topk_kl_sum`. ValueError with ``recover_hidden_weight`` > 0 (the cache holds logits).

    ``placement``: the student's (data-parallel ranks each hold a whole student; ValueError for a sharded one).
    The teacher may be FSDP-sharded over the same ranks (:mod:`dip_ext.sharding`, for a dense model that does not
    fit one device): its forwards are collectives, so the step's batch must give every rank the same number of
    micro-batches of the same size (ValueError otherwise, before any work; see
    :func:`~dip_ext.recovery.checks.check_lockstep_batch`).
    Automatic options are resolved first (:meth:`RecoveryConfig.resolved`; e.g. ``recover_autocast=None``: bf16
    where the student's device computes in it natively).
    """
    placement = placement or Placement.of(student)
    sharded = teacher is not None and dist.is_sharded(teacher)
    config = config.resolved(next(student.parameters()).device, tokenizer=False, sharded_teacher=sharded)
    _check_setup(teacher, config, placement)
    loop = _Distillation(student, teacher, train, val, config, work_dir, placement)
    if resume and loop.path is not None:
        loop.resume()
    if loop.start == 0 and not loop.run.curve:
        loop.score(0)
    was_training = student.training
    student.train()
    stack = ExitStack()  # the temporary cache folder, if any, goes on return
    bar = tqdm(total=loop.steps, initial=loop.start, desc="distill", unit="step",
               disable=not (progress and placement.is_main))
    try:
        loop.fill_cache(stack, progress and placement.is_main)
        for step in range(loop.start, loop.steps):
            loss = loop.step(step)
            entry = {"step": step + 1, "loss": loss, "lr": loop.optimizer.param_groups[0]["lr"]}
            bar.set_postfix(loss=f"{loss:.4f}", best=f"{loop.best.loss:.4f}")
            bar.update(1)
            loop.score_and_save(step + 1)
            if callback is not None:
                callback(entry)
    finally:
        bar.close()
        student.train(was_training)
        stack.close()
    return loop.finish()


def _check_setup(teacher: Optional[nn.Module], config: RecoveryConfig, placement: Placement) -> None:
    """ValueError for what :func:`distill` cannot run, before any work."""
    if teacher is None and not config.recover_lm_weight > 0:
        raise ValueError("without a teacher the only objective is the LM loss: set recover_lm_weight > 0")
    if placement.sharded:
        raise ValueError("distillation runs data-parallel (a whole student per rank); a sharded (FSDP) student is "
                         "not supported")
    if teacher is not None and config.recover_teacher_topk and config.recover_hidden_weight > 0:
        raise ValueError("--recover-teacher-topk caches the teacher's logits only: it cannot be combined with the "
                         "hidden-state loss (--recover-hidden-weight > 0)")
    if teacher is not None and dist.is_sharded(teacher):  # its forwards are collectives: ranks run them in step
        check_lockstep_batch(config.recover_batch, config.recover_micro_batch, placement.world_size)


class _Distillation:
    """One distillation run's state between steps: optimizer, schedule, window order, best state, checkpoint."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], train: torch.Tensor,
                 val: Optional[torch.Tensor], config: RecoveryConfig, work_dir: Optional[Path],
                 placement: Placement):
        self.named = trainable_parameters(student)
        if not self.named:
            raise ValueError("the student has no trainable parameter in its decoder layers")
        self.student, self.teacher, self.train, self.val, self.config = student, teacher, train, val, config
        self.work_dir, self.placement, self.device = work_dir, placement, model_device(student)
        self.params = [p for _, p in self.named]
        self.steps = config.recover_steps
        self.micro_batch = min(config.recover_micro_batch, config.recover_batch)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.recover_lr,
                                           weight_decay=config.recover_weight_decay)
        self.schedule = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, min(config.recover_warmup, self.steps), max(self.steps, 1), min_lr_rate=MIN_LR_RATE)
        self.order = EpochOrder(int(train.shape[0]), config.recover_batch, config.recover_seed)
        self.tokens_per_step = config.recover_batch * int(train.shape[1])
        self.fingerprint = distill_fingerprint(student, train, val, config, placement)
        self.path = Path(work_dir) / CHECKPOINT_NAME if work_dir is not None else None
        self.run = DistillRun(steps=self.steps, best_step=0, best_val_loss=math.inf)
        self.best = BestState()
        self.cache: Optional[TeacherTopK] = None
        self.start, self.seconds0, self.t0 = 0, 0.0, time.perf_counter()

    def elapsed(self) -> float:
        return self.seconds0 + time.perf_counter() - self.t0

    def windows(self, step: int) -> list[int]:
        """This rank's share of the global batch of (0-based) ``step``."""
        return self.order.share(step, self.placement.rank, self.placement.world_size)

    def resume(self) -> None:
        """Continues from the checkpoint, if there is one: weights, best state, optimizer, schedule and RNG as
        they were after its step. ValueError for another run's checkpoint or one beyond ``recover_steps``."""
        loaded = DISTILL_FORMAT.load_matching(self.path, self.fingerprint, labels=LABELS)
        if loaded is None:
            return
        tensors, meta = loaded
        start = int(meta["step"])
        if start > self.steps:
            raise ValueError(f"{self.path} is at step {start}, beyond recover_steps {self.steps}")
        copy_into(self.named, tensors, prefix="param.")
        self.best = BestState.from_checkpoint(tensors, meta)
        load_optimizer_state(self.optimizer, tensors, meta["groups"])
        with warnings.catch_warnings():  # replaying the schedule's steps, not skipping an optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):
                self.schedule.step()
        torch.set_rng_state(tensors["rng"])
        self.run.curve, self.run.losses = [tuple(c) for c in meta["curve"]], [tuple(x) for x in meta["losses"]]
        self.start, self.seconds0, self.run.resumed_from = start, float(meta["seconds"]), start
        self.t0 = time.perf_counter()  # the seconds go on from the checkpoint's

    def save(self, step: int) -> None:
        """Writes the checkpoint after ``step`` (rank 0; nothing without a work folder)."""
        if self.path is None or not self.placement.is_main:
            return
        tensors, groups = optimizer_state(self.optimizer)
        tensors.update({f"param.{n}": p for n, p in self.named})
        tensors.update(self.best.tensors())
        tensors["rng"] = torch.get_rng_state()
        DISTILL_FORMAT.write(self.path, tensors, {
            "fingerprint": self.fingerprint, "step": step, "groups": groups, "curve": self.run.curve,
            "losses": self.run.losses, "seconds": self.elapsed(), **self.best.meta()})

    def score(self, step: int) -> None:
        """The held-out LM loss after ``step`` on the curve, the weights kept when it is the best so far."""
        if self.val is None:
            return
        loss = mean_window_loss(self.student, self.val)
        self.run.curve.append((step, step * self.tokens_per_step, round(self.elapsed(), 3), loss))
        self.best.offer(step, loss, lambda: snapshot(self.named))

    def score_and_save(self, done: int) -> None:
        """After step ``done`` (1-based): scoring and the checkpoint when they are due (always after the last)."""
        last, cfg = done == self.steps, self.config
        if last or (cfg.recover_val_every and done % cfg.recover_val_every == 0):
            self.score(done)
            self.student.train()
        if last or (cfg.recover_checkpoint_every and done % cfg.recover_checkpoint_every == 0):
            self.save(done)

    def fill_cache(self, stack: ExitStack, progress: bool) -> None:
        """With ``recover_teacher_topk``: the teacher's top-k of every window this rank trains on from here (in
        the work folder, or a temporary one ``stack`` removes), then the teacher off an accelerator."""
        topk = self.config.recover_teacher_topk if self.teacher is not None else 0
        if not topk:
            return
        folder = self.work_dir if self.work_dir is not None else stack.enter_context(tempfile.TemporaryDirectory())
        self.cache = TeacherTopK.for_teacher(folder, self.teacher, self.train, topk, self.config.recover_temperature)
        mine = [i for step in range(self.start, self.steps) for i in self.windows(step)]
        self.run.cached_windows = self.cache.fill(self.teacher, mine, micro_batch=self.micro_batch, progress=progress)
        if model_device(self.teacher).type != "cpu" and not dist.is_sharded(self.teacher):
            self.teacher.to("cpu")  # training reads the cache; the device keeps room for the student alone

    def step(self, step: int) -> float:
        """Optimizer step ``step`` (0-based): this rank's micro-batches, gradients summed over ranks, clipped and
        applied identically everywhere. Returns the step's objective per predicted token (global)."""
        idx, mb = self.windows(step), self.micro_batch
        tokens = self.config.recover_batch * (int(self.train.shape[1]) - 1)
        total, parts = 0.0, {}
        for k in range(0, len(idx), mb):
            ids = self.train[idx[k:k + mb]].to(self.device)
            cached = self.cache.targets(idx[k:k + mb], self.device) if self.cache is not None else None
            total += micro_step(self.student, self.teacher, ids, self.config, tokens=tokens, parts=parts,
                                 cached=cached)
        if self.placement.world_size > 1:
            dist.all_reduce_sum_([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
            sums = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce_sum_([sums])
            total = float(sums[0])
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = total / tokens
        self.run.losses.append((step + 1, loss))
        return loss

    def finish(self) -> DistillRun:
        """The run's record, the student holding the best state's weights (the last step's without scoring)."""
        if self.best.state is not None:
            copy_into(self.named, self.best.state)
        run = self.run
        run.best_step = self.best.step if self.best.step is not None else self.steps
        run.best_val_loss = self.best.loss
        run.tokens = self.steps * self.tokens_per_step
        run.seconds = self.elapsed()
        return run


def micro_step(student, teacher, ids, config: RecoveryConfig, *, tokens: int, parts: dict, cached=None) -> float:
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
