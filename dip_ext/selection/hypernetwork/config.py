"""The hypernetwork's options, declared once (fields with default, help and range: :func:`dip_ext.options.option`).

:class:`HypernetworkConfig` is the options class of the ``hypernetwork`` selection method (the command line gets a
flag per field) and the one argument that configures a :class:`~dip_ext.selection.hypernetwork.Trainer`; a
checkpoint's fingerprint records its fields (:func:`dip_ext.options.as_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ...options import Options, check_fields, option
from .schedule import LrSchedule, check_lr_schedule

__all__ = ["HypernetworkConfig"]


@dataclass(frozen=True)
class HypernetworkConfig(Options):
    """Options of the paper's hypernetwork (Gao et al., NeurIPS 2024); defaults follow its official code."""

    _argument_group_name = "hypernetwork (--method hypernetwork)"
    #: its flags are --hypernetwork-FIELD; the --FIELD of earlier releases stay as aliases
    _unprefixed_flags = True

    steps: int = option(200, "training steps (0 exports the one-shot warm start); with --resume, the count to "
                        "reach", minimum=0)
    val_every: int = option(50, "score the exported masks on the held-out windows every N steps", minimum=1)
    batch_size: int = option(1, "calibration windows per step and process (under torchrun the global batch is this "
                             "times the number of processes)", minimum=1)
    lr: float = option(1e-3, "AdamW learning rate", above=0.0)
    lr_schedule: Literal["constant", "cosine", "cosine-tail"] = option(
        "constant", "learning rate: constant (the paper's); cosine, decaying to 0 at --steps; or cosine-tail, "
        "constant and then decaying to 0 over the last --decay-steps. --resume continues a checkpoint under any "
        "schedule with the same learning rates so far: a constant run can be extended and annealed")
    decay_steps: Optional[int] = option(None, "length of the cosine-tail decay (needed with --lr-schedule "
                                        "cosine-tail)", minimum=1)
    lam: float = option(16.0, "weight of the budget term lam*|log r - log p|", minimum=0.0)
    distill: bool = option(False, "train on the KL divergence from the dense model's next-token distribution "
                           "instead of the LM loss (one extra forward per step)")
    margin: float = option(3.0, "warm start: the one-shot masks' logits sit this far from the keep threshold",
                           above=0.0)
    weight_decay: float = option(0.05, "AdamW weight decay", minimum=0.0)
    temperature: float = option(0.4, "Gumbel-sigmoid temperature", above=0.0)
    offset: float = option(3.0, "logit offset: a mask keeps a dimension when logit + offset > 0")
    checkpoint_every: int = option(50, "write a training checkpoint every N steps (with a work folder)", minimum=1)

    def __post_init__(self):
        check_fields(self)
        check_lr_schedule(self.lr_schedule, self.decay_steps, self.steps)

    def schedule(self) -> LrSchedule:
        """The learning-rate schedule of a run of ``steps`` steps."""
        return LrSchedule.of(self.lr, self.lr_schedule, self.steps, self.decay_steps)
