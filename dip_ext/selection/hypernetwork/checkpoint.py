"""Hypernetwork training checkpoints: the file format, the fingerprint of the run that wrote one, the check that
a checkpoint belongs to this run, and the training state (hypernetwork, optimizer, noise RNG) it holds.

One safetensors file (:data:`CHECKPOINT_NAME`) of :data:`FORMAT` (:class:`dip_ext.training.CheckpointFormat`).
Tensors: ``hnet.*`` (the hypernetwork's state dict), ``opt.<i>.<key>`` (AdamW state), ``rng.noise`` (the Gumbel
noise generator), ``best.scores`` (the best export's flat logits, with validation). Header: ``format`` =
``FORMAT.tag`` and ``json``: step, batch position, the fingerprint, the warm start's digest, best step and
validation history, world size, wall time. The layout is that of earlier releases' v2 files, whose fingerprint
lacks only ``space`` (see below), so those resume.

The fingerprint records everything that decides the checkpoint's content: the model (family, dims, its prunable
space (:meth:`dip_ext.space.PrunableSpace.as_dict`, the family's, optional structures included), heads,
vocabulary, dtype and a digest of its weights: :func:`dip_ext.model_state.model_digest`), the budget, the seed,
``multiple_of``, the global batch, the training and validation windows (:func:`dip_ext.training.digest` of their
token ids), every hypernetwork option that shapes training (from the options object,
:func:`dip_ext.options.as_dict`) and the learning-rate schedule. A run that prunes KV groups (``budget.heads``)
also records ``prune_heads``, ``kv_ratio`` and ``kv_groups_kept`` (its hypernetwork has a ``kv_groups`` head);
a run without them records none of the three, as before, and a checkpoint lacking them was written without heads.
A checkpoint lacking ``space`` was written before the fingerprint recorded it, when every family's space was the
built-in one its other entries (family, dims, weights) already pin down: it is compared without it.
A resume is refused with a ValueError naming each difference; the schedule is compared by the learning rates
the checkpoint already used (:func:`dip_ext.selection.hypernetwork.schedule.first_lr_difference`). Checkpoints
of format ``v1`` (no weight digest) are refused: nothing in them shows which model wrote them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...files import fingerprint_differences
from ...masks import uniform_dims
from ...model_state import model_digest
from ...space import PrunableSpace
from ...training import CheckpointFormat, load_optimizer_state, optimizer_state, tensor_fingerprint
from ..budget import Budget
from .schedule import LrSchedule, first_lr_difference

__all__ = ["CHECKPOINT_NAME", "FORMAT", "run_fingerprint", "read_checkpoint", "check_resumable",
           "state_tensors", "restore_state"]

CHECKPOINT_NAME = "hypernetwork.ckpt.safetensors"
FORMAT = CheckpointFormat(
    "dip_ext.hypernetwork-checkpoint", 2, "hypernetwork checkpoint",
    remedy="use another checkpoint_dir or remove the file",
    refused={"dip_ext.hypernetwork-checkpoint.v1": "it was written by an older dip_ext whose checkpoints do not "
             "record the model's weights, so it cannot be checked against this model"})
#: fingerprint keys of the learning-rate schedule: compared by the rates they give, not key by key
_SCHEDULE_KEYS = ("lr", "lr_schedule", "schedule_steps", "decay_steps")
#: fingerprint keys of KV-group pruning, recorded only when it is on; these values where a fingerprint lacks them
_HEADS_DEFAULTS = {"prune_heads": False, "kv_ratio": None, "kv_groups_kept": None, "heads_multiple_of": 1}


def run_fingerprint(model: nn.Module, space: PrunableSpace, budget: Budget, options: dict, schedule: LrSchedule,
                    train_windows: torch.Tensor, val_windows: Optional[torch.Tensor], *, seed: int,
                    multiple_of: int, global_batch: int, weights: bool = True) -> dict:
    """The JSON-safe dict a checkpoint of this run records (see the module docstring).

    ``space``: the model's prunable space (its family's, optional structures included; ``ffn`` is recorded where
    it is the built-in layout, else None).
    ``options``: the hypernetwork options that shape training (the trainer passes its config's fields without
    the ones that do not: the step count, which the schedule covers, and the checkpoint interval).
    ``weights=False`` records None for the weight digest (a run that writes no checkpoint needs none; for an
    FSDP-sharded model the digest gathers every parameter once).
    """
    cfg = model.config
    dtype = next((str(p.dtype) for p in model.parameters()), None)
    dims = uniform_dims(space)
    return {"model_type": getattr(cfg, "model_type", "?"), "num_layers": space.num_layers, "hidden": space.hidden,
            "ffn": None if dims is None else dims.ffn, "space": space.as_dict(),
            "heads": getattr(cfg, "num_attention_heads", None),
            "kv_heads": getattr(cfg, "num_key_value_heads", None), "head_dim": getattr(cfg, "head_dim", None),
            "vocab": getattr(cfg, "vocab_size", None), "dtype": dtype,
            "weights": model_digest(model) if weights else None,
            "ratio": budget.ratio, "ratio_of": budget.ratio_of, "target_linear": budget.target_linear,
            **({"prune_heads": True, "kv_ratio": budget.kv_ratio, "kv_groups_kept": budget.kv_groups_kept,
                "heads_multiple_of": budget.heads_multiple_of} if budget.heads else {}),
            "seed": int(seed), "multiple_of": int(multiple_of), "batch_size": int(global_batch),
            **options, **schedule.record(),
            "train_windows": tensor_fingerprint(train_windows), "val_windows": tensor_fingerprint(val_windows)}


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """``(tensors, meta)`` of the checkpoint at ``path``; ValueError saying why a file is not one this version
    resumes (unreadable, foreign, or an older format)."""
    return FORMAT.read(path)


def check_resumable(path: Path, meta: dict, fingerprint: dict, option_defaults: dict) -> None:
    """Raises ValueError unless the checkpoint ``meta`` (read from ``path``) was written by this run.

    ``fingerprint``: this run's (:func:`run_fingerprint`); ``option_defaults``: the options' defaults, which
    a checkpoint written before an option existed ran with (KV-group keys default to pruning none). Every
    differing key is named with both values.
    """
    saved = {**_HEADS_DEFAULTS, **option_defaults, **meta["fingerprint"]}
    now = {**_HEADS_DEFAULTS, **option_defaults, **fingerprint}
    saved.setdefault("space", now.get("space"))  # written before the space was recorded: see the module docstring
    FORMAT.check_fingerprint(path, saved, now, keys=(set(saved) | set(now)) - set(_SCHEDULE_KEYS))
    try:
        old = LrSchedule.from_record(saved)
    except ValueError as e:
        raise ValueError(f"{path}: corrupt learning-rate schedule in the checkpoint "
                         f"({fingerprint_differences(saved, now, _SCHEDULE_KEYS)}; {e})") from None
    step = int(meta["step"])
    differs = first_lr_difference(old, LrSchedule.from_record(now), step)
    if differs is not None:
        raise ValueError(f"{path} was written by a different run and cannot be resumed: its learning rate at step "
                         f"{differs} differs from this run's ({fingerprint_differences(saved, now, _SCHEDULE_KEYS)})")
    if int(meta["position"]) != step * int(now["batch_size"]):
        raise ValueError(f"{path}: batch position {meta['position']} does not match step {step}")


def state_tensors(hnet: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    """The training state as checkpoint tensors (``hnet.*``, ``opt.<i>.<key>``, ``rng.noise``), on the CPU."""
    tensors = {f"hnet.{k}": v.detach().cpu().contiguous() for k, v in hnet.state_dict().items()}
    tensors.update(optimizer_state(opt)[0])
    tensors["rng.noise"] = gen.get_state()
    return tensors


def restore_state(tensors: dict, hnet: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    """Loads :func:`state_tensors`' output into ``hnet``, ``opt`` (its state on the hypernetwork's device, its
    hyper-parameters the trainer's own) and ``gen``."""
    hnet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("hnet.")})
    load_optimizer_state(opt, tensors)
    gen.set_state(tensors["rng.noise"])
