"""The pruning pipeline as explicit stages: windows → calibrate → select → refit → compact → evaluate.

:class:`Pruner` holds one run. Each stage is a method that runs the stages before it if they have not run yet,
keeps its typed result and returns it, so a caller (or a benchmark) can run the stages one by one, look at each
result, and stop anywhere::

    pruner = Pruner(model, tokenizer, PruneConfig(ratio=0.3, method="oneshot"))
    masks = pruner.select().masks          # runs windows() and calibrate() first
    pruner.refit(); model = pruner.compact().model
    after = pruner.evaluate()              # perplexity / speed of the compacted model

:func:`dip_ext.prune_and_compact` is ``Pruner(...).run()``.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from . import data
from . import distributed as dist
from .calibration import CalibrationResult, blocks_sha, run_calibration
from .compaction import compact, require_dense
from .config import DEFAULT_SEQ_LEN, EvalConfig, PruneConfig, RefitConfig
from .recovery import RecoveryConfig, RecoveryResult, recover
from .recovery.checks import check_sharded_teacher, recovery_texts
from .recovery.self_text import self_text_windows
from .distributed import Placement
from .eval import PrefillComparison, compare_prefill, perplexity
from .families import adapter_for
from .model_state import model_digest, weight_itemsize
from .outputs import prepare_work_dir
from .params import ParamReport, param_report
from .refit import RefitResult, run_refit
from .report import PruneReport
from .run_configs import RunConfigs
from .selection import Budget, SelectionInputs, SelectionResult, get_method, method_options as resolve_method_options
from .selection.budget import heads_by_default
from .sharding import replicate_from_main
from .windows import CalibrationWindows, recovery_windows, run_windows, self_written_count, with_written

__all__ = ["Pruner", "Evaluation", "CompactionResult"]

_CALIBRATION_CHECKPOINT = "calibration.safetensors"
_RECOVERY_FOLDER = "recovery"


@dataclass
class Evaluation:
    """Perplexity per text (``{name: ppl}``) of the model as it was when :meth:`Pruner.evaluate` ran (``label``
    "before": dense, "after": compacted) and, after, its prefill speed against the dense model's (interleaved
    pairs, :func:`dip_ext.eval.compare_prefill`; None when not measured)."""

    label: str
    perplexity: dict[str, float] = field(default_factory=dict)
    tokens_per_second: Optional[float] = None
    speed: Optional[PrefillComparison] = None


@dataclass
class CompactionResult:
    """The compacted model (None on the ranks > 0 of a sharded run, which only help choose the masks, until
    :meth:`Pruner.recover` replicates it to them) and the parameter counts before and after."""

    model: Optional[nn.Module]
    params_before: ParamReport
    params_after: Optional[ParamReport]


class Pruner:
    """One DISP pruning run of ``model`` (a dense Hugging Face causal LM of a supported family), in stages.

    ``config``: what to remove and how (:class:`PruneConfig`); ``method_options``: the selection method's own
    options object (e.g. ``HypernetworkConfig``; None: its defaults); ``refit`` (:class:`RefitConfig`) and
    ``evaluation`` (:class:`EvalConfig`). ``calibration_tokens``: data instead of the text ``config.calibration``
    (:func:`dip_ext.data.calibration_tokens`: windows, documents, chats...; ``calibration_windows`` of it calibrate).
    ``calibration``: the result of an earlier calibration pass of the same model over the same windows (e.g.
    one pass serving several ratios), used instead of a new pass; :meth:`calibrate` checks that its windows
    and weights are this run's.
    ``work_dir``: where stages checkpoint (the calibration pass and a training method, in a folder named after
    it); without ``resume`` its named checkpoints are removed first (:func:`dip_ext.outputs.prepare_work_dir`:
    a non-empty folder dip_ext did not create is refused), with ``resume`` every stage continues from what is
    there (and refuses checkpoints of another model, text or options). ``full_model``: rank 0's whole dense copy of an
    FSDP-sharded ``model`` (see :mod:`dip_ext.sharding`): the masks are chosen on the sharded model in lockstep,
    the copy is compacted and returned; with recovery (``distill`` only) it is replicated to every rank and
    distilled data-parallel toward the sharded model.

    Every argument is checked here, before any work: ValueError (UnsupportedModelError for a family dip_ext does
    not support) naming the problem.
    """

    def __init__(self, model: nn.Module, tokenizer=None, config: Optional[PruneConfig] = None, *,
                 method_options: Any = None, refit: Optional[RefitConfig] = None,
                 recovery: Optional[RecoveryConfig] = None,
                 evaluation: Optional[EvalConfig] = None, calibration_tokens: Any = None,
                 calibration: Optional[CalibrationResult] = None,
                 work_dir: Optional[Union[str, os.PathLike]] = None, resume: bool = False, progress: bool = True,
                 model_name: Optional[str] = None, full_model: Optional[nn.Module] = None):
        self.config = config if config is not None else PruneConfig()
        self.refit_config = refit if refit is not None else RefitConfig()
        self.eval_config = evaluation if evaluation is not None else EvalConfig()
        self.recovery_config = recovery if recovery is not None else RecoveryConfig()
        for name, value, cls in (("config", self.config, PruneConfig), ("refit", self.refit_config, RefitConfig),
                                 ("evaluation", self.eval_config, EvalConfig),
                                 ("recovery", self.recovery_config, RecoveryConfig)):
            if not isinstance(value, cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
        self.method = get_method(self.config.method)
        self.method_options = resolve_method_options(self.config.method, method_options)
        require_dense(model, "pruning")
        sizes = [(st.axis, st.size) for layer in adapter_for(model).space(model.config).layers for st in layer
                 if not st.whole_units]  # whole-unit sets (KV groups, experts) are never rounded to multiple_of
        if self.config.multiple_of > max((n for _, n in sizes), default=0):
            widths = ", ".join(f"{a} {max(n for b, n in sizes if b == a)}" for a in dict.fromkeys(a for a, _ in sizes))
            raise ValueError(f"multiple_of {self.config.multiple_of} is larger than every width of the model "
                             f"({widths}): every set would be kept whole or removed")
        self.placement = Placement.of(model)
        if self.placement.sharded and self.placement.is_main and full_model is None:
            raise ValueError("model is sharded (FSDP): rank 0 must pass its full dense copy as full_model (the "
                             "model that gets compacted and saved)")
        if not self.placement.sharded and full_model is not None:
            raise ValueError("full_model is only for a sharded (FSDP) model; compact the model itself")
        self.recovery_config = self.recovery_config.resolved(next(model.parameters()).device, tokenizer=tokenizer
                                                             is not None, sharded_teacher=self.placement.sharded)
        if self.placement.sharded:  # the sharded model will be the recovery's teacher, and cannot write text
            check_sharded_teacher(self.recovery_config, self.placement.world_size)
            if self.config.calibration_self > 0:
                raise ValueError("calibration_self needs a whole dense model to write text: run it without FSDP")
        self.seq_len = data.fit_seq_len(self.config.seq_len, model.config, default=DEFAULT_SEQ_LEN, what="seq_len")
        self.eval_seq_len = data.fit_seq_len(self.eval_config.eval_seq_len, model.config, default=DEFAULT_SEQ_LEN,
                                             what="eval_seq_len")
        if self.config.prune_heads is None:  # the family's default, for a method that prunes groups
            heads = getattr(self.method, "prunes_heads", False) and heads_by_default(model)
            self.config = replace(self.config, prune_heads=bool(heads or self.config.kv_ratio is not None))
        self.budget = Budget.for_model(model, self.config.ratio, self.config.ratio_of,
                                       heads=self.config.prune_heads, kv_ratio=self.config.kv_ratio,
                                       heads_multiple_of=self.config.heads_multiple_of)
        if self.budget.heads and not getattr(self.method, "prunes_heads", False):
            raise ValueError(f"--method {self.method.name} does not prune KV groups: drop --prune-heads / --kv-ratio, "
                             "or use --method oneshot or hypernetwork")
        texts = self.eval_config.eval_text if self.eval_config.eval_windows != 0 else []
        given = None if calibration_tokens is None else data.calibration_tokens(calibration_tokens, tokenizer)
        calibration_text = self.config.calibration if given is None else None
        needs_tokenizer = list(texts) + [calibration_text] * (given is None)
        needs_tokenizer += recovery_texts(self.recovery_config, texts, calibration_text)
        if tokenizer is None and (needs_tokenizer or self.config.calibration_self > 0):
            raise ValueError(f"the texts {', '.join(needs_tokenizer)} need a tokenizer: pass tokenizer=... (or "
                             "calibration_tokens and evaluation=EvalConfig(eval_windows=0))" if needs_tokenizer else
                             "calibration_self needs the tokenizer (the dense model's samples start and end with its "
                             "tokens): pass tokenizer=..., or calibration_self=0")
        self.model, self.tokenizer, self.full_model, self.progress = model, tokenizer, full_model, progress
        self.calibration_tokens = None if given is None else given.tokens
        self.calibration_label = self.config.calibration if given is None else given.label
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or model.config.model_type
        self.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        self.work_dir = Path(work_dir) if work_dir is not None else None
        # self-written text is cached where the recovery reads it back: the work folder, else a folder of this run's
        self._scratch = tempfile.TemporaryDirectory() if self.config.calibration_self and work_dir is None else None
        self.text_cache = self.work_dir if self._scratch is None else Path(self._scratch.name)
        self.resume, self.resumed = bool(resume), False
        if self.work_dir is not None:
            self._prepare_work_dir()
        self.seconds: dict[str, float] = {}
        self.evaluations: dict[str, Evaluation] = {}
        self._windows: Optional[CalibrationWindows] = None
        self._calibration: Optional[CalibrationResult] = None
        self._given_calibration = calibration
        self._selection: Optional[SelectionResult] = None
        self._refit: Optional[RefitResult] = None
        self._refit_done = False
        self._compaction: Optional[CompactionResult] = None
        self._speed_reference: Optional[nn.Module] = None
        self._teacher: Optional[nn.Module] = None
        self._recovery: Optional[RecoveryResult] = None

    # ---- checks and bookkeeping ----------------------------------------------------------------------------

    def _prepare_work_dir(self) -> None:
        work, main = self.work_dir, self.placement.is_main
        checkpoints = (_CALIBRATION_CHECKPOINT, self.method.name, _RECOVERY_FOLDER)  # caches (self-text...) are not
        if main:  # without resume no stage may find an older run's checkpoints
            prepare_work_dir(work, resume=self.resume, checkpoints=checkpoints)
        self.resumed = dist.broadcast_object(self.resume and any((work / c).exists() for c in checkpoints)
                                             if main else None)
        dist.barrier()

    def _calibration_settings(self) -> dict:
        """What shaped the calibration pass, by option name (a resume with other values is refused naming them)."""
        val = self.windows().val
        return {"model": self.model_name, "dtype": self.dtype, "calibration": self.calibration_label,
                "seq_len": self.seq_len, "calibration_windows": self.config.calibration_windows,
                "val_windows": 0 if val is None else val.shape[0],
                **({"calibration_self": self.config.calibration_self} if self.config.calibration_self else {})}

    @contextmanager
    def _timed(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    # ---- stages --------------------------------------------------------------------------------------------

    def windows(self) -> CalibrationWindows:
        """The calibration text's windows: calibration pass, training, held-out (when the method or the refit
        asks for them)."""
        if self._windows is None:
            with self._timed("calibration data"):
                cfg, given = self.config, self.calibration_tokens is not None
                wants_val = (self.method.uses_validation(self.method_options) or self.refit_config.refit == "auto"
                             or self.recovery_config.recover != "off")
                val = cfg.val_windows if wants_val else 0
                self._windows = run_windows(self.tokenizer, self.calibration_tokens if given else cfg.calibration,
                                            self.seq_len, cfg.calibration_windows, val, config=self.model.config)
                if written := self_written_count(cfg.calibration_self, int(self._windows.calibration.shape[0])):
                    text = self_text_windows(self.model, self.tokenizer, self._windows.train, written,
                                             self.recovery_config, work_dir=self.text_cache, progress=self.progress)
                    self._windows = with_written(self._windows, text.windows, self.calibration_label)
        return self._windows

    def calibrate(self) -> CalibrationResult:
        """Fisher scores and activation statistics of the dense model on the calibration-pass windows."""
        if self._calibration is None and self._given_calibration is not None:
            given, windows = self._given_calibration, self.windows()
            if given.blocks_sha != blocks_sha(windows.calibration) or given.windows != windows.calibration.shape[0]:
                raise ValueError("the given calibration result was computed on other windows than this run's "
                                 "calibration pass (other text, seq_len, calibration_windows or val_windows?)")
            if given.model_sha is not None and given.model_sha != model_digest(self.model):
                raise ValueError("the given calibration result was computed on other weights than this model's")
            self._calibration = given
        if self._calibration is None:
            windows = self.windows()
            ckpt = self.work_dir / _CALIBRATION_CHECKPOINT if self.work_dir is not None else None
            with self._timed("calibration pass"):
                self._calibration = run_calibration(self.model, windows.calibration, progress=self.progress,
                                                    checkpoint=ckpt, placement=self.placement,
                                                    settings=self._calibration_settings())
        return self._calibration

    def select(self) -> SelectionResult:
        """The masks of the configured method, meeting the budget."""
        if self._selection is None:
            calib, windows = self.calibrate(), self.windows()
            work = self.work_dir / self.method.name if self.work_dir is not None else None
            inputs = SelectionInputs(self.model, self.budget, calib, windows.train, windows.val,
                                     multiple_of=self.config.multiple_of, seed=self.config.seed,
                                     placement=self.placement, work_dir=work, resume=self.resume,
                                     progress=self.progress)
            with self._timed("selection"):
                self._selection = self.method.select(inputs, self.method_options)
        return self._selection

    def refit(self) -> Optional[RefitResult]:
        """The least-squares refit of the dense weights under the chosen masks (None with ``refit="off"``)."""
        if not self._refit_done:
            masks, windows = self.select().masks, self.windows()
            if self.refit_config.refit != "off":
                self._keep_dense_copy()  # before the refit changes the dense weights in place
                with self._timed("refit"):
                    self._refit = run_refit(self.model, masks, windows.calibration, windows.val,
                                            self.refit_config.refit, self.refit_config.refit_damping,
                                            target=self.full_model, progress=self.progress,
                                            placement=self.placement)
            self._refit_done = True
        return self._refit

    def _keep_dense_copy(self) -> None:
        """Copies the dense model as loaded (once, before the refit or the compaction changes it in place) when
        it is needed: the recovery's teacher, and the reference the compacted model's speed is timed against in
        interleaved pairs (so load changes hit both alike). A sharded run's teacher is the sharded model itself."""
        keep = self.eval_config.speed or self.recovery_config.recover != "off"
        if not keep or self.placement.sharded or self._teacher is not None or self._compaction is not None:
            return
        self._teacher = copy.deepcopy(self.model)
        if self.eval_config.speed and self.placement.is_main:
            # the teacher may be cast to another dtype for the recovery: time against the dense original
            same = self.recovery_config.recover_teacher_dtype == "same"
            self._speed_reference = self._teacher if same else copy.deepcopy(self.model)

    def compact(self) -> CompactionResult:
        """The dense model compacted in place under the masks (after the refit)."""
        if self._compaction is None:
            masks = self.select().masks
            self.refit()
            dense = self.full_model if self.placement.sharded else self.model
            before = param_report(dense if dense is not None else self.model)
            self._keep_dense_copy()
            with self._timed("compaction"):
                if dense is not None:
                    compact(dense, masks)
                    if self.placement.sharded:
                        dense.to(next(self.model.parameters()).device)
            self._compaction = CompactionResult(dense, before, param_report(dense) if dense is not None else None)
        return self._compaction

    def recover(self) -> Optional[RecoveryResult]:
        """Trains the compacted model toward the dense one (:func:`dip_ext.recovery.recover`) on the calibration
        text's training windows (or ``recover_text``'s; ``recover_windows`` caps them), or on text the dense model
        writes itself from them (``recover_data``; cached in the work folder, kept across runs), early-stopped on
        the held-out ones; None with ``recover="off"``.

        Sharded: rank 0's compacted copy is first replicated to every rank
        (:func:`dip_ext.sharding.replicate_from_main`), which then distil it data-parallel toward the sharded
        dense model; every rank ends holding the same recovered model."""
        if self._recovery is None and (rc := self.recovery_config).recover != "off":
            model, windows = self.compact().model, self.windows()
            teacher, placement = self._teacher, self.placement
            if self.placement.sharded:
                model = replicate_from_main(model, next(self.model.parameters()).device)
                self._compaction.model, teacher, placement = model, self.model, Placement.of(model)
            work = self.work_dir / _RECOVERY_FOLDER if self.work_dir is not None else None
            with self._timed("recovery"):
                train = recovery_windows(self.tokenizer, windows.train, self.calibration_label, rc.recover_text,
                                         rc.recover_windows, self.seq_len, config=self.model.config)
                self._recovery = recover(model, teacher, train, windows.val, rc, work_dir=work, resume=self.resume,
                                         placement=placement, progress=self.progress, tokenizer=self.tokenizer,
                                         data_cache=self.text_cache)
            self._teacher = None  # the copy is not needed any more
        return self._recovery

    def evaluate(self) -> Evaluation:
        """Perplexity of the model now: "before" until :meth:`compact` ran, "after" until :meth:`recover` ran (with
        the prefill speed against the dense model when ``EvalConfig.speed``), then "recovered".

        Data-parallel: rank 0 evaluates, the other ranks return an empty Evaluation. Sharded: every rank scores
        "before" (its forwards are collectives, speed is not measured); rank 0 alone scores "after".
        """
        label = "recovered" if self._recovery is not None and self._recovery.chosen else (
            "after" if self._compaction is not None else "before")
        model = self._compaction.model if self._compaction is not None else self.model
        cfg = self.eval_config
        texts = list(cfg.eval_text) if cfg.eval_windows != 0 else []
        scores = self.placement.sharded and label == "before"
        if not (self.placement.is_main or scores) or model is None:
            texts = []
        result = Evaluation(label)
        with self._timed(f"eval {label}"):
            for name in texts:
                split = data.eval_split(name, None if self.calibration_tokens is not None else self.config.calibration)
                value = perplexity(model, self.tokenizer, name, seq_len=self.eval_seq_len, max_windows=cfg.eval_windows,
                                   progress=self.progress and self.placement.is_main, split=split)
                if label != "before" and not math.isfinite(value):
                    raise FloatingPointError(f"pruned model has non-finite perplexity on {name}")
                result.perplexity[name] = value
            if label == "after" and self._speed_reference is not None:
                result.speed = compare_prefill(self._speed_reference, model, seq_len=self.eval_seq_len)
                result.tokens_per_second = result.speed.pruned_tokens_per_second
                self._speed_reference = None
                if self.recovery_config.recover == "off":
                    self._teacher = None  # the dense copy is not needed any more
        self.evaluations[label] = result
        return result

    def run(self) -> tuple[Optional[nn.Module], PruneReport]:
        """Every stage not run yet, in order (the dense model is evaluated unless it was compacted already);
        returns ``(compacted model, report)``."""
        self.windows()
        if self._compaction is None and "before" not in self.evaluations:
            self.evaluate()
        self.compact()
        if "after" not in self.evaluations and self._recovery is None:
            self.evaluate()
        if self.recover() is not None and self._recovery.chosen:
            self.evaluate()
        return self._compaction.model, self.report()

    # ---- the report ----------------------------------------------------------------------------------------

    def report(self) -> PruneReport:
        """The report of the stages run so far (compaction must have run)."""
        compaction, selection, windows = self.compact(), self.select(), self.windows()
        after_eval = self.evaluations.get("after", Evaluation("after"))
        configs = RunConfigs(prune=self.config, refit=self.refit_config, evaluation=self.eval_config,
                             recovery=self.recovery_config, method_options=self.method_options)
        return PruneReport(
            model=str(self.model_name), configs=configs, calibration=self.calibration_label, seq_len=self.seq_len,
            eval_seq_len=self.eval_seq_len,
            windows={"calibration": int(windows.calibration.shape[0]),
                     "train": int(windows.train.shape[0]) if selection.training is not None else 0,
                     "val": 0 if windows.val is None else int(windows.val.shape[0]),
                     **({"sources": windows.sources} if windows.sources else {})},
            params_before=compaction.params_before, params_after=compaction.params_after, masks=selection.masks,
            budget=self.budget.describe(selection.masks.widths(), itemsize=weight_itemsize(self.model)),
            perplexity_before=self.evaluations.get("before", Evaluation("before")).perplexity,
            perplexity_after=after_eval.perplexity,
            perplexity_recovered=self.evaluations.get("recovered", Evaluation("recovered")).perplexity,
            speed=after_eval.speed, tokens_per_second_after=after_eval.tokens_per_second, seconds=dict(self.seconds),
            selection=selection.training, refit=self._refit, recovery=self._recovery, dtype=self.dtype,
            resumed=self.resumed)
