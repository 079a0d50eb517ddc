"""The pruning report: what a run removed, what it cost and what it did to perplexity and speed."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from .files import atomic_write_bytes, atomic_write_text
from .masks import STRUCTURES
from .model_card import model_card
from .outputs import without_local_paths
from .recovery import RecoveryResult

__all__ = ["PruneReport"]


@dataclass
class PruneReport:
    """Everything prune_and_compact measured. ``to_dict`` is JSON-safe; ``save(dir)`` writes JSON, Markdown, PNG."""

    model: str
    method: str
    ratio: float
    ratio_of: str
    options: dict
    params_before: dict
    params_after: dict
    widths: list[dict]
    full_widths: dict
    perplexity_before: dict = field(default_factory=dict)
    perplexity_after: dict = field(default_factory=dict)
    tokens_per_second_before: Optional[float] = None
    tokens_per_second_after: Optional[float] = None
    seconds: dict = field(default_factory=dict)
    masks: Optional[dict] = None
    selection: dict = field(default_factory=dict)  # a trained method's run: steps, best step, validation losses
    dtype: Optional[str] = None  # the weights' dtype while pruning
    resumed: bool = False  # whether any stage continued from checkpoints of an earlier run
    speed: Optional[dict] = None  # interleaved prefill pairs: eval.PrefillComparison.to_dict()
    perplexity_recovered: dict = field(default_factory=dict)  # after the recovery stage (empty without one)
    recovery: Optional[dict] = None  # recovery.RecoveryResult.to_dict()

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def publishable(self) -> "PruneReport":
        """This report with every local path cut to its last component (a folder's name, ``file:NAME``), as it
        goes into a saved model's folder."""
        return PruneReport(**without_local_paths(self.to_dict()))

    def model_card(self) -> str:
        """The saved folder's ``README.md`` (:func:`dip_ext.model_card.model_card`)."""
        b, a = self.params_before, self.params_after
        summary = (f"`{self.model}` with **{100 * (1 - a['decoder_linear'] / b['decoder_linear']):.1f} %** of its "
                   f"decoder-linear parameters removed ({100 * (1 - a['total'] / b['total']):.1f} % of all: "
                   f"{a['total']:,} of {b['total']:,} kept) by DISP-LLM (Dimension-Independent Structural Pruning, "
                   f"Gao et al., NeurIPS 2024), method `{self.method}`"
                   + (", then recovered toward the dense model" if self.recovery else "")
                   + ". Every block reads and writes its own subset of the full-width residual stream; the weights "
                   "are smaller dense matrices plus index sets, run on dip_ext's kernels. Details: `report.md`.")
        columns = ["dense", "pruned"] + (["recovered"] if self.perplexity_recovered else [])
        nan = float("nan")
        table = {t: [p, self.perplexity_after.get(t, nan)] + ([self.perplexity_recovered.get(t, nan)]
                                                               if self.perplexity_recovered else [])
                 for t, p in self.perplexity_before.items()}
        return model_card(self.model, summary, table, columns)

    def to_markdown(self) -> str:
        b, a = self.params_before, self.params_after
        lines = [f"# dip_ext pruning report: {self.model}", "",
                 f"method **{self.method}**, target: remove **{100 * self.ratio:.1f} %** of "
                 f"{'decoder-linear' if self.ratio_of == 'decoder_linear' else 'all'} parameters"
                 + (f" (weights in {self.dtype})" if self.dtype else "")
                 + ("; resumed from the checkpoints of an earlier run" if self.resumed else ""), "",
                 "| | before | after | removed |", "|---|---:|---:|---:|",
                 f"| total parameters | {b['total']:,} | {a['total']:,} | {100 * (1 - a['total'] / b['total']):.2f} % |",
                 f"| decoder-linear parameters | {b['decoder_linear']:,} | {a['decoder_linear']:,} | "
                 f"{100 * (1 - a['decoder_linear'] / b['decoder_linear']):.2f} % |"]
        for name in self.perplexity_before:
            before, after = self.perplexity_before[name], self.perplexity_after.get(name, float("nan"))
            lines.append(f"| perplexity {name} | {before:.3f} | {after:.3f} | ×{after / before:.3f} |")
            if name in self.perplexity_recovered:
                rec = self.perplexity_recovered[name]
                lines.append(f"| perplexity {name}, after recovery | {before:.3f} | {rec:.3f} | ×{rec / before:.3f} |")
        if self.speed:
            s = self.speed
            lines.append(f"| prefill tokens/s | {s['dense_tokens_per_second']:,.0f} | "
                         f"{s['pruned_tokens_per_second']:,.0f} | ×{s['speedup']:.2f} speed (median of {s['pairs']} "
                         f"interleaved pairs, ×{s['speedup_min']:.2f}–×{s['speedup_max']:.2f}) |")
        sel = self.selection
        if sel.get("best_step") is not None:
            history = dict(sel["val_history"])
            lines += ["", f"Hypernetwork: {sel['steps']} steps; the masks of step {sel['best_step']} are kept "
                          f"(lowest LM loss on {self.options.get('val_windows')} held-out calibration windows: "
                          f"{sel['best_val_loss']:.4f}; warm start {history.get(0, float('nan')):.4f}, "
                          f"last step {sel['val_history'][-1][1]:.4f})."]
        refit = self.options.get("refit")
        if refit and refit.get("structures") is None:
            lines += ["", f"Refit ({refit['mode']}): no refit scored better on the held-out calibration windows than "
                          f"none (loss {refit['val_loss'][0]:.4f}); the weights are the dense model's."]
        elif refit:
            scored = ""
            if "val_loss" in refit:
                scored = (f"; held-out calibration loss {refit['val_loss'][0]:.4f} → {refit['val_loss'][1]:.4f}, the "
                          f"best of {len(refit['candidates'])} choices")
            lines += ["", f"Refit ({refit['mode']}): {refit['weights']} weights reading a pruned input "
                          f"({', '.join(refit['structures'])}) refitted by least squares on {refit['tokens']:,} "
                          f"calibration tokens, damping {refit['damping']:g}{scored}."]
        if self.recovery:
            lines += RecoveryResult(**self.recovery).markdown_lines()
        lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in self.seconds.items()]
        lines += ["", "## Kept widths per layer", "", "| layer | " + " | ".join(STRUCTURES) + " |",
                  "|---:|" + "---:|" * len(STRUCTURES)]
        lines += [f"| {i} | " + " | ".join(str(w[s]) for s in STRUCTURES) + " |" for i, w in enumerate(self.widths)]
        lines.append("| full | " + " | ".join(str(self.full_widths[s]) for s in STRUCTURES) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path) -> None:
        """Kept width per layer and set, as a fraction of the full width (PNG)."""
        from matplotlib.figure import Figure  # plotting is the only use: not paid at import

        fig = Figure(figsize=(9, 4.5))  # no pyplot: the caller's matplotlib backend and state stay untouched
        ax = fig.subplots()
        layers = range(len(self.widths))
        for s in STRUCTURES:
            ax.plot(layers, [w[s] / self.full_widths[s] for w in self.widths], marker="o", ms=3, label=s)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("kept fraction of the full width")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{self.model}: {self.method}, {100 * self.ratio:.0f} % of "
                     f"{self.ratio_of.replace('_', '-')} parameters removed")
        ax.grid(alpha=0.3)
        ax.legend(ncol=5, fontsize=8, loc="lower center")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120)
        atomic_write_bytes(path, png.getvalue())

    def save(self, folder, *, model_card: bool = False) -> None:
        """Writes ``report.json``, ``report.md``, ``widths.png`` and, after a recovery, ``recovery.png`` (its
        held-out curve) into ``folder`` (each atomically); with ``model_card`` also :meth:`model_card` as
        ``README.md`` (meant for a new folder: a README already there would be replaced)."""
        folder = Path(folder)
        if model_card:
            atomic_write_text(folder / "README.md", self.model_card())
        atomic_write_text(folder / "report.json", json.dumps(self.to_dict(), indent=1))
        atomic_write_text(folder / "report.md", self.to_markdown())
        self.plot(folder / "widths.png")
        if self.recovery:
            RecoveryResult(**self.recovery).plot(folder / "recovery.png")
