"""prune_and_compact: text → calibration → masks → compaction → report. What users run."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import distributed as dist
from .calibration import CalibrationResult, run_calibration
from .compaction import compact, is_compacted
from .families import adapter_for
from .masks import STRUCTURES, DispMasks
from .params import param_report
from .refit import check_damping, choose_refit, refit_pruned_inputs
from .selection.budget import RATIO_OF, Budget

METHODS = ("oneshot", "dependent", "hypernetwork")
#: prune_and_compact(refit=...): choose on held-out windows, always (fixed settings), never
REFIT_MODES = ("auto", "on", "off")


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
    selection: dict = field(default_factory=dict)  # the hypernetwork's run: steps, best step, validation losses

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to_markdown(self) -> str:
        b, a = self.params_before, self.params_after
        lines = [f"# dip_ext pruning report: {self.model}", "",
                 f"method **{self.method}**, target: remove **{100 * self.ratio:.1f} %** of "
                 f"{'decoder-linear' if self.ratio_of == 'decoder_linear' else 'all'} parameters", "",
                 "| | before | after | removed |", "|---|---:|---:|---:|",
                 f"| total parameters | {b['total']:,} | {a['total']:,} | {100 * (1 - a['total'] / b['total']):.2f} % |",
                 f"| decoder-linear parameters | {b['decoder_linear']:,} | {a['decoder_linear']:,} | "
                 f"{100 * (1 - a['decoder_linear'] / b['decoder_linear']):.2f} % |"]
        for name in self.perplexity_before:
            before, after = self.perplexity_before[name], self.perplexity_after.get(name, float("nan"))
            lines.append(f"| perplexity {name} | {before:.3f} | {after:.3f} | ×{after / before:.3f} |")
        if self.tokens_per_second_before and self.tokens_per_second_after:
            lines.append(f"| prefill tokens/s | {self.tokens_per_second_before:,.0f} | "
                         f"{self.tokens_per_second_after:,.0f} | "
                         f"×{self.tokens_per_second_after / self.tokens_per_second_before:.2f} speed |")
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
        lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in self.seconds.items()]
        lines += ["", "## Kept widths per layer", "", "| layer | " + " | ".join(STRUCTURES) + " |",
                  "|---:|" + "---:|" * len(STRUCTURES)]
        lines += [f"| {i} | " + " | ".join(str(w[s]) for s in STRUCTURES) + " |" for i, w in enumerate(self.widths)]
        lines.append("| full | " + " | ".join(str(self.full_widths[s]) for s in STRUCTURES) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path) -> None:
        """Kept width per layer and set, as a fraction of the full width (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.5))
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
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(self.to_dict(), indent=1))
        (folder / "report.md").write_text(self.to_markdown())
        self.plot(folder / "widths.png")


