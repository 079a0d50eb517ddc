"""The recovery stage's checkpoints: their formats (:class:`dip_ext.training.CheckpointFormat`) and the
fingerprints a resume must match.

Distillation (``distill.safetensors``): ``param.<name>`` (the trainable tensors), ``best.<name>`` (the best
step's copies, when kept), ``opt.<index>.<key>`` (AdamW's per-parameter state), ``rng`` (the torch CPU generator
state); JSON: step, curve, losses, the optimizer's hyper-parameters (with the schedule's), the best step, seconds.
Reconstruction (``reconstruct.safetensors``): ``layer.<i>.<name>`` of every fitted layer; JSON: layers done,
errors before / after, seconds. Files of the single format of earlier releases are refused by name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..distributed import Placement
from ..model_state import model_digest
from ..options import as_dict
from ..training import CheckpointFormat, tensor_fingerprint
from .config import RecoveryConfig

__all__ = ["DISTILL_FORMAT", "RECONSTRUCT_FORMAT", "LABELS", "distill_fingerprint", "reconstruct_fingerprint"]

#: what to do with a checkpoint that cannot be resumed
_REMEDY = "start without --resume (or remove it)"
#: the one recovery format of earlier releases (no format version of its own, a fingerprint without digests)
_OLDER = {"dip_ext-recovery-1": "it was written by an older dip_ext"}
DISTILL_FORMAT = CheckpointFormat("dip_ext.distill-checkpoint", 2, "distillation checkpoint", _REMEDY, _OLDER)
RECONSTRUCT_FORMAT = CheckpointFormat("dip_ext.reconstruct-checkpoint", 2, "reconstruction checkpoint", _REMEDY,
                                      _OLDER)

#: readable names of the fingerprint entries that are digests or counts
LABELS = {"student": "the pruned model's weights digest (another --model or pruning)",
          "world": "the number of ranks", "train": "the training windows (count, length, digest)",
          "val": "the held-out windows (count, digest)",
          "windows": "the reconstruction windows (count, length, digest)"}


def distill_fingerprint(student: nn.Module, train: torch.Tensor, val: Optional[torch.Tensor],
                        config: RecoveryConfig, placement: Placement) -> dict:
    """What decides a distillation checkpoint's content: the options (without how often the run scores or
    saves, which does not change its steps), the student's weights digest, the world size and the windows."""
    options = as_dict(config)
    for key in ("recover", "recover_val_every", "recover_checkpoint_every"):
        options.pop(key)
    return {"options": options, "student": model_digest(student), "world": placement.world_size,
            "train": tensor_fingerprint(train), "val": tensor_fingerprint(val)}


def reconstruct_fingerprint(student: nn.Module, windows: torch.Tensor, config: RecoveryConfig) -> dict:
    """What decides a reconstruction checkpoint's content: the student's weights digest, the windows it fits
    on, the reconstruction options and the seed."""
    return {"student": model_digest(student), "windows": tensor_fingerprint(windows),
            "epochs": config.recover_recon_epochs, "lr": config.recover_recon_lr, "seed": config.recover_seed}
