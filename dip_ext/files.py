"""Writing files so that an interruption never leaves half of one: every checkpoint and cache goes through here.

A write goes to a temporary file in the target's folder, is flushed and fsync'ed, and replaces the target with
``os.replace`` (atomic on POSIX and Windows): a reader sees the old content or the new one, never a mix, and a
process killed at any moment leaves at most a stray ``.tmp-*`` file, which the next write of the same target
does not read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_save_safetensors", "read_safetensors"]

PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file, fsync, replace); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Optional[Mapping[str, str]] = None) -> None:
    """Saves ``tensors`` (moved to CPU, made contiguous) as a safetensors file at ``path``, atomically.

    ``metadata``: string keys and values stored in the file's header (safetensors' own limit).
    """
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata=dict(metadata) if metadata is not None else None)
    atomic_write_bytes(path, data)


def read_safetensors(path: PathLike, what: str, remedy: str) -> tuple[dict[str, str], dict, dict[str, torch.Tensor]]:
    """``(header metadata, the JSON object stored under its "json" key or None, tensors)`` of a safetensors file
    written by :func:`atomic_save_safetensors`. ValueError naming ``what`` and ``remedy`` for an unreadable file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header.get("json", "null"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable {what} ({e}); {remedy}") from None
    return header, meta, tensors