@contextmanager
def _timed(seconds: dict, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0


def _calibration_blocks(tokenizer, calibration, seq_len: int) -> torch.Tensor:
    """Every window of the calibration text (or the given token blocks): LongTensor ``[n, seq_len]``."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long or calibration.shape[0] == 0:
            raise ValueError("calibration token blocks must be a non-empty LongTensor [n_windows, seq_len]")
        return calibration
    if tokenizer is None:
        raise ValueError(f"calibration text {calibration!r} needs a tokenizer (pass tokenizer=...)")
    from . import data

    return data.get_blocks(tokenizer, calibration, "calibration", seq_len, None)


def split_calibration(blocks: torch.Tensor, calibration_windows: Optional[int], val_windows: int = 0):
    """Splits calibration windows ``[n, seq_len]`` into ``(calibration pass, training, validation)`` blocks.

    Validation (for the hypernetwork's early stopping): ``val_windows`` windows evenly spaced over the text, at
    mid-stride positions; None when ``val_windows`` is 0 or the text has no more than ``val_windows`` windows
    (with a warning). Training: every other window. Calibration pass (Fisher scores, statistics):
    ``calibration_windows`` of the training windows (None: all), evenly spaced, so nothing the early stopping
    scores on has shaped the masks. With ``val_windows=0`` the calibration pass gets the same windows as
    ``get_blocks(..., n_blocks=calibration_windows)``.
    """
    n = int(blocks.shape[0])
    val = None
    rest = blocks
    if val_windows > 0:
        if n > val_windows:
            val_idx = ((torch.arange(val_windows, dtype=torch.float64) + 0.5) * n / val_windows).long()
            keep = torch.ones(n, dtype=torch.bool)
            keep[val_idx] = False
            val, rest = blocks[val_idx], blocks[keep]
        else:
            warnings.warn(f"the calibration text has {n} windows, too few to hold out {val_windows} for "
                          f"validation: the hypernetwork returns its last masks (no early stopping)", stacklevel=3)
    if calibration_windows is None:
        calibration_windows = int(rest.shape[0])
    if calibration_windows > rest.shape[0]:
        warnings.warn(f"asked for {calibration_windows} calibration windows, the text has only "
                      f"{rest.shape[0]}" + (" besides the validation windows" if val is not None else ""),
                      stacklevel=3)
    from .data import spread_indices

    return rest[spread_indices(rest.shape[0], calibration_windows)], rest, val


def _evaluate(model, tokenizer, texts, seq_len, windows, progress) -> dict:
    from .eval import perplexity

    return {name: perplexity(model, tokenizer, name, seq_len=seq_len, max_windows=windows, progress=progress)
            for name in texts}


def _speed(model, seq_len: int) -> float:
    from .eval import prefill_tokens_per_second

    return prefill_tokens_per_second(model, seq_len=seq_len, batch=1, repeats=3)


def _start_fresh(work: Path) -> None:
    """Removes checkpoints a previous run left in ``work`` (a run without resume starts from scratch)."""
    import shutil

    (work / "calibration.safetensors").unlink(missing_ok=True)
    shutil.rmtree(work / "hypernetwork", ignore_errors=True)


def validate_options(method: str, ratio: float, ratio_of: str, multiple_of: int, steps: int) -> None:
    """Raises ValueError for bad options before any expensive work starts."""
    from .selection.budget import check_ratio

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_ratio(ratio)
    if ratio_of not in RATIO_OF:
        raise ValueError(f"ratio_of must be one of {', '.join(RATIO_OF)}, got {ratio_of!r}")
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")


def select_masks(model: nn.Module, blocks: torch.Tensor, budget: Budget, method: str, *,
                 calib: Optional[CalibrationResult] = None, multiple_of: int = 1, steps: int = 200,
                 seed: int = 0, work_dir: Optional[Path] = None, resume: bool = False, progress: bool = True,
                 hypernetwork_options: Optional[dict] = None, train_blocks: Optional[torch.Tensor] = None,
                 val_blocks: Optional[torch.Tensor] = None, report: Optional[dict] = None) -> DispMasks:
    """Masks for ``model`` meeting ``budget`` by ``method`` (the hypernetwork is warm-started from one-shot).

    ``blocks`` feed the calibration pass when ``calib`` is None; the hypernetwork trains on ``train_blocks``
    (default ``blocks``) and early-stops on ``val_blocks`` (see :func:`learn_masks_hypernetwork`), filling
    ``report`` with its run summary.
    """
    from .selection.oneshot import dependent_masks, oneshot_masks

    if calib is None:
        calib = run_calibration(model, blocks, progress=progress,
                                checkpoint=work_dir / "calibration.safetensors" if work_dir else None)
    if method == "dependent":
        return dependent_masks(calib, budget, multiple_of)
    masks = oneshot_masks(calib, budget, multiple_of)
    if method == "oneshot" or steps == 0:
        return masks
    from .selection.hypernetwork import learn_masks_hypernetwork

    return learn_masks_hypernetwork(
        model, blocks if train_blocks is None else train_blocks, budget, steps=steps, init_masks=masks,
        seed=seed, multiple_of=multiple_of, val_blocks=val_blocks, report=report,
        checkpoint_dir=work_dir / "hypernetwork" if work_dir else None, resume=resume, progress=progress,
        **(hypernetwork_options or {}))


def prune_and_compact(model: nn.Module, tokenizer=None, ratio: float = 0.3,
                      calibration: Union[str, torch.Tensor] = "wiki", method: str = "hypernetwork", *,
                      ratio_of: str = "decoder_linear", seq_len: int = 256, calibration_windows: int = 64,
                      val_windows: int = 16, steps: int = 200, multiple_of: int = 1, seed: int = 0,
                      eval_texts: tuple = ("wiki", "ptb"), eval_windows: Optional[int] = 16,
                      eval_seq_len: int = 256, measure_speed: bool = True,
                      work_dir: Optional[Union[str, os.PathLike]] = None, resume: bool = False,
                      progress: bool = True, model_name: Optional[str] = None,
                      hypernetwork_options: Optional[dict] = None, refit: str = "auto", refit_damping: float = 1.0,
                      full_model: Optional[nn.Module] = None):
    """Prunes ``model`` with DISP and compacts it in place; returns ``(model, PruneReport)``.

    ``ratio``: fraction of decoder-linear parameters removed (``ratio_of="total"``: of all parameters).
    ``calibration``: a text name (``"wiki"``, ``"ptb"``, ``"wikitext2"``, ``"file:PATH"``) or token blocks
    ``[n, seq_len]``; the calibration pass reads ``calibration_windows`` of its windows, evenly spaced.
    ``method``: ``"hypernetwork"`` (the paper's; warm-started from one-shot, ``steps`` training steps on every
    calibration window but ``val_windows`` held out, whose LM loss picks the best export: early stopping; see
    :func:`split_calibration`), ``"oneshot"`` (Fisher scores, no training) or ``"dependent"`` (one shared embedding subset:
    the baseline). ``work_dir`` keeps calibration and training checkpoints; ``resume=True`` continues from
    them. ``refit`` (:mod:`dip_ext.refit`): before compaction, refit the kept input columns of the weights whose
    input is pruned to what the whole row computed on the calibration-pass windows (least squares). ``"auto"``
    (default) scores a few choices (which weights, how much damping) and no refit at all by the LM loss on
    ``val_windows`` held-out calibration windows and keeps the best; ``"on"`` refits the MLP's last projection
    with ``refit_damping`` unscored (also what ``"auto"`` does without held-out windows or on a sharded model);
    ``"off"``. ``eval_texts`` (held-out wiki, PTB test) are scored before and after (``eval_windows`` windows of
    ``eval_seq_len`` tokens; empty to skip); prefill speed is measured unless ``measure_speed=False``.
    Under ``torch.distributed`` every rank calls this: calibration and mask learning run data-parallel (see
    ``docs/distributed.md``), every rank returns the same compacted model, and only rank 0 evaluates (the
    other ranks' reports have no perplexity or speed).

    Sharded (``model`` from :func:`dip_ext.sharding.shard_frozen_model`, FSDP2): calibration, selection and
    the perplexity before run on the sharded model on every rank in lockstep; rank 0 passes its full copy of
    the dense model as ``full_model``, which is compacted, moved to the sharded model's device, evaluated
    and returned; the other ranks return ``(None, report)``. Prefill speed is not measured (the dense model is
    never whole on one device).
    """
    validate_options(method, ratio, ratio_of, multiple_of, steps)
    if isinstance(val_windows, bool) or not isinstance(val_windows, int) or val_windows < 0:
        raise ValueError(f"val_windows must be an int >= 0, got {val_windows!r}")
    if refit not in REFIT_MODES:
        raise ValueError(f"refit must be one of {', '.join(REFIT_MODES)}, got {refit!r}")
    check_damping(refit_damping)
    if is_compacted(model):
        raise ValueError("the model is already compacted; prune the dense original")
    adapter_for(model)  # unsupported architectures fail here, before any work
    sharded = dist.is_sharded(model)
    if sharded and dist.is_main() and full_model is None:
        raise ValueError("model is sharded (FSDP): rank 0 must pass its full dense copy as full_model (the model "
                         "that gets compacted and saved)")
    if not sharded and full_model is not None:
        raise ValueError("full_model is only for a sharded (FSDP) model; compact the model itself")
    budget = Budget.for_model(model, ratio, ratio_of)
    if eval_texts and tokenizer is None:
        raise ValueError("evaluating perplexity needs a tokenizer (or pass eval_texts=())")
    eval_after = eval_texts if dist.is_main() else ()
    if sharded:  # the sharded forward is a collective: every rank scores "before"; rank 0 alone "after"
        measure_speed = False
    elif not dist.is_main():  # data-parallel: rank 0 evaluates and reports, the others only help select masks
        eval_texts, eval_after, measure_speed = (), (), False
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    seconds: dict = {}
    with _timed(seconds, "calibration data"):
        learns = method == "hypernetwork" and steps > 0
        all_blocks = _calibration_blocks(tokenizer, calibration, seq_len)
        given = isinstance(calibration, torch.Tensor)  # given blocks: "up to calibration_windows of them"
        blocks, train_blocks, val_blocks = split_calibration(
            all_blocks, None if given and calibration_windows >= all_blocks.shape[0] else calibration_windows,
            val_windows if learns or refit == "auto" else 0)
    before = param_report(full_model if full_model is not None else model)
    with _timed(seconds, "eval before"):
        ppl_before = _evaluate(model, tokenizer, eval_texts, eval_seq_len, eval_windows, progress and dist.is_main())
        tps_before = _speed(model, eval_seq_len) if measure_speed else None
    ckpt = work / "calibration.safetensors" if work is not None else None
    if ckpt is not None and not resume:
        if dist.is_main():
            _start_fresh(work)
        dist.barrier()  # no rank may find the old checkpoints before rank 0 removed them
    with _timed(seconds, "calibration pass"):
        calib = run_calibration(model, blocks, progress=progress, checkpoint=ckpt)  # resumes a partial checkpoint
    selection: dict = {}
    with _timed(seconds, "selection"):
        masks = select_masks(model, blocks, budget, method, calib=calib, multiple_of=multiple_of, steps=steps,
                             seed=seed, work_dir=work, resume=resume, progress=progress,
                             hypernetwork_options=hypernetwork_options, train_blocks=train_blocks,
                             val_blocks=val_blocks, report=selection)
    refit_info = None
    if refit != "off":
        with _timed(seconds, "refit"):
            if refit == "auto" and val_blocks is not None and not sharded:
                refit_info = choose_refit(model, masks, blocks, val_blocks, progress=progress)
            else:
                refit_info = refit_pruned_inputs(model, masks, blocks, damping=refit_damping, progress=progress,
                                                 target=full_model if sharded else None)
            refit_info["mode"] = refit
    config = model.config
    if sharded:
        device = next(model.parameters()).device
        model = full_model  # None on ranks > 0: they are done once the masks are chosen
    with _timed(seconds, "compaction"):
        if model is not None:
            compact(model, masks)
            if sharded:
                model.to(device)
    after = param_report(model) if model is not None else None  # None: a sharded run's rank > 0
    with _timed(seconds, "eval after"):
        ppl_after = _evaluate(model, tokenizer, eval_after, eval_seq_len, eval_windows, progress)
        tps_after = _speed(model, eval_seq_len) if measure_speed else None
    for name, v in ppl_after.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"pruned model has non-finite perplexity on {name}")
    name = model_name or getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
    report = PruneReport(
        model=str(name), method=method, ratio=ratio, ratio_of=ratio_of,
        options=dict(seq_len=seq_len, calibration=calibration if isinstance(calibration, str) else "tokens",
                     calibration_windows=int(blocks.shape[0]), steps=steps if method == "hypernetwork" else 0,
                     train_windows=int(train_blocks.shape[0]) if learns else 0,
                     val_windows=0 if val_blocks is None else int(val_blocks.shape[0]),
                     multiple_of=multiple_of, seed=seed, eval_windows=eval_windows, eval_seq_len=eval_seq_len,
                     hypernetwork=dict(hypernetwork_options or {}) if learns else None, refit=refit_info),
        params_before={"total": before.total, "decoder_linear": before.decoder_linear},
        params_after={"total": after.total if after else None,
                      "decoder_linear": after.decoder_linear if after else None,
                      **budget.describe(masks.widths())},
        widths=masks.widths(), full_widths=before.full_widths,
        perplexity_before=ppl_before, perplexity_after=ppl_after,
        tokens_per_second_before=tps_before, tokens_per_second_after=tps_after, seconds=seconds,
        masks=masks.to_dict(),
        selection={k: selection[k] for k in ("steps", "start_step", "train_seconds", "best_step", "best_val_loss",
                                             "val_history", "threshold") if k in selection})
    return model, report
