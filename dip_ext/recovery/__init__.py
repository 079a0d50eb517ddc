"""Recovery after pruning: train the compacted model back toward the dense one (DESIGN.md §5).

- :func:`recover` — the stage: block-wise reconstruction and / or distillation, chosen by :class:`RecoveryConfig`;
- :class:`RecoveryResult` — what it did (held-out curve, tokens, seconds), with ``markdown_lines()`` / ``plot()``;
- :mod:`.reconstruct`, :mod:`.distill`, :mod:`.losses`, :mod:`.lora`, :mod:`.checks`, :mod:`.checkpoint` — the parts.
"""

from .config import RECOVER_MODES, RecoveryConfig
from .result import RecoveryResult
from .stage import recover

__all__ = ["recover", "RecoveryConfig", "RecoveryResult", "RECOVER_MODES"]
