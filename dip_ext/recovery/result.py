"""What the recovery stage did, for the pruning report: a JSON-safe dict, Markdown lines and the held-out curve PNG."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Optional


from ..files import atomic_write_bytes

__all__ = ["RecoveryResult"]


#: the fields that hold nested records
_RECORDS = frozenset({"chosen", "curve", "seconds", "reconstruction", "distillation", "options", "data"})


def _as_lists(value):
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value


@dataclass
class RecoveryResult:
    """One recovery run.

    ``mode``: the option asked for; ``chosen``: the stages whose result was kept (``[]``: the pruned weights were
    kept, e.g. ``off`` or when nothing beat them on the held-out windows). ``val_loss_before`` / ``val_loss_after``:
    mean next-token LM loss (nats per token) on the held-out calibration windows before and after (None without
    held-out windows). ``curve``: one dict per scoring: ``stage`` ("start", "reconstruct", "distill"), ``step``
    (distillation step, 0 otherwise), ``tokens`` (training tokens consumed so far, all stages), ``seconds`` (wall
    seconds of recovery so far), ``val_loss``. ``tokens``: training tokens read (reconstruction windows × seq_len
    once, plus distillation steps × batch × seq_len). ``seconds``: wall seconds per stage. ``reconstruction``:
    per-layer relative output errors before / after; ``distillation``: steps, best step, per-step objective.
    ``data``: the windows trained on (:func:`dip_ext.recovery.self_text.recovery_data_windows`: ``data``,
    ``text_windows``, ``self_windows`` and, for self-generated text, the samples, generated tokens and seconds).
    """

    mode: str
    chosen: list = field(default_factory=list)
    val_loss_before: Optional[float] = None
    val_loss_after: Optional[float] = None
    curve: list = field(default_factory=list)
    tokens: int = 0
    seconds: dict = field(default_factory=dict)
    reconstruction: Optional[dict] = None
    distillation: Optional[dict] = None
    options: dict = field(default_factory=dict)
    resumed: bool = False
    data: Optional[dict] = None

    def __setattr__(self, name, value):
        # the stages' records hold tuples and JSON gives lists back: stored as lists (also when a stage fills a
        # record in later), a reloaded result compares equal to the one the run made
        super().__setattr__(name, _as_lists(value) if name in _RECORDS else value)

    def to_dict(self) -> dict:
        """JSON-safe copy (non-finite floats become None)."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v
        return clean(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "RecoveryResult":
        """The result :meth:`to_dict` recorded."""
        return cls(**data)

    def markdown_lines(self) -> list[str]:
        """Lines for the report's Markdown (a heading, one sentence, a table of the held-out curve)."""
        if self.mode == "off":
            return []
        total, dist, opts = sum(self.seconds.values()), self.distillation or {}, self.options
        kept = ' + '.join(self.chosen) if self.chosen else 'the pruned weights'
        if "distill" in self.chosen and dist.get("best_step") is not None:
            kept += f" (the weights of step {dist['best_step']} of {dist['steps']}, the best on the held-out windows)"
        lines = ["", "## Recovery", "", f"Mode **{self.mode}**: kept {kept}; {self.tokens:,} training tokens, "
                 f"{total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in self.seconds.items())})."]
        if "distill" in self.chosen and opts:
            lines[-1] += (f" Distillation: {opts.get('recover_batch')} windows a step, learning rate "
                          f"{opts.get('recover_lr'):g}, student forward in bf16 autocast "
                          f"{'on' if opts.get('recover_autocast') else 'off'}, teacher in "
                          f"{opts.get('recover_teacher_dtype')}, training data {opts.get('recover_data')}.")
        if self.data and self.data.get("self_windows"):
            d = self.data
            how = (f"{d['generated_tokens']:,} tokens generated in {d['generation_seconds']:.0f} s"
                   if not d.get("cached") else "read from the cache")
            lines[-1] += (f" Training windows: {d['self_windows']} written by the dense model itself ({how}), "
                          f"{d['text_windows']} of text.")
        if self.val_loss_before is not None and self.val_loss_after is not None:
            lines[-1] += (f" Loss on the held-out calibration windows (the early stopping's, not the evaluation's) "
                          f"{self.val_loss_before:.4f} → {self.val_loss_after:.4f} (perplexity "
                          f"{math.exp(self.val_loss_before):.2f} → {math.exp(self.val_loss_after):.2f}).")
        if self.curve:
            lines += ["", "| stage | step | tokens | seconds of training | held-out loss |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {c['stage']} | {c['step']} | {c['tokens']:,} | {c['seconds']:.0f} | {c['val_loss']:.4f} |"
                      for c in self.curve]
        return lines

    def plot(self, path) -> None:
        """The held-out loss against training tokens (PNG at ``path``, written atomically); nothing without a
        curve."""
        if not self.curve:
            return
        from matplotlib.figure import Figure  # plotting is the only use: not paid at import

        fig = Figure(figsize=(7, 4))  # no pyplot: the caller's matplotlib state stays untouched
        ax = fig.subplots()
        for stage, marker in (("start", "s"), ("reconstruct", "D"), ("distill", "o")):
            pts = [(c["tokens"], c["val_loss"]) for c in self.curve if c["stage"] == stage]
            if pts:
                ax.plot(*zip(*pts), marker=marker, ms=4, label=stage)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out LM loss (nats/token)")
        ax.set_title(f"recovery ({self.mode})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120)
        atomic_write_bytes(path, png.getvalue())
