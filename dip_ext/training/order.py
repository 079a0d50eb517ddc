"""The order in which a training loop sees its windows: seeded per-epoch shuffles, a function of the step only.

Step ``t`` of a run with global batch ``B`` takes positions ``t*B .. t*B + B - 1`` of the endless stream made of
one seeded random permutation of the ``n`` windows per epoch (pass over the windows). A resumed run therefore needs
only the step to continue the same order, and runs of any world size with the same global batch see the same
windows. Rank ``r`` of ``N`` takes positions ``r, r + N, r + 2N ...`` of the step's global batch (the rule of the
evaluation and calibration passes too, :func:`dip_ext.distributed.rank_batches`): the shares are disjoint, cover
the batch, and differ in size by at most one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import check_fields, option

__all__ = ["EpochOrder"]

#: epoch e of seed s is shuffled by the generator seeded with s * SEED_STRIDE + e: seeds a few apart never share
#: an epoch's permutation
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class EpochOrder:
    """The window order of one run: ``n`` training windows, ``batch`` windows per step (all ranks together),
    ``seed``. ValueError (naming the field) for ``n`` or ``batch`` below 1 or a non-integer."""

    n: int = option(help="training windows", minimum=1)
    batch: int = option(help="windows per step, all ranks together", minimum=1)
    seed: int = option(0, "seed of the per-epoch shuffles")

    def __post_init__(self):
        check_fields(self)

    def permutation(self, epoch: int) -> torch.Tensor:
        """``[n]`` int64: the order of the windows in pass ``epoch`` (0-based)."""
        key = self.seed * SEED_STRIDE + epoch
        # torch seeds are 64-bit: a key past the signed range wraps into it (every key inside keeps its stream)
        generator = torch.Generator().manual_seed(key if key < 2**63 else key % 2**63)
        return torch.randperm(self.n, generator=generator)

    def indices(self, step: int) -> list[int]:
        """The window indices of the global batch of (0-based) ``step``; ValueError for a negative step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        out, pos, end = [], step * self.batch, (step + 1) * self.batch
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            take = min(end - pos, self.n - offset)
            out += self.permutation(epoch)[offset:offset + take].tolist()
            pos += take
        return out

    def share(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Rank ``rank``'s windows of step ``step`` (see the module docstring); ValueError for a rank outside
        ``0 .. world_size - 1``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        return self.indices(step)[rank::world_size]
