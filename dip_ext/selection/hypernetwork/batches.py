"""The order in which the hypernetwork sees its training windows: seeded per-epoch shuffles, stateless.

Step ``t`` of a run with global batch ``B`` takes positions ``t*B .. t*B + B - 1`` of the endless stream made of
one seeded random permutation of the ``n`` windows per epoch; rank ``r`` of ``N`` trains on the ``r``-th share
of that global batch. A resumed run therefore needs only the step to continue the same order, and runs of any
world size with the same global batch see the same windows.
"""

from __future__ import annotations

import torch

__all__ = ["batch_indices"]


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """``[batch_size]`` int64 window indices of (0-based) ``step``; ValueError for a negative step or a
    non-positive ``batch_size`` / ``n``."""
    for name, value, low in (("step", step, 0), ("batch_size", batch_size, 1), ("n", n, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n)
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + epoch) % 2**63)
        perm = torch.randperm(n, generator=gen)
        take = min(batch_size - len(out), n - off)
        out.extend(perm[off:off + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.int64)
