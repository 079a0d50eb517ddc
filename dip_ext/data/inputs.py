"""Calibration data in the forms users have: documents, chat conversations, tokenizer output, token ids.

:func:`calibration_tokens` turns each into token ids the pipeline cuts into windows, dropping padding: text by
name stays with :mod:`.texts` (``"wiki"``, ``"file:PATH"``, :class:`~.texts.Text`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CalibrationTokens", "calibration_tokens", "ACCEPTED"]

ACCEPTED = ("a text name (wiki, ptb, wikitext2, file:PATH) or dip_ext.data.Text, strings (documents), chat "
            "conversations (lists of {'role', 'content'} messages, or {'messages': [...]}), tokenizer output "
            "(a BatchEncoding or {'input_ids', 'attention_mask'}: padding is dropped), a 1-D token-id stream or "
            "token-id windows [n, seq_len]")


@dataclass(frozen=True)
class CalibrationTokens:
    """Token ids for calibration: ``tokens`` is a 1-D LongTensor stream (documents joined by the EOS token, cut
    into windows later) or 2-D LongTensor windows ``[n, seq_len]`` used as given; ``label`` names the data in
    reports and messages (in angle brackets, never a text name)."""

    tokens: torch.Tensor
    label: str


def _is_message(m: Any) -> bool:
    return isinstance(m, Mapping) and "role" in m and "content" in m


def _conversation(item: Any):
    """The messages of one conversation, or None when ``item`` is not one."""
    if isinstance(item, Mapping) and "messages" in item:
        item = item["messages"]
    if isinstance(item, (list, tuple)) and item and all(_is_message(m) for m in item):
        return list(item)
    return None


def _check_ids(ids: torch.Tensor, what: str) -> torch.Tensor:
    if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"calibration {what} must hold integer token ids, got {ids.dtype}")
    return ids.to(torch.long)


def _from_encoding(encoding: Mapping, tokenizer) -> CalibrationTokens:
    ids = encoding["input_ids"]
    ids = _check_ids(ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids), "input_ids")
    mask = encoding.get("attention_mask")
    if ids.dim() == 1:
        ids = ids[None]
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    rows = [row[keep.bool()] for row, keep in zip(ids, mask)]
    return CalibrationTokens(_joined(rows, tokenizer), f"<tokenizer output: {len(rows)} sequences, "
                                                       f"{int(mask.sum())} tokens without padding>")


def _joined(rows: list[torch.Tensor], tokenizer) -> torch.Tensor:
    """The rows end to end, the EOS token between two (where the tokenizer has one), as one 1-D stream."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    parts: list[torch.Tensor] = []
    for i, row in enumerate(r for r in rows if r.numel()):
        if i and eos is not None:
            parts.append(torch.tensor([eos], dtype=torch.long))
        parts.append(row.to(torch.long))
    if not parts:
        raise ValueError("the calibration data holds no tokens (every position is padding, or every text is empty)")
    return torch.cat(parts)


def _documents(texts: list[str], tokenizer, label: str) -> CalibrationTokens:
    if tokenizer is None:
        raise ValueError(f"calibration {label} need a tokenizer: pass tokenizer=...")
    rows = [torch.as_tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
    return CalibrationTokens(_joined(rows, tokenizer), f"<{label}>")


def _render(conversations: list[list], tokenizer) -> list[str]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("calibration chat conversations are rendered with the tokenizer's chat template, and "
                         + ("no tokenizer was given" if tokenizer is None else "this tokenizer has none")
                         + ": pass the conversations as strings (documents) instead")
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]


def calibration_tokens(value: Any, tokenizer=None) -> CalibrationTokens:
    """``value`` as calibration token ids (see :data:`ACCEPTED`; a text name is not handled here).

    Documents (an iterable of strings) are tokenized one by one without special tokens and joined with the
    tokenizer's EOS token; chat conversations are rendered with the tokenizer's chat template first; tokenizer
    output keeps only the positions its attention mask marks (no padding is ever calibrated on); token-id
    windows are kept as given, except that ids holding the tokenizer's pad id (when it is a token of its own, not
    its EOS, BOS or unknown token) are refused: pass the attention mask with them. Raises ValueError naming what
    was received and what is accepted.
    """
    if isinstance(value, str):
        raise ValueError(f"a string is a text name here; pass documents as a list of strings ({ACCEPTED})")
    if isinstance(value, torch.Tensor):
        ids = _check_ids(value, "token ids")
        if ids.dim() not in (1, 2):
            raise ValueError(f"calibration token ids must be 1-D (a stream) or 2-D [n, seq_len], got {ids.dim()}-D")
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        # a pad id shared with a real token (EOS, BOS, unknown) cannot tell padding apart: only a dedicated one
        special = {getattr(tokenizer, f"{t}_token_id", None) for t in ("eos", "bos", "unk")}
        if pad is not None and pad not in special and bool((ids == pad).any()):
            raise ValueError(f"calibration token ids contain the tokenizer's pad id {pad}: pass the tokenizer's "
                             "output with its attention_mask (a BatchEncoding) so the padding is dropped")
        shape = "x".join(str(n) for n in ids.shape)
        return CalibrationTokens(ids, f"<token ids {shape}>")
    if isinstance(value, Mapping) and "input_ids" in value:
        return _from_encoding(value, tokenizer)
    single = _conversation(value)
    if single is not None:
        return _documents(_render([single], tokenizer), tokenizer, "1 conversation")
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        items = list(value)
        if items and all(isinstance(t, str) for t in items):
            return _documents(items, tokenizer, f"{len(items)} documents")
        chats = [_conversation(c) for c in items]
        if items and all(c is not None for c in chats):
            return _documents(_render(chats, tokenizer), tokenizer, f"{len(chats)} conversations")
        kinds = sorted({type(t).__name__ for t in items}) or ["nothing"]
        raise ValueError(f"calibration got a {type(value).__name__} of {', '.join(kinds)}; accepted: {ACCEPTED}")
    raise ValueError(f"calibration got a {type(value).__name__}; accepted: {ACCEPTED}")
