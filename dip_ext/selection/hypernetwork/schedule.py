"""The hypernetwork's learning-rate schedules, and which checkpoints a schedule may continue.

``constant`` (the paper's); ``cosine``: a half cosine from ``lr`` at step 0 down to 0 at ``steps``;
``cosine-tail``: ``lr`` until the last ``decay_steps`` steps, then a half cosine down to 0 over them (a constant
run can be extended and annealed). A checkpoint written at step ``t`` resumes under any schedule that gives the
same learning rate at every step ``0 .. t-1`` it has already taken (:func:`first_lr_difference`).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal, Optional

from ...options import check_fields, option

__all__ = ["LR_SCHEDULES", "LrSchedule", "scheduled_lr", "check_lr_schedule", "first_lr_difference"]

ScheduleName = Literal["constant", "cosine", "cosine-tail"]
LR_SCHEDULES = typing.get_args(ScheduleName)


def check_lr_schedule(lr_schedule: str, decay_steps: Optional[int], steps) -> None:
    """Raises ValueError for an unknown schedule or a ``decay_steps`` that does not fit it (and ``steps``).
    The values' own types and ranges are the options' (:func:`dip_ext.options.check_fields`)."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if lr_schedule == "cosine-tail":
        if decay_steps is None:
            raise ValueError("lr_schedule 'cosine-tail' needs decay_steps, an integer >= 1, got None")
        if isinstance(steps, int) and decay_steps > steps:
            raise ValueError(f"decay_steps ({decay_steps}) must not exceed steps ({steps})")
    elif decay_steps is not None:
        raise ValueError(f"decay_steps is only for lr_schedule 'cosine-tail', not {lr_schedule!r}")


@dataclass(frozen=True)
class LrSchedule:
    """One run's schedule, validated on construction (ValueError naming the field). ``steps`` is the run's
    length, recorded only for a decaying schedule (None for ``constant``, whose rates do not depend on it; 0 for
    a run that takes no step and so never asks for a rate); ``decay_steps`` only for ``cosine-tail``."""

    lr: float = option(help="the base learning rate")
    lr_schedule: ScheduleName = option("constant", "the schedule's shape")
    steps: Optional[int] = option(None, "the run's length (decaying schedules)", minimum=0)
    decay_steps: Optional[int] = option(None, "the length of the cosine-tail decay", minimum=1)

    def __post_init__(self):
        check_fields(self)
        check_lr_schedule(self.lr_schedule, self.decay_steps, self.steps)
        if self.lr_schedule != "constant" and self.steps is None:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} needs steps, an integer >= 1, got None")

    @classmethod
    def of(cls, lr: float, lr_schedule: str, steps: int, decay_steps: Optional[int]) -> "LrSchedule":
        """The schedule of a run of ``steps`` steps."""
        return cls(lr, lr_schedule, None if lr_schedule == "constant" else steps,
                   decay_steps if lr_schedule == "cosine-tail" else None)

    def at(self, step: int) -> float:
        """The learning rate of (0-based) ``step``, ``0 <= step < steps``."""
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        into = step - (self.steps - self.decay_steps)
        return self.lr if into < 0 else self.lr * 0.5 * (1.0 + math.cos(math.pi * into / self.decay_steps))

    def record(self) -> dict:
        """As stored in a checkpoint's fingerprint."""
        return {"lr": self.lr, "lr_schedule": self.lr_schedule, "schedule_steps": self.steps,
                "decay_steps": self.decay_steps}

    @classmethod
    def from_record(cls, record: dict) -> "LrSchedule":
        """The inverse of :meth:`record`; ValueError naming the field for a malformed record."""
        try:
            return cls(record["lr"], record["lr_schedule"], record["schedule_steps"], record["decay_steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed learning-rate schedule {record!r} ({e})") from None


def scheduled_lr(lr: float, schedule: str, step: int, steps: Optional[int], decay_steps: Optional[int] = None) -> float:
    """The learning rate of (0-based) ``step`` of a run of ``steps`` under ``schedule`` with base rate ``lr``.

    Checked: ValueError for an unknown schedule, or a decaying one without its lengths.
    """
    return LrSchedule.of(lr, schedule, steps, decay_steps).at(step)


def first_lr_difference(saved: LrSchedule, now: LrSchedule, start: int) -> Optional[int]:
    """The first step below ``start`` whose learning rate differs between two schedules (None: they agree)."""
    return next((s for s in range(start) if saved.at(s) != now.at(s)), None)
