"""The training kit: the mechanics every training loop of dip_ext shares, one job per module.

- :mod:`.order`: :class:`EpochOrder`, the seeded per-epoch shuffle of the training windows and each rank's share;
- :mod:`.optimizer`: an optimizer's state as flat tensors and back (:func:`optimizer_state`,
  :func:`load_optimizer_state`);
- :mod:`.digest`: :func:`digest`, the one short content hash of tensors and strings (and
  :func:`tensor_fingerprint`, a tensor's shape and digest);
- :mod:`.checkpoint`: :class:`CheckpointFormat`, a checkpoint file = format + version + the run's fingerprint,
  written atomically, refused naming the format of an older file or each fingerprint key of another run;
- :mod:`.best`: :class:`BestState`, the lowest held-out loss so far and a snapshot of the state behind it;
- :mod:`.trainable`: :func:`requires_grad_only` (exactly these parameters train, every flag restored on exit),
  :func:`snapshot` and :func:`copy_into` (named tensors out of and back into parameters).

Its users: the hypernetwork :class:`~dip_ext.selection.hypernetwork.Trainer`, distillation and block-wise
reconstruction (:mod:`dip_ext.recovery`) and the calibration pass's checkpoint (:mod:`dip_ext.calibration`).
"""

from .best import BestState
from .checkpoint import CheckpointFormat
from .digest import digest, tensor_fingerprint
from .optimizer import load_optimizer_state, optimizer_state
from .order import EpochOrder
from .trainable import copy_into, requires_grad_only, snapshot

__all__ = ["EpochOrder", "optimizer_state", "load_optimizer_state", "digest", "tensor_fingerprint",
           "CheckpointFormat", "BestState", "requires_grad_only", "snapshot", "copy_into"]
