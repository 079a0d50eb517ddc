"""The pruning report: what a run removed, what it cost and what it did to perplexity and speed.

The report holds the typed results of the stages (parameter reports, the selection's training summary, the
refit, the evaluations' speed comparison, the recovery) and the configs that made it (:class:`RunConfigs`); it is
serialized once (:meth:`PruneReport.to_dict`, ``report.json``) and read back (:meth:`PruneReport.from_dict`,
:meth:`PruneReport.load`). Each typed result renders its own Markdown lines.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from .eval import PrefillComparison
from .files import atomic_write_bytes, atomic_write_text, read_json
from .masks import DispMasks
from .model_card import model_card
from .outputs import own_files, without_local_paths
from .params import ParamReport, full_row
from .recovery import RecoveryResult
from .refit import RefitResult
from .run_configs import RunConfigs
from .selection import TrainingSummary, get_method

__all__ = ["PruneReport", "REPORT_FORMAT"]

#: what ``report.json`` says it is; its ``version`` is :attr:`PruneReport.VERSION`
REPORT_FORMAT = "dip_ext.report"

#: typed members: field -> how each is read back from its ``to_dict``
_TYPED = {"configs": RunConfigs.from_dict, "params_before": ParamReport.from_dict,
          "params_after": ParamReport.from_dict, "masks": DispMasks.from_dict, "speed": PrefillComparison.from_dict,
          "selection": TrainingSummary.from_dict, "refit": RefitResult.from_dict,
          "recovery": RecoveryResult.from_dict}


@dataclass
class PruneReport:
    """Everything a pruning run measured, typed.

    ``model``: the model's name; ``configs``: every option of the run; ``calibration``: what calibrated it (a text
    name, ``file:NAME`` or a description of the data given); ``seq_len`` / ``eval_seq_len``: tokens per calibration
    / evaluation window; ``windows``: how many calibration windows were scored, trained on and held out
    (``{"calibration", "train", "val"}``); ``params_before`` / ``params_after``: :class:`ParamReport` of the dense
    and the compacted model; ``budget``: what the budget fitter counts for the kept widths (kept and removed
    decoder-linear parameters, removed fractions); ``masks``: the kept index sets; ``perplexity_*``: text name →
    perplexity before, after compaction and after recovery; ``speed``: the interleaved prefill comparison;
    ``tokens_per_second_after``: the compacted model's prefill speed; ``seconds``: wall seconds per stage;
    ``selection``: a trained method's :class:`TrainingSummary`; ``refit``: :class:`RefitResult`; ``recovery``:
    :class:`RecoveryResult`; ``dtype``: the weights' dtype while pruning; ``resumed``: whether any stage continued
    from checkpoints of an earlier run.

    ``save(dir)`` writes JSON, Markdown and plots; ``load(path)`` reads ``report.json`` back.
    """

    #: format version of :meth:`to_dict` / ``report.json`` (1: the untyped reports of earlier releases)
    VERSION = 2

    model: str
    configs: RunConfigs
    params_before: ParamReport
    params_after: Optional[ParamReport]
    masks: DispMasks
    calibration: str = ""
    seq_len: Optional[int] = None
    eval_seq_len: Optional[int] = None
    windows: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    perplexity_before: dict = field(default_factory=dict)
    perplexity_after: dict = field(default_factory=dict)
    perplexity_recovered: dict = field(default_factory=dict)
    speed: Optional[PrefillComparison] = None
    tokens_per_second_after: Optional[float] = None
    seconds: dict = field(default_factory=dict)
    selection: Optional[TrainingSummary] = None
    refit: Optional[RefitResult] = None
    recovery: Optional[RecoveryResult] = None
    dtype: Optional[str] = None
    resumed: bool = False

    # ---- what the configs and results say ------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.configs.prune.method

    @property
    def ratio(self) -> float:
        return self.configs.prune.ratio

    @property
    def ratio_of(self) -> str:
        return self.configs.prune.ratio_of

    @property
    def widths(self) -> list[dict]:
        """Kept width per layer and set."""
        return self.masks.widths()

    @property
    def full_widths(self) -> list[dict]:
        """The dense model's width of every set the masks hold, per layer (KV groups where they were pruned: the
        compacted model's report knows them, the dense model's does not)."""
        before = self.params_before.full_widths
        if self.params_after is None:
            return before
        return [{**b, **a} for b, a in zip(before, self.params_after.full_widths)]

    @property
    def tokens_per_second_before(self) -> Optional[float]:
        """The dense model's prefill speed (from the interleaved comparison)."""
        return self.speed.dense_tokens_per_second if self.speed is not None else None

    # ---- serialization ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-safe: every typed member by its own ``to_dict``, with the format and its version."""
        out = {"format": REPORT_FORMAT, "version": self.VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if f.name in _TYPED and value is not None else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PruneReport":
        """The report :meth:`to_dict` wrote. Raises ValueError for a record of another format version (naming
        it) or one that cannot be read."""
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            version = 1 if isinstance(data, dict) and "options" in data else None
            raise ValueError("not a dip_ext report" + (" of this format: it was written by an earlier dip_ext "
                                                        f"(report format {version}); this one reads format "
                                                        f"{cls.VERSION}" if version else ""))
        if data.get("version") != cls.VERSION:
            raise ValueError(f"report format version {data.get('version')!r}; this dip_ext reads version "
                             f"{cls.VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format", "version"})
        if unknown:
            raise ValueError(f"report has unknown entries: {', '.join(unknown)}")
        values = {k: (_TYPED[k](v) if k in _TYPED and v is not None else v) for k, v in data.items() if k in known}
        return cls(**values)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PruneReport":
        """The report in ``path``: a ``report.json`` or the folder that holds one. FileNotFoundError without it;
        ValueError for a file that is not a report this dip_ext reads (see :meth:`from_dict`)."""
        path = Path(path)
        file = path / "report.json" if path.is_dir() else path
        return cls.from_dict(read_json(file, f"no report at {file}"))

    def publishable(self) -> "PruneReport":
        """This report with every local path cut to its last component (a folder's name, ``file:NAME``), as it
        goes into a saved model's folder."""
        return PruneReport.from_dict(without_local_paths(self.to_dict()))

    def model_card(self) -> str:
        """The saved folder's ``README.md`` (:func:`dip_ext.model_card.model_card`)."""
        b, a = self.params_before, self._after()
        summary = (f"`{self.model}` with **{100 * (1 - a.decoder_linear / b.decoder_linear):.1f} %** of its "
                   f"decoder-linear parameters removed ({100 * (1 - a.total / b.total):.1f} % of all: "
                   f"{a.total:,} of {b.total:,} kept) by DISP-LLM (Dimension-Independent Structural Pruning, "
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

    def _after(self) -> ParamReport:
        if self.params_after is None:
            raise ValueError("this report has no compacted model's parameter counts (compaction ran on another rank)")
        return self.params_after

    def _calibration_line(self) -> str:
        """What the calibration pass read: its window count and text, and how many windows the dense model wrote."""
        windows = self.windows or {}
        written = ((windows.get("sources") or {}).get("self") or {}).get("calibration", 0)
        return (f"calibration pass: {windows.get('calibration', 0)} windows of {self.calibration}"
                + (f", {written} of them written by the dense model itself (--calibration-self)" if written else ""))

    def to_markdown(self) -> str:
        """``report.md``: the run in a table, each stage's own lines, wall times and kept widths."""
        b, a = self.params_before, self._after()
        lines = [f"# dip_ext pruning report: {self.model}", "",
                 f"method **{self.method}**, target: remove **{100 * self.ratio:.1f} %** of "
                 f"{'decoder-linear' if self.ratio_of == 'decoder_linear' else 'all'} parameters"
                 + (f" (weights in {self.dtype})" if self.dtype else "")
                 + ("; resumed from the checkpoints of an earlier run" if self.resumed else ""), "",
                 self._calibration_line(), "",
                 "| | before | after | removed |", "|---|---:|---:|---:|",
                 f"| total parameters | {b.total:,} | {a.total:,} | {100 * (1 - a.total / b.total):.2f} % |",
                 f"| decoder-linear parameters | {b.decoder_linear:,} | {a.decoder_linear:,} | "
                 f"{100 * (1 - a.decoder_linear / b.decoder_linear):.2f} % |"]
        kv_dense, kv_kept = (self.budget.get(f"kv_cache_bytes_per_token_{k}") for k in ("dense", "kept"))
        if kv_dense:
            lines.append(f"| KV-cache bytes per token{f' ({self.dtype})' if self.dtype else ''} | {kv_dense:,} | "
                         f"{kv_kept:,} | {100 * (1 - kv_kept / kv_dense):.2f} % |")
        for name in self.perplexity_before:
            before, after = self.perplexity_before[name], self.perplexity_after.get(name, float("nan"))
            lines.append(f"| perplexity {name} | {before:.3f} | {after:.3f} | ×{after / before:.3f} |")
            if name in self.perplexity_recovered:
                rec = self.perplexity_recovered[name]
                lines.append(f"| perplexity {name}, after recovery | {before:.3f} | {rec:.3f} | ×{rec / before:.3f} |")
        if self.speed:
            sp = self.speed
            lines.append(f"| prefill tokens/s | {sp.dense_tokens_per_second:,.0f} | "
                         f"{sp.pruned_tokens_per_second:,.0f} | ×{sp.speedup:.2f} speed (median of {len(sp.ratios)} interleaved pairs, "
                         f"×{sp.speedup_min:.2f}–×{sp.speedup_max:.2f}) |")
        if self.selection is not None:
            lines += self._selection_lines()
        if self.refit is not None:
            lines += self.refit.markdown_lines()
        if self.recovery is not None:
            lines += self.recovery.markdown_lines()
        lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in self.seconds.items()]
        keys = self.masks.structures
        full = self.full_widths
        lines += ["", "## Kept widths per layer", "", "| layer | " + " | ".join(keys) + " |",
                  "|---:|" + "---:|" * len(keys)]
        # "-": a layer without that set (the family's layers differ)
        lines += [f"| {i} | " + " | ".join(str(w.get(s, "-")) for s in keys) + " |" for i, w in enumerate(self.widths)]
        full_widths = full_row(full, keys)
        lines.append("| full | " + " | ".join(str(full_widths.get(s, "-")) for s in keys) + " |")
        return "\n".join(lines) + "\n"

    def _selection_lines(self) -> list[str]:
        """The selection method's own lines on its run, when it is registered here and renders them
        (``report_lines(training, val_windows)``), else the training summary's."""
        val = self.windows.get("val", 0)
        try:
            render = getattr(get_method(self.method), "report_lines", None)
        except ValueError:  # a report of a method this process has not registered: read without it
            render = None
        return render(self.selection, val) if render is not None else self.selection.markdown_lines(self.method, val)

    def plot(self, path) -> None:
        """Kept width per layer and set, as a fraction of the layer's full width (PNG; a set is drawn over the
        layers that have it)."""
        from matplotlib.figure import Figure  # plotting is the only use: not paid at import

        fig = Figure(figsize=(9, 4.5))  # no pyplot: the caller's matplotlib backend and state stay untouched
        ax = fig.subplots()
        full = self.full_widths
        for s in self.masks.structures:
            layers = [i for i, w in enumerate(self.widths) if s in w]
            ax.plot(layers, [self.widths[i][s] / full[i][s] for i in layers], marker="o", ms=3, label=s)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("kept fraction of the full width")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{self.model}: {self.method}, {100 * self.ratio:.0f} % of "
                     f"{self.ratio_of.replace('_', '-')} parameters removed")
        ax.grid(alpha=0.3)
        ax.legend(ncol=len(self.masks.structures), fontsize=8, loc="lower center")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120)
        atomic_write_bytes(path, png.getvalue())

    def save(self, folder, *, model_card: bool = False) -> None:
        """Writes ``report.json``, ``report.md``, ``widths.png`` and, after a recovery, ``recovery.png`` (its
        held-out curve) into ``folder`` (created if needed; each file atomically); with ``model_card`` also
        :meth:`model_card` as ``README.md``. The folder's dip_ext marker records them
        (:func:`dip_ext.outputs.own_files`): a later save replaces them, but FileExistsError is raised, before
        anything is written, for any of them already there that dip_ext did not write or that changed since."""
        names = ["report.json", "report.md", "widths.png"] + ["recovery.png"] * (self.recovery is not None)
        with own_files(folder, names + ["README.md"] * model_card, command="PruneReport.save") as folder:
            if model_card:
                atomic_write_text(folder / "README.md", self.model_card())
            atomic_write_text(folder / "report.json", json.dumps(self.to_dict(), indent=1))
            atomic_write_text(folder / "report.md", self.to_markdown())
            self.plot(folder / "widths.png")
            if self.recovery is not None:
                self.recovery.plot(folder / "recovery.png")
