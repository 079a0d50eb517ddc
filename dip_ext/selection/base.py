"""What a selection method is: one small protocol, the inputs every method gets and the result it returns.

A method turns the dense model, its calibration statistics and a parameter budget into :class:`DispMasks`
that meet the budget. Register it with :func:`dip_ext.selection.register_method` and the pipeline, the command
line (``--method NAME`` plus flags generated from its options class) and the benchmarks find it by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Protocol

import torch
from torch import nn

from ..calibration import CalibrationResult
from ..distributed import Placement
from ..masks import DispMasks
from .budget import Budget

__all__ = ["SelectionInputs", "SelectionResult", "TrainingSummary", "SelectionMethod"]


@dataclass(frozen=True)
class SelectionInputs:
    """Everything a selection method may read.

    ``model``: the dense model (frozen by the method while it runs; possibly FSDP-sharded, see ``placement``).
    ``calibration``: Fisher scores and activation statistics of the calibration pass. ``train_windows``:
    ``[n, seq_len]`` int64 windows a method may train on; ``val_windows``: held-out windows (never trained on)
    for early stopping, or None. ``work_dir``: the method's own folder for checkpoints (None: none are written);
    ``resume``: continue from what is there.
    """

    model: nn.Module
    budget: Budget
    calibration: CalibrationResult
    train_windows: torch.Tensor
    val_windows: Optional[torch.Tensor] = None
    multiple_of: int = 1
    seed: int = 0
    placement: Placement = field(default_factory=lambda: Placement("single"))
    work_dir: Optional[Path] = None
    resume: bool = False
    progress: bool = True


@dataclass
class TrainingSummary:
    """A trained method's run: steps taken (``start_step`` of them resumed from a checkpoint), seconds, and with
    held-out windows the best step, its loss and the validation history ``[(step, loss), ...]``."""

    steps: int
    start_step: int = 0
    seconds: float = 0.0
    best_step: Optional[int] = None
    best_val_loss: Optional[float] = None
    val_history: list[tuple[int, float]] = field(default_factory=list)
    threshold: Optional[float] = None

    def to_dict(self) -> dict:
        """JSON-safe record (the history as ``[[step, loss], ...]``)."""
        out = asdict(self)
        out["val_history"] = [[int(s), float(v)] for s, v in self.val_history]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingSummary":
        """The summary :meth:`to_dict` recorded."""
        return cls(**{**data, "val_history": [(int(s), float(v)) for s, v in data.get("val_history", [])]})

    def markdown_lines(self, method: str, val_windows: int) -> list[str]:
        """The report's lines on this run of ``method`` (``val_windows``: held-out windows it was scored on)."""
        lines = ["", f"{method}: trained {self.steps} steps" + (f" ({self.start_step} of them resumed)"
                                                                  if self.start_step else "")
                 + (f" in {self.seconds:.0f} s" if self.seconds else "") + "."]
        if self.best_step is not None and self.best_val_loss is not None:
            history = dict(self.val_history)
            lines[-1] += (f" The masks of step {self.best_step} are kept (lowest LM loss on {val_windows} held-out "
                          f"calibration windows: {self.best_val_loss:.4f}; warm start "
                          f"{history.get(0, float('nan')):.4f}, last step {self.val_history[-1][1]:.4f}).")
        return lines


@dataclass
class SelectionResult:
    """The masks a method chose; ``training`` for methods that train (None otherwise)."""

    method: str
    masks: DispMasks
    seconds: float = 0.0
    training: Optional[TrainingSummary] = None


class SelectionMethod(Protocol):
    """The protocol of a selection method (see :func:`dip_ext.selection.register_method`).

    ``name``: what ``--method`` / ``PruneConfig.method`` call it. ``options_class``: a frozen dataclass of the
    method's own options (fields declared with :func:`dip_ext.options.option`; the CLI gets a flag per field),
    or None (``select`` then gets None). ``select`` returns masks meeting ``inputs.budget``, kept widths rounded
    by :func:`dip_ext.selection.budget.fit_multiple` (the one rounding policy) when ``inputs.multiple_of > 1``.
    """

    name: ClassVar[str]
    options_class: ClassVar[Optional[type]]

    def uses_validation(self, options: Any) -> bool:
        """Whether held-out windows should be set aside for this method (e.g. for early stopping)."""
        ...

    def select(self, inputs: SelectionInputs, options: Any) -> SelectionResult:
        ...

    # Optional: ``prunes_heads = True`` for a method that meets budgets with ``Budget.heads`` (masks with KV
    # groups); the pipeline refuses --prune-heads / --kv-ratio for the others.
    # Optional: ``report_lines(training: TrainingSummary, val_windows: int) -> list[str]``, the method's own
    # Markdown lines on a trained run in the report (without it: :meth:`TrainingSummary.markdown_lines`).
