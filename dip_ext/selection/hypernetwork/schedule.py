"""The hypernetwork's learning-rate schedules, and which checkpoints a schedule may continue.

``constant`` (the paper's); ``cosine``: a half cosine from ``lr`` at step 0 down to 0 at ``steps``;
``cosine-tail``: ``lr`` until the last ``decay_steps`` steps, then a half cosine down to 0 over them (a constant
run can be extended and annealed). A checkpoint written at step ``t`` resumes under any schedule that gives the
same learning rate at every step ``0 .. t-1`` it has already taken (:func:`first_lr_difference`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["LR_SCHEDULES", "LrSchedule", "scheduled_lr", "check_lr_schedule", "first_lr_difference"]

LR_SCHEDULES = ("constant", "cosine", "cosine-tail")


def check_lr_schedule(lr_schedule: str, decay_steps: Optional[int], steps) -> None:
    """Raises ValueError for an unknown schedule or a ``decay_steps`` that does not fit it (and ``steps``)."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if lr_schedule == "cosine-tail":
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
            raise ValueError(f"lr_schedule 'cosine-tail' needs decay_steps, an integer >= 1, got {decay_steps!r}")
        if isinstance(steps, int) and decay_steps > steps:
            raise ValueError(f"decay_steps ({decay_steps}) must not exceed steps ({steps})")
    elif decay_steps is not None:
        raise ValueError(f"decay_steps is only for lr_schedule 'cosine-tail', not {lr_schedule!r}")


def scheduled_lr(lr: float, schedule: str, step: int, steps: Optional[int], decay_steps: Optional[int] = None) -> float:
    """The learning rate of (0-based) ``step`` of a run of ``steps`` under ``schedule`` with base rate ``lr``.

    Checked: ValueError for an unknown schedule, or a decaying one without its lengths.
    """
    if schedule == "constant":
        return lr
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"lr_schedule {schedule!r} needs steps, an integer >= 1, got {steps!r}")
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    if schedule == "cosine-tail":
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
            raise ValueError(f"lr_schedule 'cosine-tail' needs decay_steps, an integer >= 1, got {decay_steps!r}")
        into = step - (steps - decay_steps)
        return lr if into < 0 else lr * 0.5 * (1.0 + math.cos(math.pi * into / decay_steps))
    raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


@dataclass(frozen=True)
class LrSchedule:
    """One run's schedule. ``steps`` is the run's length, recorded only for a decaying schedule (None for
    ``constant``, whose rates do not depend on it); ``decay_steps`` only for ``cosine-tail``."""

    lr: float
    lr_schedule: str = "constant"
    steps: Optional[int] = None
    decay_steps: Optional[int] = None

    @classmethod
    def of(cls, lr: float, lr_schedule: str, steps: int, decay_steps: Optional[int]) -> "LrSchedule":
        """The schedule of a run of ``steps`` steps (validated by :func:`check_lr_schedule`)."""
        check_lr_schedule(lr_schedule, decay_steps, steps)
        return cls(float(lr), lr_schedule, None if lr_schedule == "constant" else int(steps),
                   int(decay_steps) if lr_schedule == "cosine-tail" else None)

    def at(self, step: int) -> float:
        """The learning rate of (0-based) ``step``."""
        return scheduled_lr(self.lr, self.lr_schedule, step, self.steps, self.decay_steps)

    def record(self) -> dict:
        """As stored in a checkpoint's fingerprint."""
        return {"lr": self.lr, "lr_schedule": self.lr_schedule, "schedule_steps": self.steps,
                "decay_steps": self.decay_steps}

    @classmethod
    def from_record(cls, record: dict) -> "LrSchedule":
        """The inverse of :meth:`record`; ValueError naming the field for a malformed record."""
        try:
            out = cls(float(record["lr"]), str(record["lr_schedule"]), record["schedule_steps"], record["decay_steps"])
            for t in range(2):
                out.at(t)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed learning-rate schedule {record!r} ({e})") from None
        return out


def first_lr_difference(saved: LrSchedule, now: LrSchedule, start: int) -> Optional[int]:
    """The first step below ``start`` whose learning rate differs between two schedules (None: they agree)."""
    return next((s for s in range(start) if saved.at(s) != now.at(s)), None)
