"""The hypernetwork as a registered selection method (``--method hypernetwork``), and its options class."""

from __future__ import annotations

import time

from ..base import SelectionInputs, SelectionResult
from ..oneshot import oneshot_masks
from .config import HypernetworkConfig
from .trainer import Trainer

__all__ = ["Hypernetwork", "HypernetworkConfig"]


class Hypernetwork:
    """The paper's learned masks, warm-started from :class:`~dip_ext.selection.OneShot` and early-stopped on the
    held-out windows (:class:`Trainer`); ``steps == 0`` returns the warm start itself. With ``budget.heads``
    (``--prune-heads`` / ``--kv-ratio``) it learns KV groups too, warm-started from the one-shot groups."""

    name = "hypernetwork"
    options_class = HypernetworkConfig
    prunes_heads = True

    def uses_validation(self, options: HypernetworkConfig) -> bool:
        return options.steps > 0

    def select(self, inputs: SelectionInputs, options: HypernetworkConfig) -> SelectionResult:
        if not isinstance(inputs, SelectionInputs):
            raise ValueError(f"inputs must be SelectionInputs, got {type(inputs).__name__}")
        if not isinstance(options, HypernetworkConfig):
            raise ValueError(f"options must be a HypernetworkConfig, got {type(options).__name__}")
        t0 = time.perf_counter()
        init = oneshot_masks(inputs.calibration, inputs.budget, inputs.multiple_of)
        if options.steps == 0:
            return SelectionResult(self.name, init, seconds=time.perf_counter() - t0)
        trainer = Trainer(inputs.model, inputs.train_windows, inputs.budget, options, init_masks=init,
                          val_windows=inputs.val_windows, checkpoint_dir=inputs.work_dir, resume=inputs.resume,
                          seed=inputs.seed, multiple_of=inputs.multiple_of, placement=inputs.placement,
                          progress=inputs.progress)
        masks, training = trainer.run()
        return SelectionResult(self.name, masks, seconds=time.perf_counter() - t0, training=training)
