"""The hypernetwork as a registered selection method, and its options (declared once, here)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

from ..options import check_fields, option
from .base import SelectionInputs, SelectionResult, TrainingSummary
from .oneshot import oneshot_masks

__all__ = ["Hypernetwork", "HypernetworkConfig"]


@dataclass(frozen=True)
class HypernetworkConfig:
    """Options of the paper's hypernetwork (Gao et al., NeurIPS 2024); defaults follow its official code."""

    _argument_group_name = "hypernetwork (--method hypernetwork)"

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
        if self.lr_schedule == "cosine-tail":
            if self.decay_steps is None:
                raise ValueError("lr_schedule 'cosine-tail' needs decay_steps, an integer >= 1")
            if self.decay_steps > self.steps:
                raise ValueError(f"decay_steps ({self.decay_steps}) must not exceed steps ({self.steps})")
        elif self.decay_steps is not None:
            raise ValueError(f"decay_steps is only for lr_schedule 'cosine-tail', not {self.lr_schedule!r}")


class Hypernetwork:
    """The paper's learned masks, warm-started from :class:`OneShot` and early-stopped on held-out windows."""

    name = "hypernetwork"
    options_class = HypernetworkConfig

    def uses_validation(self, options: HypernetworkConfig) -> bool:
        return options.steps > 0

    def select(self, inputs: SelectionInputs, options: HypernetworkConfig) -> SelectionResult:
        from .hypernetwork import learn_masks_hypernetwork

        t0 = time.perf_counter()
        init = oneshot_masks(inputs.calibration, inputs.budget, inputs.multiple_of)
        if options.steps == 0:
            return SelectionResult(self.name, init, seconds=time.perf_counter() - t0)
        run: dict = {}
        masks = learn_masks_hypernetwork(
            inputs.model, inputs.train_windows, inputs.budget, steps=options.steps, init_masks=init,
            lam=options.lam, lr=options.lr, weight_decay=options.weight_decay, temperature=options.temperature,
            offset=options.offset, batch_size=options.batch_size, seed=inputs.seed, multiple_of=inputs.multiple_of,
            margin=options.margin, distill=options.distill, lr_schedule=options.lr_schedule,
            decay_steps=options.decay_steps, val_blocks=inputs.val_windows, val_every=options.val_every,
            checkpoint_dir=inputs.work_dir, checkpoint_every=options.checkpoint_every, resume=inputs.resume,
            progress=inputs.progress, report=run)
        training = TrainingSummary(
            steps=run["steps"], start_step=run["start_step"], seconds=run["train_seconds"],
            best_step=run.get("best_step"), best_val_loss=run.get("best_val_loss"),
            val_history=[(int(s), float(v)) for s, v in run.get("val_history", [])], threshold=run.get("threshold"))
        return SelectionResult(self.name, masks, seconds=time.perf_counter() - t0, training=training)
