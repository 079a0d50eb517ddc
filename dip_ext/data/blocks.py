"""Texts tokenized (cached) and cut into fixed-length windows, and window lengths a model can run."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from ..config import DEFAULT_SEQ_LEN
from ..files import atomic_write_bytes
from ..tokens import max_positions as _max_positions
from .cache import cache_dir, sha256_hex
from .texts import Text, describe, get_text

__all__ = ["needs_bos", "tokenize", "spread_indices", "too_short_message", "make_blocks", "get_blocks",
           "fit_seq_len"]

_TOKENS_FORMAT_VERSION = 1


def fit_seq_len(requested, config, *, default: int | None = None, what: str = "seq_len") -> int:
    """A window length (tokens) that ``config``'s model can run, checked before any work.

    ``requested`` None means "the default": ``default`` capped at the model's position limit
    (``max_position_embeddings``), so defaults adapt to short-context models. A requested length is
    returned unchanged when it fits; ValueError (naming ``what``, the length and the limit) when it is not
    an int >= 2 or exceeds the limit. ``config`` may be None (no limit known).
    """
    limit = _max_positions(config) if config is not None else None
    if requested is None:
        if default is None:
            raise ValueError(f"{what}: give a length or a default")
        requested = default if limit is None else min(default, limit)
    return _check_seq_len(requested, limit, what)


def _check_seq_len(seq_len, limit: int | None, what: str = "seq_len") -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"{what} must be an int >= 2, got {seq_len!r}")
    if limit is not None and seq_len > limit:
        raise ValueError(f"{what} {seq_len} is longer than the model's {limit} positions "
                         f"(max_position_embeddings); use {what} {limit} or less")
    return seq_len


def needs_bos(tokenizer, config=None) -> bool:
    """Whether each window should start with the BOS token.

    True when the tokenizer has a BOS token and either the model family needs it (Gemma) or the tokenizer
    itself prepends it (``add_bos_token``, or an encoded sample starts with it, as Llama-2/3 tokenizers
    do). SmolLM2's tokenizer adds no BOS: False.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    model_type = str(getattr(config, "disp_base_model_type", None) or getattr(config, "model_type", "") or "")
    if model_type.startswith("gemma"):
        return True
    if getattr(tokenizer, "add_bos_token", False):
        return True
    try:
        ids = tokenizer("a b", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer that cannot encode a sample: assume no BOS
        return False
    return len(ids) > 0 and ids[0] == bos


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        body = backend.to_str()
    else:
        body = repr(sorted(tokenizer.get_vocab().items()))
    head = f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"
    return sha256_hex(head + "|" + body)


def tokenize(tokenizer, text: str, cache: bool = True) -> torch.Tensor:
    """Token ids of ``text`` without special tokens: LongTensor ``[n_tokens]``.

    Cached on disk (``<cache>/tokens/<key>.npy``) under a key of the tokenizer (class, name, vocabulary
    size, its full serialization) and the text's hash, so every ``seq_len`` reuses one tokenization.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("cannot tokenize an empty text")
    path = None
    if cache:
        key = sha256_hex(f"v{_TOKENS_FORMAT_VERSION}|{_tokenizer_fingerprint(tokenizer)}|{sha256_hex(text)}")[:24]
        path = cache_dir() / "tokens" / f"{key}.npy"
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
            except (OSError, ValueError):
                pass  # a damaged cache file is rebuilt below
    # verbose=False: a whole text is longer than model_max_length by design; we cut it into windows.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("the tokenizer returned a batch for one text")
    if path is not None:
        buf = io.BytesIO()
        small = arr.astype(np.int32) if arr.size == 0 or arr.max() < 2**31 else arr
        np.save(buf, small, allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())
    return torch.from_numpy(arr)


def spread_indices(n: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced indices of ``range(n)``, first and last included (all of them when ``k >= n``)."""
    if k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long()


def too_short_message(what: str, n_tokens: int, seq_len: int, add_bos: bool) -> str:
    """The one message for a text shorter than one window: how many tokens are needed, how many there are."""
    step = seq_len - 1 if add_bos else seq_len
    fit = n_tokens + int(bool(add_bos))
    remedy = f"use a seq_len of {fit} or less, or a longer text" if fit >= 2 else "use a longer text"
    return (f"{what} has {n_tokens} token(s); one window of seq_len {seq_len} needs {step} text tokens"
            f"{' (after BOS)' if add_bos else ''}: {remedy}")


def make_blocks(ids: torch.Tensor, seq_len: int, n_blocks: int | None = None, add_bos: bool = False,
                bos_token_id: int | None = None, spread: bool = True, *, what: str = "the text") -> torch.Tensor:
    """Cut 1-D token ids into non-overlapping windows: LongTensor ``[n, seq_len]``.

    With ``add_bos`` each window is ``[bos] + seq_len - 1`` text tokens (so every text token in a window
    gets predicted), else ``seq_len`` text tokens. The ragged tail is dropped. When ``n_blocks`` is less
    than the number available, ``spread=True`` takes evenly spaced windows over the whole text (a more
    representative sample than its first pages), ``spread=False`` the first ones. Asking for more than
    exists returns what exists with a warning. A text shorter than one window raises ValueError saying how
    many tokens a window needs and how many ``what`` (the text's description) has.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if n_blocks is not None and (not isinstance(n_blocks, int) or n_blocks < 1):
        raise ValueError(f"n_blocks must be a positive int or None, got {n_blocks!r}")
    if add_bos and bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    step = seq_len - 1 if add_bos else seq_len
    available = ids.numel() // step
    if available == 0:
        raise ValueError(too_short_message(what, ids.numel(), seq_len, add_bos))
    n = available if n_blocks is None else min(n_blocks, available)
    if n_blocks is not None and n_blocks > available:
        warnings.warn(f"asked for {n_blocks} windows of {seq_len} tokens, the text has only {available}",
                      stacklevel=2)
    which = spread_indices(available, n) if spread else torch.arange(n)
    body = ids[: available * step].view(available, step)[which]
    if add_bos:
        body = torch.cat([torch.full((n, 1), int(bos_token_id), dtype=torch.long), body], dim=1)
    return body.contiguous()


def get_blocks(tokenizer, name: str, split: str = "calibration", seq_len: int = DEFAULT_SEQ_LEN,
               n_blocks: int | None = None, add_bos: bool | None = None, spread: bool = True,
               max_positions: int | None = None) -> torch.Tensor:
    """The text ``name``/``split`` tokenized into windows: LongTensor ``[n, seq_len]`` (int64 token ids).

    ``add_bos=None`` decides from the tokenizer (:func:`needs_bos`). See :func:`make_blocks` for how
    windows are chosen and :func:`get_text` for names and splits. Token ids are cached on disk (not for a
    :class:`Text`). ``max_positions``: the model's position limit (``dip_ext.tokens.max_positions(config)``);
    a longer ``seq_len`` raises ValueError before the text is read. A text shorter than one window raises
    ValueError saying how many tokens are needed and how many there are.
    """
    if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                      or max_positions < 1):
        raise ValueError(f"max_positions must be a positive int or None, got {max_positions!r}")
    _check_seq_len(seq_len, max_positions)
    if add_bos is None:
        add_bos = needs_bos(tokenizer)
    ids = tokenize(tokenizer, get_text(name, split), cache=not isinstance(name, Text))
    return make_blocks(ids, seq_len, n_blocks, add_bos, getattr(tokenizer, "bos_token_id", None), spread,
                       what=f"{describe(name)} (split {split!r})")
