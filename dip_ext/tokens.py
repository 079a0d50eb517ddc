"""Token windows: the one check every stage applies to the ``[n_windows, seq_len]`` LongTensors it is given."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["check_windows", "max_positions"]


def max_positions(config) -> Optional[int]:
    """The longest sequence a model of ``config`` can run (``max_position_embeddings``), or None if unbounded."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_windows(windows, name: str = "windows", *, config=None, min_len: int = 2,
                  allow_empty: bool = False) -> torch.Tensor:
    """Returns ``windows`` if it is a 2-D int64 tensor ``[n, seq_len]`` of token ids a model can score.

    Raises ValueError naming ``name`` when it is not a tensor, not 2-D int64, empty (unless ``allow_empty``),
    shorter than ``min_len`` tokens per window (a next-token loss needs 2), longer than the model's position
    limit, or holds ids outside ``[0, vocab_size)`` (``config``: the model's config, optional).
    """
    if not isinstance(windows, torch.Tensor):
        raise ValueError(f"{name} must be a LongTensor [n_windows, seq_len] of token ids, got {type(windows).__name__}")
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError(f"{name} must be a 2-D LongTensor [n_windows, seq_len] of token ids, got a "
                         f"{windows.dim()}-D {windows.dtype} tensor")
    if windows.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: no token windows")
    if windows.shape[1] < min_len:
        raise ValueError(f"{name} need at least {min_len} tokens per window, got {windows.shape[1]}")
    if config is not None:
        limit = max_positions(config)
        if limit is not None and windows.shape[1] > limit:
            raise ValueError(f"{name} have {windows.shape[1]} tokens per window, more than the model's "
                             f"{limit} positions (max_position_embeddings)")
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and windows.numel() and (int(windows.min()) < 0 or int(windows.max()) >= vocab):
            raise ValueError(f"{name} hold token ids outside [0, {vocab}) (tokenized for another model?)")
    return windows
