"""The recovery stage: after compaction, train the pruned model back toward the dense one (see DESIGN.md §5).

:func:`recover` is what ``Pruner.recover()`` and ``dip-ext recover`` call.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from ..distributed import Placement, is_sharded
from ..eval import mean_window_loss
from ..families import adapter_for
from ..model_state import frozen
from ..options import as_dict
from .checks import check_pair, check_sharded_teacher, check_training_windows
from .config import RecoveryConfig
from .distill import distill
from .lora import lora_wrapped
from .reconstruct import reconstruct
from .result import RecoveryResult

__all__ = ["recover"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _decoder_state(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for layer in adapter_for(model).decoder_layers(model) for p in layer.parameters()]


def _load_decoder_state(model: nn.Module, state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        params = [p for layer in adapter_for(model).decoder_layers(model) for p in layer.parameters()]
        for p, s in zip(params, state):
            p.copy_(s)


@contextmanager
def _trainable(student: nn.Module, config: RecoveryConfig) -> Iterator[nn.Module]:
    """``student`` with exactly the parameters distillation trains requiring grad (every decoder-layer parameter,
    or LoRA adapters merged back on exit); every flag restored on exit."""
    flags = [(p, p.requires_grad) for p in student.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if config.recover_lora_rank > 0:
            with lora_wrapped(student, config.recover_lora_rank, config.lora_alpha, config.recover_seed):
                yield student
        else:
            for layer in adapter_for(student).decoder_layers(student):
                for p in layer.parameters():
                    p.requires_grad_(True)
            yield student
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


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
            forbidden_windows: Optional[torch.Tensor] = None, callback=None) -> RecoveryResult:
    """Trains the compacted ``student`` (in place) back toward the dense ``teacher`` and returns what it did.

    ``train_windows`` ``[n, seq_len]`` int64: the calibration text's training windows (never evaluation text);
    ``val_windows`` ``[m, seq_len]`` or None: held-out windows for early stopping and for ``auto``'s choice.
    ``config.recover``: ``off`` (returns at once), ``reconstruct`` (:mod:`.reconstruct`), ``distill``
    (:mod:`.distill`; LoRA with ``recover_lora_rank`` > 0, merged back), ``auto`` (reconstruction kept only when it
    lowers the held-out loss, then distillation from there; the best held-out state is kept). The teacher runs
    frozen, without grad (cast in place to ``recover_teacher_dtype``: pass a copy you do not need in another dtype).
    ``work_dir``: checkpoints (``reconstruct.safetensors``, ``distill.safetensors``); ``resume`` continues from them
    exactly. ``placement``: data-parallel ranks (each holds the whole student; rank 0 writes). ``forbidden_windows``:
    evaluation windows that must not occur among the training windows. ``callback``: each distillation step's log.
    The teacher may be FSDP-sharded over the ranks (:mod:`dip_ext.sharding`; every rank calls this in step):
    ``distill`` only, in the dtype it was sharded in, with a batch every rank splits alike
    (:func:`~dip_ext.recovery.checks.check_sharded_teacher`).

    ValueError for: a student that is not compacted, a teacher of another family / widths / vocabulary, empty or
    malformed windows, evaluation windows among the training windows, ``auto`` without held-out windows, a sharded
    (FSDP) student, options a sharded teacher cannot run, a checkpoint of another run on resume.
    """
    if not isinstance(config, RecoveryConfig):
        raise ValueError(f"config must be a RecoveryConfig, got {type(config).__name__}")
    result = RecoveryResult(mode=config.recover, options=as_dict(config))
    if config.recover == "off":
        return result
    check_pair(student, teacher)
    train = check_training_windows(train_windows, "recovery training windows", student.config,
                                   forbidden=forbidden_windows)
    val = None
    if val_windows is not None:
        val = check_training_windows(val_windows, "recovery held-out windows", student.config)
    if config.recover == "auto" and val is None:
        raise ValueError("recover 'auto' chooses on held-out windows: pass val_windows (the pipeline's "
                         "--val-windows > 0), or choose --recover reconstruct or distill")
    placement = placement or Placement.of(student)
    if is_sharded(teacher):
        check_sharded_teacher(config, placement.world_size)
    work = Path(work_dir) if work_dir is not None else None
    if work is not None and placement.is_main:
        work.mkdir(parents=True, exist_ok=True)
    if config.recover_teacher_dtype != "same":
        teacher.to(_DTYPES[config.recover_teacher_dtype])
    t_start = time.perf_counter()

    def score() -> Optional[float]:
        return mean_window_loss(student, val) if val is not None else None

    def point(stage: str, step: int, loss: Optional[float]) -> None:
        if loss is not None:
            result.curve.append({"stage": stage, "step": step, "tokens": result.tokens,
                                 "seconds": round(time.perf_counter() - t_start, 3), "val_loss": loss})

    with frozen(teacher):
        start_loss = score()
        result.val_loss_before = start_loss
        point("start", 0, start_loss)
        current = start_loss
        if config.recover in ("reconstruct", "auto"):
            saved = _decoder_state(student) if config.recover == "auto" else None
            t0 = time.perf_counter()
            rec = reconstruct(student, teacher, train, config, work_dir=work, resume=resume, progress=progress,
                              main=placement.is_main)
            result.seconds["reconstruct"] = time.perf_counter() - t0
            result.tokens += rec.tokens
            result.resumed |= rec.resumed_from is not None
            loss = score()
            point("reconstruct", 0, loss)
            result.reconstruction = {"windows": rec.windows, "tokens": rec.tokens, "error_before": rec.error_before,
                                     "error_after": rec.error_after, "val_loss": loss, "kept": True}
            if saved is not None and loss is not None and current is not None and not loss < current:
                _load_decoder_state(student, saved)  # auto: reconstruction did not help on held-out windows
                result.reconstruction["kept"] = False
            else:
                result.chosen.append("reconstruct")
                current = loss
        if config.recover in ("distill", "auto") and config.recover_steps > 0:
            t0 = time.perf_counter()
            base_tokens = result.tokens
            with _trainable(student, config), _grad_checkpointing(student, config.recover_grad_checkpointing):
                run = distill(student, teacher, train, val, config, work_dir=work, resume=resume,
                              placement=placement, progress=progress, callback=callback)
            result.seconds["distill"] = time.perf_counter() - t0
            result.resumed |= run.resumed_from is not None
            for step, tokens, seconds, loss in run.curve:
                if step == 0:  # the start of the distillation is already on the curve
                    continue
                result.curve.append({"stage": "distill", "step": step, "tokens": base_tokens + tokens,
                                     "seconds": round(result.seconds.get("reconstruct", 0.0) + seconds, 3),
                                     "val_loss": loss})
            result.tokens = base_tokens + run.tokens
            result.distillation = {"steps": run.steps, "best_step": run.best_step,
                                   "best_val_loss": run.best_val_loss if math.isfinite(run.best_val_loss) else None,
                                   "losses": run.losses, "lora_rank": config.recover_lora_rank,
                                   "teacher_topk": config.recover_teacher_topk,
                                   "teacher_cached_windows": run.cached_windows}
            if run.best_step > 0:
                result.chosen.append("distill")
                current = run.best_val_loss
    result.val_loss_after = current
    return result
