"""Training the hypernetwork against a frozen model: a :class:`Trainer` holding the run's state.

Data-parallel (a ``data_parallel`` / ``fsdp`` :class:`~dip_ext.distributed.Placement`, e.g. under torchrun):
every rank builds the Trainer with the same arguments. Step ``t`` draws one global batch of
``batch_size * world_size`` windows (:class:`dip_ext.training.EpochOrder`) and rank ``r`` trains on its share
(every ``world_size``-th window from the ``r``-th); the hypernetwork gradients (and the LM loss, for the log) are
averaged across ranks before the AdamW step. The Gumbel noise comes from the same seeded CPU generator on every
rank, so all ranks sample the same masks and keep identical hypernetworks; the exported masks are checked to be
equal on all ranks. Only rank 0 writes checkpoints (all ranks wait for it) and shows the progress bar; on resume
rank 0 reads the checkpoint and sends it to the others. The fingerprint records the GLOBAL batch, so a checkpoint
resumes under any world size with the same global batch. Wrap the caller in :func:`dip_ext.distributed.fail_fast`
so that an error on one rank ends the job instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ... import distributed as dist
from ...compaction import require_dense
from ...distributed import Placement
from ...families import adapter_for
from ...masking import MaskedModel, apply_masks
from ...masks import DispMasks
from ...model_state import frozen, model_device
from ...options import as_dict
from ...space import PrunableSpace
from ...tokens import check_windows
from ...training import BestState, EpochOrder, digest
from ..base import TrainingSummary
from ..budget import Budget
from ..slots import unflatten
from .checkpoint import CHECKPOINT_NAME, FORMAT, check_resumable, restore_state, run_fingerprint, state_tensors
from .config import HypernetworkConfig
from .export import ExportInfo, export_masks
from .losses import average_grads, check_loss, step_losses
from .network import HyperNetwork
from .validation import validation_loss

__all__ = ["Trainer", "StepLog"]

#: options that do not decide a checkpoint's content (steps: covered by the schedule's record)
_NOT_FINGERPRINTED = ("steps", "checkpoint_every", "batch_size", "lr", "lr_schedule", "decay_steps")


@dataclass(frozen=True)
class StepLog:
    """One training step: ``step`` (1-based), ``lm_loss`` (the KL with ``distill``; the global batch's mean),
    ``budget_loss``, ``kept_ratio`` (of the deterministic mask), ``expected_ratio`` (under the noise),
    ``seconds`` (wall time of the step, its validation and checkpoint included), ``val_loss`` (at validation
    steps, else None) and ``kv_kept_ratio`` (the deterministic mask's kept fraction of KV groups, with
    ``budget.heads``; else None)."""

    step: int
    lm_loss: float
    budget_loss: float
    kept_ratio: float
    expected_ratio: float
    seconds: float
    val_loss: Optional[float] = None
    kv_kept_ratio: Optional[float] = None


def _adamw(hnet: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    try:  # the fused kernel makes one pass over all head parameters
        return torch.optim.AdamW(hnet.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device / torch without the fused kernel
        return torch.optim.AdamW(hnet.parameters(), lr=lr, weight_decay=weight_decay)


def _checked_space(model, train_windows, budget, config, *, init_masks, val_windows, seed, multiple_of, placement,
                   checkpoint_dir, callback) -> PrunableSpace:
    """The model's prunable space (its family's, optional structures included), once every argument of
    :class:`Trainer` is checked (ValueError naming the bad one)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model must be a Hugging Face causal LM, got {type(model).__name__}")
    require_dense(model, "the hypernetwork")
    if not isinstance(config, HypernetworkConfig):
        raise ValueError(f"config must be a HypernetworkConfig, got {type(config).__name__}")
    space = adapter_for(model).space(model.config)
    check_windows(train_windows, "train_windows", config=model.config)
    if val_windows is not None:
        check_windows(val_windows, "val_windows", config=model.config)
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a dip_ext.selection.Budget (Budget.for_model(model, ratio)), "
                         f"got {type(budget).__name__}")
    bspace = adapter_for(budget.config).space(budget.config)
    if bspace != space:
        raise ValueError(f"budget was made for a model of {bspace}, this model is {space}")
    if init_masks is not None:
        if not isinstance(init_masks, DispMasks):
            raise ValueError(f"init_masks must be DispMasks or None, got {type(init_masks).__name__}")
        init_masks.validate(space)
        if init_masks.prunes_heads and not budget.heads:
            raise ValueError("init_masks prune KV groups but the budget does not (Budget.for_model(..., heads=True) "
                             "lets the hypernetwork learn them)")
        extra = [s for s in init_masks.structures if not budget.space.has(s)]
        if extra:
            raise ValueError(f"init_masks hold {extra}, which the budget does not prune")
    for name, value, low in (("seed", seed, 0), ("multiple_of", multiple_of, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if placement is not None and not isinstance(placement, Placement):
        raise ValueError(f"placement must be a dip_ext.distributed.Placement, got {type(placement).__name__}")
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise ValueError(f"checkpoint_dir {checkpoint_dir} exists and is not a directory")
    if callback is not None and not callable(callback):
        raise ValueError("callback must be callable or None")
    return space


class Trainer:
    """The hypernetwork of ``model`` trained on ``train_windows`` toward ``budget`` (Gao et al., NeurIPS 2024).

    Args:
        model: a dense Hugging Face causal LM of a supported family (any device / dtype; FSDP-sharded when
            ``placement.kind == "fsdp"``). While the trainer works it is in eval mode with ``requires_grad`` off
            (:func:`dip_ext.model_state.frozen`), restored afterwards; only the hypernetwork (float32, on the
            model's device) receives gradients.
        train_windows: ``[n, seq_len]`` int64 token ids (:func:`dip_ext.tokens.check_windows`).
        budget: :meth:`Budget.for_model` of this model. With ``budget.heads`` the hypernetwork also learns every
            layer's KV groups (a ``kv_groups`` head; the sampled group masks applied, the budget term counting
            them), with ``budget.kv_groups_kept`` a KV-cache term joins the budget term, and the export meets both
            targets (:func:`~dip_ext.selection.hypernetwork.export_masks`).
        config: the options (steps, learning rate and schedule, lam, temperature, offset, margin, ...).
        init_masks: warm start (e.g. the one-shot selection): heads set so ``logit + offset`` is ``+margin`` on
            kept and ``-margin`` on dropped dims before the first step (not on resume). With ``budget.heads``
            its ``kv_groups`` warm-start the KV-group head (masks without them: every group kept); masks with
            ``kv_groups`` need a budget with ``heads``.
        val_windows: held-out windows for early stopping: the export is scored by its mean LM loss on them at
            step 0 and every ``config.val_every`` steps (and the last), and :meth:`run` returns the best export.
        checkpoint_dir: folder of :data:`CHECKPOINT_NAME`, written every ``config.checkpoint_every`` steps and at
            the end. An existing checkpoint there is refused unless ``resume``; with ``resume`` the run continues
            from it exactly (checked to be this run's: see :mod:`.checkpoint`), or starts fresh if there is none.
        seed: hypernetwork initialisation, data order and Gumbel noise.
        multiple_of: the export's width rounding (:func:`dip_ext.selection.budget.fit_multiple`).
        placement: where the model lives (default :meth:`Placement.of` the model).
        progress: a tqdm bar (rank 0). callback: called with each :class:`StepLog` after that step and its
            checkpoint; may raise to stop the run.

    ValueError for any bad argument, before anything runs (a budget of a model of another prunable space, init
    masks that do not fit the model's space or hold structures the budget does not prune). ``space``: the budget's
    space, the structures the hypernetwork learns (its slots). State: ``step_index`` (steps taken), ``best`` (a
    :class:`dip_ext.training.BestState` whose state is the best export's flat logits ``scores``), ``log`` (the
    :class:`StepLog` of every step this trainer ran).
    """

    def __init__(self, model: nn.Module, train_windows: torch.Tensor, budget: Budget, config: HypernetworkConfig, *,
                 init_masks: Optional[DispMasks] = None, val_windows: Optional[torch.Tensor] = None,
                 checkpoint_dir: Union[str, os.PathLike, None] = None, resume: bool = False, seed: int = 0,
                 multiple_of: int = 1, placement: Optional[Placement] = None, progress: bool = True,
                 callback: Optional[Callable[[StepLog], None]] = None):
        family_space = _checked_space(model, train_windows, budget, config, init_masks=init_masks,
                                  val_windows=val_windows, seed=seed, multiple_of=multiple_of, placement=placement,
                                  checkpoint_dir=checkpoint_dir, callback=callback)
        self.model, self.budget, self.config = model, budget, config
        self.train_windows = train_windows.cpu()
        self.val_windows = None if val_windows is None else val_windows.cpu()
        self.init_masks, self.seed, self.multiple_of = init_masks, seed, multiple_of
        self.placement = placement if placement is not None else Placement.of(model)
        self.progress, self.callback = bool(progress), callback
        self.device = model_device(model)
        self.global_batch = config.batch_size * self.placement.world_size
        self.schedule = config.schedule()
        self.order = EpochOrder(int(self.train_windows.shape[0]), self.global_batch, seed)
        self.path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        self._resume_requested = bool(resume)
        options = {k: v for k, v in as_dict(config).items() if k not in _NOT_FINGERPRINTED}
        if self.val_windows is None:
            options.pop("val_every")  # without validation windows it changes nothing
        self._option_defaults = {f.name: f.default for f in dataclasses.fields(config) if f.name in options}
        self.fingerprint = run_fingerprint(model, family_space, budget, options, self.schedule, self.train_windows,
                                           self.val_windows, seed=seed, multiple_of=multiple_of,
                                           global_batch=self.global_batch, weights=self.path is not None)
        self._init_digest = None if init_masks is None else digest(json.dumps(init_masks.to_dict()))
        if self.placement.world_size > 1:  # ranks given other data or settings would train other hypernetworks
            dist.check_same((self.fingerprint, self._init_digest, config.steps, checkpoint_dir is None),
                            "run settings")
        self.space = budget.space  # the structures pruned: the hypernetwork's slots
        self.hnet = HyperNetwork(self.space, seed=seed).to(self.device)
        self.opt = _adamw(self.hnet, config.lr, config.weight_decay)
        self.gen = torch.Generator().manual_seed(seed + 2)  # the Gumbel noise; CPU so every device draws the same
        self.step_index = 0
        self.start_step = 0
        self.best = BestState()
        self.log: list[StepLog] = []
        self.export_info: Optional[ExportInfo] = None  # set by run()
        self._prepared = False
        self._masked: Optional[MaskedModel] = None

    # ---- state ------------------------------------------------------------------------------------------------

    def resume(self) -> bool:
        """Continues from the checkpoint in the checkpoint folder; returns False when there is none.

        ValueError when there is no checkpoint folder, the trainer has already stepped, or the checkpoint is
        not this run's (every difference named) or is beyond ``config.steps``.
        """
        if self.path is None:
            raise ValueError("resume() needs a checkpoint_dir")
        if self.step_index != 0 or self.log:
            raise ValueError("resume() must come before the first step")
        path = self.path
        loaded = FORMAT.read_if_present(path)
        self._prepared = True
        if loaded is None:
            self._warm_start()
            return False
        tensors, meta = loaded
        check_resumable(path, meta, self.fingerprint, self._option_defaults)
        if self._init_digest is not None and meta.get("init_masks") not in (None, self._init_digest):
            # Not an error: init_masks only shape step 0, and a recomputed one-shot selection may differ by a dim.
            warnings.warn("resuming a hypernetwork run warm-started from different init_masks; the warm start "
                          "only matters at step 0, so the checkpoint's state is used", stacklevel=2)
        start = int(meta["step"])
        if start > self.config.steps:
            raise ValueError(f"{path} is at step {start}, beyond steps={self.config.steps}; pass steps >= {start} "
                             f"(a run cannot go back) or use another checkpoint_dir")
        restore_state(tensors, self.hnet, self.opt, self.gen)
        self.best = BestState.from_checkpoint(tensors, meta)
        self.step_index = self.start_step = start
        return True

    def save(self) -> None:
        """Writes the checkpoint of the current step (rank 0; every rank waits for it). ValueError without a
        checkpoint folder."""
        if self.path is None:
            raise ValueError("save() needs a checkpoint_dir")
        if self.placement.is_main:
            meta = {"step": self.step_index, "position": self.step_index * self.global_batch,
                    "fingerprint": self.fingerprint, "init_masks": self._init_digest, "time": time.time(),
                    "world_size": self.placement.world_size, **self.best.meta()}
            FORMAT.write(self.path, {**state_tensors(self.hnet, self.opt, self.gen), **self.best.tensors()}, meta)
        dist.barrier()  # a peer that fails after this point leaves a checkpoint every rank had reached

    def _prepare(self) -> None:
        """Before the first step: an existing checkpoint is resumed (or refused without ``resume``), else the
        warm start is applied."""
        if self._prepared:
            return
        if self.path is not None:
            path = self.path
            if not self._resume_requested:
                loaded = FORMAT.read_if_present(path)
                if loaded is not None:
                    raise ValueError(f"{path} already holds a hypernetwork checkpoint (step {loaded[1].get('step')});"
                                     f" pass resume=True to continue it, or use another checkpoint_dir")
            else:
                self.resume()
                return
        self._prepared = True
        self._warm_start()

    def _warm_start(self) -> None:
        if self.init_masks is not None:
            self.hnet.warm_start(self.init_masks, offset=self.config.offset, margin=self.config.margin)

    @contextmanager
    def _session(self) -> Iterator[MaskedModel]:
        """The frozen model with mask hooks installed (re-entrant)."""
        if self._masked is not None:
            yield self._masked
            return
        with frozen(self.model), apply_masks(self.model, None) as masked:
            self._masked = masked
            try:
                yield masked
            finally:
                self._masked = None

    # ---- steps ------------------------------------------------------------------------------------------------

    def step(self) -> StepLog:
        """One optimisation step (the next one, ``step_index + 1``); returns its log entry (no validation, no
        checkpoint: :meth:`run` adds those). FloatingPointError if the loss is not finite."""
        cfg, world, rank = self.config, self.placement.world_size, self.placement.rank
        t0 = time.perf_counter()
        with self._session() as masked:
            self._prepare()
            step = self.step_index
            ids = self.train_windows[self.order.share(step, rank, world)].to(self.device)
            out = step_losses(self.hnet, masked, self.model, ids, self.budget, self.gen, lam=cfg.lam,
                              temperature=cfg.temperature, offset=cfg.offset, distill=cfg.distill)
            lm_loss = out.lm_loss
            loss = lm_loss + out.budget_loss
            if world == 1:
                check_loss(loss, lm_loss, step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                lm_loss = average_grads(self.hnet, lm_loss, world)
                check_loss(lm_loss + out.budget_loss, lm_loss, step)  # the same verdict on every rank
            for group in self.opt.param_groups:
                group["lr"] = self.schedule.at(step)
            self.opt.step()
            self.step_index = step + 1
        return StepLog(step + 1, lm_loss.item(), out.budget_loss.item(), out.kept_ratio, out.expected_ratio,
                       time.perf_counter() - t0, kv_kept_ratio=out.kv_kept_ratio)

    def validate(self) -> Optional[float]:
        """Scores the current export on the validation windows and offers it as the best (at ``step_index``);
        returns the loss, or None without validation windows."""
        if self.val_windows is None:
            return None
        with self._session() as masked:
            self._prepare()
            with torch.no_grad():
                flat = self.hnet.flat_logits()
            loss = validation_loss(unflatten(flat, self.space), masked, self.model, self.val_windows,
                                   self.budget, offset=self.config.offset, multiple_of=self.multiple_of,
                                   device=self.device)
        self.best.offer(self.step_index, loss, lambda: {"scores": flat.detach().float().cpu()})
        return loss

    def export(self) -> tuple[DispMasks, ExportInfo]:
        """The masks of the best-scoring export (with validation) or of the current hypernetwork."""
        with torch.no_grad():
            logits = (self.hnet() if self.best.state is None
                      else unflatten(self.best.state["scores"], self.space))
            return export_masks(logits, self.budget, offset=self.config.offset, multiple_of=self.multiple_of)

    def run(self) -> tuple[DispMasks, TrainingSummary]:
        """Trains up to ``config.steps`` (resuming / refusing a checkpoint as configured), validating and
        checkpointing on schedule; returns the exported masks (identical on every rank) and the run's summary."""
        cfg, t_start = self.config, time.perf_counter()
        with self._session():
            self._prepare()
            if self.step_index == 0 and self.best.step is None:
                self.validate()
            bar = tqdm(total=cfg.steps, initial=self.step_index, desc="hypernetwork", unit="step",
                       disable=not self.progress or not self.placement.is_main or self.step_index >= cfg.steps,
                       dynamic_ncols=True)
            try:
                while self.step_index < cfg.steps:
                    t0 = time.perf_counter()
                    entry = self.step()
                    last = entry.step == cfg.steps
                    val = self.validate() if entry.step % cfg.val_every == 0 or last else None
                    if self.path is not None and (entry.step % cfg.checkpoint_every == 0 or last):
                        self.save()
                    entry = dataclasses.replace(entry, val_loss=val, seconds=time.perf_counter() - t0)
                    self.log.append(entry)
                    post = dict(lm=f"{entry.lm_loss:.3f}", kept=f"{entry.kept_ratio:.3f}",
                                target=f"{self.budget.target_ratio:.3f}")
                    if entry.kv_kept_ratio is not None:
                        post["kv"] = f"{entry.kv_kept_ratio:.3f}"
                    if self.best.step is not None:
                        post["val"] = f"{self.best.loss:.3f}@{self.best.step}"
                    bar.set_postfix(**post, refresh=False)
                    bar.update(1)
                    if self.callback is not None:
                        self.callback(entry)
            finally:
                bar.close()
        masks, info = self.export()
        if self.placement.world_size > 1:
            dist.check_same(digest(json.dumps(masks.to_dict())), "exported masks")
        self.export_info = info
        summary = TrainingSummary(
            steps=cfg.steps, start_step=self.start_step, seconds=time.perf_counter() - t_start,
            best_step=self.best.step, best_val_loss=self.best.loss if self.best.step is not None else None,
            val_history=list(self.best.history), threshold=info.threshold)
        return masks, summary
