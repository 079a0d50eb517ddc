"""Writing files so that an interruption never leaves half of one: every checkpoint and cache goes through here.

A write goes to a temporary file in the target's folder, is flushed and fsync'ed, and replaces the target with
``os.replace`` (atomic on POSIX and Windows): a reader sees the old content or the new one, never a mix, and a
process killed at any moment leaves at most a stray ``.tmp-*`` file, which the next write of the same target
does not read. Files and folders made here get the permissions ``open`` / ``mkdir`` would give them under the
process's umask (``tempfile`` alone makes them private to the owner, and a server running as another user could
not read a saved model).
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

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_save_safetensors", "read_safetensors", "read_json",
           "honour_umask", "fingerprint_differences"]


def read_json(path, missing: str):
    """The JSON value in the file ``path``. FileNotFoundError with the message ``missing`` when there is no such
    file; ValueError naming the file when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None

PathLike = Union[str, os.PathLike]


def _current_umask() -> int:
    try:  # Linux reports it without changing it; os.umask can only be read by setting it (racy with threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: PathLike, *, directory: bool = False) -> None:
    """Gives ``path`` the mode a plain ``open`` (0666) or ``mkdir`` (0777) would under the current umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_current_umask())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file, fsync, replace); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
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


def fingerprint_differences(saved: Mapping, now: Mapping, keys=None, labels: Mapping[str, str] = {}) -> str:
    """``"key: checkpoint A vs now B, ..."`` for every key (of ``keys``, default all) whose values differ between
    a checkpoint's fingerprint ``saved`` and this run's ``now``; nested mappings are compared key by key (named
    ``outer.inner``). ``labels`` gives a key a readable name (e.g. a digest of weights). Empty when they agree."""
    def flat(d: Mapping, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(now)
    names = sorted(set(a) | set(b)) if keys is None else sorted(
        k for k in set(a) | set(b) if k in keys or k.split(".", 1)[0] in keys)
    return ", ".join(f"{labels.get(k, k)}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in names
                     if a.get(k) != b.get(k))
