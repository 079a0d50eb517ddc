"""The recovery stage: after compaction, train the pruned model back toward the dense one (see DESIGN.md §5).

:func:`recover` is what ``Pruner.recover()`` and ``dip-ext recover`` call.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..distributed import Placement, is_sharded
from ..eval import mean_window_loss
from ..model_state import frozen
from ..options import as_dict
from ..training import BestState, copy_into, requires_grad_only, snapshot
from ..zoo import as_dtype
from .checks import check_pair, check_sharded_teacher, check_training_windows
from .config import RecoveryConfig
from .distill import decoder_parameters, distill
from .lora import lora_wrapped
from .reconstruct import reconstruct
from .result import RecoveryResult
from .self_text import recovery_data_windows

__all__ = ["recover", "trainable_student"]


@contextmanager
def trainable_student(student: nn.Module, config: RecoveryConfig) -> Iterator[nn.Module]:
    """``student`` with exactly the parameters distillation trains requiring grad (every decoder-layer parameter,
    or LoRA adapters merged back on exit); every flag restored on exit."""
    if config.recover_lora_rank > 0:
        with requires_grad_only(student), lora_wrapped(student, config.recover_lora_rank, config.lora_alpha,
                                                       config.recover_seed):
            yield student
    else:
        with requires_grad_only(student, (p for _, p in decoder_parameters(student))):
            yield student


@contextmanager
def _grad_checkpointing(student: nn.Module, on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        student.gradient_checkpointing_disable()


def recover(student: nn.Module, teacher: nn.Module, train_windows: torch.Tensor,
            val_windows: Optional[torch.Tensor], config: RecoveryConfig, *, work_dir=None, resume: bool = False,
            placement: Optional[Placement] = None, progress: bool = True,
            forbidden_windows: Optional[torch.Tensor] = None, callback=None, tokenizer=None,
            data_cache=None) -> RecoveryResult:
    """Trains the compacted ``student`` (in place) back toward the dense ``teacher`` and returns what it did.

    ``train_windows`` ``[n, seq_len]`` int64: the calibration text's training windows (never evaluation text);
    under ``config.recover_data`` ``self`` / ``mix`` they prompt the text the teacher writes itself
    (:mod:`dip_ext.recovery.self_text`, with ``tokenizer``; cached in ``data_cache``, default ``work_dir``, and
    reused by later runs);
    ``val_windows`` ``[m, seq_len]`` or None: held-out windows for early stopping and for ``auto``'s choice.
    ``config.recover``: ``off`` (returns at once), ``reconstruct`` (:mod:`.reconstruct`), ``distill``
    (:mod:`.distill`; LoRA with ``recover_lora_rank`` > 0, merged back), ``auto`` (reconstruction kept only when it
    lowers the held-out loss, then distillation from there; the best held-out state is kept). The teacher runs
    frozen, without grad (cast in place to ``recover_teacher_dtype``: pass a copy you do not need in another dtype).
    The options' automatic choices are made first (:meth:`RecoveryConfig.resolved`); ``result.options`` records
    what ran.
    ``work_dir``: checkpoints (``reconstruct.safetensors``, ``distill.safetensors``); ``resume`` continues from them
    exactly. ``placement``: data-parallel ranks (each holds the whole student; rank 0 writes). ``forbidden_windows``:
    evaluation windows that must not occur among the training windows. ``callback``: each distillation step's log.
    ``result.data`` records the windows trained on and what generating them cost.
    The teacher may be FSDP-sharded over the ranks (:mod:`dip_ext.sharding`; every rank calls this in step):
    ``distill`` only, in the dtype it was sharded in, with a batch every rank splits alike
    (:func:`~dip_ext.recovery.checks.check_sharded_teacher`).

    ValueError for: ``self`` / ``mix`` without a tokenizer, a student that is not compacted, a teacher of another family / widths / vocabulary, empty or
    malformed windows, evaluation windows among the training windows, ``auto`` without held-out windows, a sharded
    (FSDP) student, options a sharded teacher cannot run, a checkpoint of another run on resume.
    """
    if not isinstance(config, RecoveryConfig):
        raise ValueError(f"config must be a RecoveryConfig, got {type(config).__name__}")
    device = next(student.parameters()).device
    config = config.resolved(device, tokenizer=tokenizer is not None, sharded_teacher=is_sharded(teacher))
    result = RecoveryResult(mode=config.recover, options=as_dict(config))
    if config.recover == "off":
        return result
    if config.recover_data != "text" and tokenizer is None:
        raise ValueError(f"recover_data {config.recover_data!r} has the teacher write its own training text, which "
                         "needs its tokenizer: pass tokenizer=... (or use recover_data='text')")
    train, val, placement = _checked(student, teacher, train_windows, val_windows, config, placement,
                                     forbidden_windows)
    work = Path(work_dir) if work_dir is not None else None
    if work is not None and placement.is_main:
        work.mkdir(parents=True, exist_ok=True)
    if config.recover_teacher_dtype != "same":
        teacher.to(as_dtype(config.recover_teacher_dtype))
    t0 = time.perf_counter()
    cache = data_cache if data_cache is not None else work
    train, result.data = recovery_data_windows(teacher, tokenizer, train, config, work_dir=cache,
                                               progress=progress)
    if config.recover_data != "text":
        result.seconds["generate"] = time.perf_counter() - t0
    stages = _Stages(student, teacher, train, val, config, result, work=work, resume=resume, placement=placement,
                     progress=progress, callback=callback)
    with frozen(teacher):
        current = result.val_loss_before = stages.score()
        stages.point("start", 0, current)
        if config.recover in ("reconstruct", "auto"):
            current = stages.reconstruction(current)
        if config.recover in ("distill", "auto") and config.recover_steps > 0:
            current = stages.distillation(current)
    result.val_loss_after = current
    return result


def _checked(student, teacher, train_windows, val_windows, config: RecoveryConfig, placement: Optional[Placement],
             forbidden) -> tuple[torch.Tensor, Optional[torch.Tensor], Placement]:
    """The training and held-out windows and the placement, once every input is checked (see :func:`recover`)."""
    check_pair(student, teacher)
    train = check_training_windows(train_windows, "recovery training windows", student.config, forbidden=forbidden)
    val = None
    if val_windows is not None:
        val = check_training_windows(val_windows, "recovery held-out windows", student.config)
    if config.recover == "auto" and val is None:
        raise ValueError("recover 'auto' chooses on held-out windows: pass val_windows (the pipeline's "
                         "--val-windows > 0), or choose --recover reconstruct or distill")
    placement = placement or Placement.of(student)
    if is_sharded(teacher):
        check_sharded_teacher(config, placement.world_size)
    return train, val, placement


class _Stages:
    """One recovery run between its stages: the models, windows and options, the result being filled, its clock."""

    def __init__(self, student: nn.Module, teacher: nn.Module, train: torch.Tensor, val: Optional[torch.Tensor],
                 config: RecoveryConfig, result: RecoveryResult, *, work: Optional[Path], resume: bool,
                 placement: Placement, progress: bool, callback: Optional[Callable[[dict], None]]):
        self.student, self.teacher, self.train, self.val, self.config = student, teacher, train, val, config
        self.result, self.work, self.resume, self.placement = result, work, resume, placement
        self.progress, self.callback = progress, callback
        self.t_start = time.perf_counter()

    def score(self) -> Optional[float]:
        """The student's held-out LM loss now (None without held-out windows)."""
        return mean_window_loss(self.student, self.val) if self.val is not None else None

    def point(self, stage: str, step: int, loss: Optional[float]) -> None:
        if loss is not None:
            self.result.curve.append({"stage": stage, "step": step, "tokens": self.result.tokens,
                                      "seconds": round(time.perf_counter() - self.t_start, 3), "val_loss": loss})

    def reconstruction(self, current: Optional[float]) -> Optional[float]:
        """Block-wise reconstruction from held-out loss ``current``; under ``auto`` its weights are kept only when
        they lower the held-out loss (else the weights before it come back). Returns the held-out loss after."""
        result, auto = self.result, self.config.recover == "auto"
        before = BestState()
        if auto:
            before.offer(0, current, lambda: snapshot(decoder_parameters(self.student)))
        t0 = time.perf_counter()
        rec = reconstruct(self.student, self.teacher, self.train, self.config, work_dir=self.work,
                          resume=self.resume, progress=self.progress, main=self.placement.is_main)
        result.seconds["reconstruct"] = time.perf_counter() - t0
        result.tokens += rec.tokens
        result.resumed |= rec.resumed_from is not None
        loss = self.score()
        self.point("reconstruct", 0, loss)
        if auto and loss is not None:
            before.offer(1, loss)
        kept = before.step != 0  # under auto, step 0 (the weights before reconstruction) may stay the best
        result.reconstruction = {"windows": rec.windows, "tokens": rec.tokens, "error_before": rec.error_before,
                                 "error_after": rec.error_after, "val_loss": loss, "kept": kept}
        if not kept:  # auto: reconstruction did not help on the held-out windows
            copy_into(decoder_parameters(self.student), before.state)
            return current
        result.chosen.append("reconstruct")
        return loss

    def distillation(self, current: Optional[float]) -> Optional[float]:
        """Distillation (LoRA when asked) from the student as it is; kept when a step beat the start on the
        held-out windows (its best state is then in the student). Returns the held-out loss after."""
        result, cfg = self.result, self.config
        t0, base_tokens = time.perf_counter(), result.tokens
        with trainable_student(self.student, cfg), _grad_checkpointing(self.student, cfg.recover_grad_checkpointing):
            run = distill(self.student, self.teacher, self.train, self.val, cfg, work_dir=self.work,
                          resume=self.resume, placement=self.placement, progress=self.progress,
                          callback=self.callback)
        result.seconds["distill"] = time.perf_counter() - t0
        result.resumed |= run.resumed_from is not None
        offset = result.seconds.get("reconstruct", 0.0)
        result.curve.extend({"stage": "distill", "step": step, "tokens": base_tokens + tokens,
                             "seconds": round(offset + seconds, 3), "val_loss": loss}
                            for step, tokens, seconds, loss in run.curve
                            if step != 0)  # the start of the distillation is already on the curve
        result.tokens = base_tokens + run.tokens
        result.distillation = {"steps": run.steps, "best_step": run.best_step,
                               "best_val_loss": run.best_val_loss if math.isfinite(run.best_val_loss) else None,
                               "losses": run.losses, "lora_rank": cfg.recover_lora_rank,
                               "teacher_topk": cfg.recover_teacher_topk, "teacher_cached_windows": run.cached_windows}
        if run.best_step > 0:
            result.chosen.append("distill")
            return run.best_val_loss
        return current
