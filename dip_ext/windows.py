"""The calibration text cut into windows, and split into the calibration pass, training and held-out windows."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import data
from .mixtures import is_mixture, parse_mixture
from .tokens import check_windows

__all__ = ["CalibrationWindows", "calibration_windows", "split_calibration", "mixture_windows", "allocate",
           "recovery_windows", "run_windows", "self_written_count", "with_written"]


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
    #: a text mixture's windows per text: ``{name: {"calibration": n, "train": n, "val": n}}`` (None: one text)
    sources: Optional[dict] = None


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
    if is_mixture(calibration):
        return mixture_windows(tokenizer, calibration, seq_len, config=config).train
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


def allocate(weights: list[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` (summing to 1) by largest remainder: each share is within
    one of ``weight * total``; ties go to the earlier entry."""
    exact = [w * total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_windows(tokenizer, spec: str, seq_len: int, calibration_windows: Optional[int] = None,
                    val_windows: int = 0, *, config=None) -> CalibrationWindows:
    """The windows of a text mixture (``"wiki:0.5,ptb:0.3,file:notes.txt:0.2"``, :mod:`dip_ext.mixtures`),
    split as :func:`split_calibration` splits one text, with every part drawn from each text in proportion to
    its weight (within one window per part and text).

    The mixture has as many windows as the text with the fewest windows for its weight allows (all of that
    text's); each text's share, evenly spaced over it, is split on its own (its share of ``val_windows`` held
    out, its share of ``calibration_windows`` for the calibration pass), then the parts are concatenated text by
    text. Deterministic: no randomness is involved. ``sources`` records each text's counts.
    """
    entries = parse_mixture(spec)
    names, weights = [n for n, _ in entries], [w for _, w in entries]
    texts = [check_windows(data.get_blocks(tokenizer, n, "calibration", seq_len, None),
                           f"calibration windows of {n!r}", config=config) for n in names]
    total = min(int(t.shape[0] / w + 1e-9) for t, w in zip(texts, weights))
    shares = [min(c, t.shape[0]) for c, t in zip(allocate(weights, total), texts)]
    vals = allocate(weights, val_windows) if val_windows else [0] * len(names)
    passes = allocate(weights, calibration_windows) if calibration_windows is not None else [None] * len(names)
    parts, sources = [], {}
    for name, t, share, v, k in zip(names, texts, shares, vals, passes):
        part = split_calibration(t[data.spread_indices(t.shape[0], share)], k, v)
        parts.append(part)
        sources[name] = {"calibration": int(part.calibration.shape[0]), "train": int(part.train.shape[0]),
                         "val": 0 if part.val is None else int(part.val.shape[0])}
    vals_kept = [p.val for p in parts if p.val is not None]
    return CalibrationWindows(torch.cat([p.calibration for p in parts]), torch.cat([p.train for p in parts]),
                              torch.cat(vals_kept) if vals_kept else None, sources)


def run_windows(tokenizer, calibration: Union[str, torch.Tensor], seq_len: int, n_pass: int, val_windows: int, *,
                config=None) -> CalibrationWindows:
    """The windows of one pruning run: of the text or mixture named ``calibration``, or of given token windows /
    a token stream (then every window calibrates when ``n_pass`` asks for as many or more); ``n_pass`` windows for
    the calibration pass and ``val_windows`` held out (:func:`split_calibration`, :func:`mixture_windows`)."""
    if isinstance(calibration, str) and is_mixture(calibration):  # each part drawn from every text in proportion
        return mixture_windows(tokenizer, calibration, seq_len, n_pass, val_windows, config=config)
    blocks = calibration_windows(tokenizer, calibration, seq_len, config=config)
    given = isinstance(calibration, torch.Tensor)
    return split_calibration(blocks, None if given and n_pass >= blocks.shape[0] else n_pass, val_windows)


def self_written_count(fraction: float, n: int) -> int:
    """How many of ``n`` calibration-pass windows the dense model writes for ``calibration_self=fraction``: the
    nearest count, at most ``n - 1`` (one window at least stays the text's). UserWarning when a fraction > 0 comes
    to none (too few windows for it)."""
    written = min(int(fraction * n + 0.5), n - 1)
    if fraction > 0 and written == 0:
        warnings.warn(f"calibration_self {fraction:g} of {n} calibration-pass window(s) is no window: the pass reads "
                      "the text only (raise --calibration-windows or --calibration-self)", stacklevel=3)
    return written


def with_written(windows: CalibrationWindows, written: torch.Tensor, label: str) -> CalibrationWindows:
    """``windows`` whose calibration pass ends with the ``written`` windows ``[k, seq_len]`` (text the dense model
    wrote itself) in place of ``k`` of its own, the others kept evenly spaced over them; the training and held-out
    windows stay the text's. ``sources`` gains ``"self"`` (``label``: the text's name when it had no sources).
    ValueError when ``k`` is not below the calibration pass's windows or the window lengths differ."""
    cal, k = windows.calibration, int(written.shape[0])
    if not 0 < k < cal.shape[0] or written.shape[1:] != cal.shape[1:]:
        raise ValueError(f"written windows {tuple(written.shape)} cannot replace part of a calibration pass of "
                         f"{tuple(cal.shape)}")
    kept = data.spread_indices(int(cal.shape[0]), int(cal.shape[0]) - k)
    val = 0 if windows.val is None else int(windows.val.shape[0])
    sources, start = {}, 0
    for name, c in (windows.sources or {label: {"calibration": int(cal.shape[0]), "train": int(windows.train.shape[0]),
                                                "val": val}}).items():
        sources[name] = {**c, "calibration": int(((kept >= start) & (kept < start + c["calibration"])).sum())}
        start += c["calibration"]
    sources["self"] = {"calibration": k, "train": 0, "val": 0}
    return CalibrationWindows(torch.cat([cal[kept], written]), windows.train, windows.val, sources)


def recovery_windows(tokenizer, train: torch.Tensor, calibration, text: Optional[str], cap: Optional[int],
                     seq_len: int, *, config=None) -> torch.Tensor:
    """The windows recovery trains on ``[n, seq_len]``: the calibration text's training windows ``train``, or
    every calibration-split window of ``text`` when it names another text than ``calibration``; then at most
    ``cap`` of them (evenly spaced; None: all)."""
    if text is not None and text != calibration and is_mixture(text):
        mixed = mixture_windows(tokenizer, text, seq_len, cap, config=config)  # the cap drawn in proportion too
        return mixed.calibration
    if text is not None and text != calibration:
        train = calibration_windows(tokenizer, text, seq_len, config=config)
    if cap is not None and cap < train.shape[0]:
        train = train[data.spread_indices(train.shape[0], cap)]
    return train
