"""The one short content hash of dip_ext's checkpoints and caches: which windows, masks or teacher a file is of."""

from __future__ import annotations

import hashlib
from typing import Optional, Union

import torch

__all__ = ["digest", "tensor_fingerprint"]

#: hex characters kept: 64 bits, plenty to tell runs apart, short enough to read in an error message
LENGTH = 16


def digest(*parts: Union[str, bytes, torch.Tensor]) -> str:
    """16 hex characters of the sha256 of ``parts`` fed in order, with nothing between them.

    A tensor contributes its raw bytes (on the CPU, contiguous, in its own dtype: not its shape, so a caller that
    must tell ``[2, 6]`` from ``[3, 4]`` adds the shape as a string), a string its UTF-8 bytes, bytes themselves.
    The same parts give the same digest in every process and release (checkpoints and cache folders are named
    by it). TypeError for any other part.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        elif isinstance(part, str):
            part = part.encode()
        elif not isinstance(part, bytes):
            raise TypeError(f"digest takes tensors, strings and bytes, got {type(part).__name__}")
        h.update(part)
    return h.hexdigest()[:LENGTH]


def tensor_fingerprint(t: Optional[torch.Tensor]) -> Optional[list]:
    """``[*shape, digest(t)]`` (e.g. ``[n_windows, seq_len, digest]`` of token windows), or None for None: what a
    checkpoint's fingerprint records of its training and held-out windows."""
    return None if t is None else [*(int(s) for s in t.shape), digest(t)]
