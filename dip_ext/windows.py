"""The calibration text cut into windows, and split into the calibration pass, training and held-out windows."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import data
from .tokens import check_windows

__all__ = ["CalibrationWindows", "calibration_windows", "split_calibration"]


@dataclass
class CalibrationWindows:
    """The calibration text's windows, each ``[n, seq_len]`` int64.

    ``calibration``: the calibration pass (Fisher scores, statistics, the refit's statistics); ``train``: every
    window a method may train on; ``val``: held-out windows (never trained on) for early stopping and for
    choosing the refit, or None.
    """

    calibration: torch.Tensor
    train: torch.Tensor
    val: Optional[torch.Tensor] = None


def calibration_windows(tokenizer, calibration: Union[str, torch.Tensor], seq_len: int, *,
                        config=None) -> torch.Tensor:
    """Every window of the calibration text: LongTensor ``[n, seq_len]``.

    ``calibration``: a text name (``"wiki"``, ``"ptb"``, ``"wikitext2"``, ``"file:PATH"``: its calibration
    split) tokenized by ``tokenizer``, a 1-D token stream (cut into ``seq_len`` windows, BOS first where the
    tokenizer wants it), or ready-made token windows (returned as they are after the check).
    ``config``: the model's config, to refuse windows longer than its positions or ids outside its vocabulary.
    """
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 1:  # a stream: cut into windows here
        bos = data.needs_bos(tokenizer, config) if tokenizer is not None else False
        blocks = data.make_blocks(calibration, seq_len, None, bos, getattr(tokenizer, "bos_token_id", None),
                                  what="the calibration tokens")
        return check_windows(blocks, "calibration token windows", config=config)
    if isinstance(calibration, torch.Tensor):
        return check_windows(calibration, "calibration token windows", config=config)
    if tokenizer is None:
        raise ValueError(f"calibration text {calibration!r} needs a tokenizer (pass tokenizer=...)")
    blocks = data.get_blocks(tokenizer, calibration, "calibration", seq_len, None)
    return check_windows(blocks, f"calibration windows of {calibration!r}", config=config)


def split_calibration(blocks: torch.Tensor, calibration_windows: Optional[int],
                      val_windows: int = 0) -> CalibrationWindows:
    """Splits calibration windows ``[n, seq_len]`` into the calibration pass, training and validation windows.

    Validation: ``val_windows`` windows evenly spaced over the text, at mid-stride positions; None when
    ``val_windows`` is 0 or the text has no more than ``val_windows`` windows (with a warning). Training: every
    other window. Calibration pass: ``calibration_windows`` of the training windows (None: all), evenly spaced,
    so nothing the early stopping scores on has shaped the masks. With ``val_windows=0`` the calibration pass
    gets the same windows as ``data.get_blocks(..., n_blocks=calibration_windows)``.
    """
    n = int(blocks.shape[0])
    val = None
    rest = blocks
    if val_windows > 0:
        if n > val_windows:
            val_idx = ((torch.arange(val_windows, dtype=torch.float64) + 0.5) * n / val_windows).long()
            keep = torch.ones(n, dtype=torch.bool)
            keep[val_idx] = False
            val, rest = blocks[val_idx], blocks[keep]
        else:
            warnings.warn(f"the calibration text has {n} windows, too few to hold out {val_windows} for "
                          f"validation: no early stopping, and --refit auto refits as --refit on", stacklevel=3)
    if calibration_windows is None:
        calibration_windows = int(rest.shape[0])
    if calibration_windows > rest.shape[0]:
        warnings.warn(f"asked for {calibration_windows} calibration windows, the text has only "
                      f"{rest.shape[0]}" + (" besides the validation windows" if val is not None else ""),
                      stacklevel=3)
    return CalibrationWindows(rest[data.spread_indices(rest.shape[0], calibration_windows)], rest, val)


def recovery_windows(tokenizer, train: torch.Tensor, calibration, text: Optional[str], cap: Optional[int],
                     seq_len: int, *, config=None) -> torch.Tensor:
    """The windows recovery trains on ``[n, seq_len]``: the calibration text's training windows ``train``, or
    every calibration-split window of ``text`` when it names another text than ``calibration``; then at most
    ``cap`` of them (evenly spaced; None: all)."""
    if text is not None and text != calibration:
        train = calibration_windows(tokenizer, text, seq_len, config=config)
    if cap is not None and cap < train.shape[0]:
        train = train[data.spread_indices(train.shape[0], cap)]
    return train
