"""A checkpoint file: format + version + the fingerprint of the run that wrote it.

One safetensors file, written atomically (:func:`dip_ext.files.atomic_save_safetensors`; a kill leaves the old
file whole), no pickle. Its header holds ``format`` = ``<name>.v<version>`` and ``json``: the loop's metadata,
which always records ``fingerprint``, a flat-or-nested JSON dict of everything that decides the checkpoint's
content (options, digests of the model and the windows, the world size ...). Reading refuses, each with a
ValueError that says what to do: an unreadable file, a foreign one, one of another version of this format (named,
with why when known), and, on resume, one whose fingerprint differs from this run's, naming every differing key
with both values (:func:`dip_ext.files.fingerprint_differences`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from .. import distributed as dist
from ..files import PathLike, atomic_save_safetensors, fingerprint_differences, read_safetensors

__all__ = ["CheckpointFormat"]

Loaded = tuple[dict[str, torch.Tensor], dict]


@dataclass(frozen=True)
class CheckpointFormat:
    """One kind of checkpoint file.

    ``name`` and ``version``: the ``format`` tag ``<name>.v<version>``; raise the version whenever the layout or
    the fingerprint of a file changes, so an older file is refused by name instead of misread. ``what``: the file
    in words for messages ("hypernetwork checkpoint"); ``remedy``: what the user can do with a file that is
    refused. ``refused``: ``{format tag: why}`` of formats this release recognises but does not read (the reason
    replaces the generic "written by an older dip_ext").
    """

    name: str
    version: int
    what: str
    remedy: str = "remove it or use another work folder"
    refused: Mapping[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """The ``format`` header value of this version's files."""
        return f"{self.name}.v{self.version}"

    def write(self, path: PathLike, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
        """Writes ``tensors`` and the JSON-safe ``meta`` (which records ``fingerprint``; ``format`` is added) to
        ``path`` atomically."""
        meta = {"format": self.tag, **meta}
        atomic_save_safetensors(path, tensors, {"format": self.tag, "json": json.dumps(meta)})

    def read(self, path: PathLike) -> Loaded:
        """``(tensors, meta)`` of the file at ``path``; ValueError saying why it is not one this version reads."""
        header, meta, tensors = read_safetensors(path, self.what, self.remedy)
        fmt = header.get("format")
        if fmt != self.tag:
            raise ValueError(self._refusal(path, fmt))
        if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), dict):
            raise ValueError(f"{path} is not a dip_ext {self.what} (it records no fingerprint); {self.remedy}")
        return tensors, meta

    def read_if_present(self, path: PathLike) -> Optional[Loaded]:
        """:meth:`read` on rank 0, its value (None when there is no file) or its error on every rank
        (:func:`dip_ext.distributed.read_on_main`)."""
        return dist.read_on_main(lambda: self.read(path) if Path(path).is_file() else None)

    def check_fingerprint(self, path: PathLike, saved: Mapping, now: Mapping, *, keys=None,
                          labels: Optional[Mapping[str, str]] = None) -> None:
        """ValueError unless the checkpoint's fingerprint ``saved`` and this run's ``now`` agree on every key (of
        ``keys``, default all; nested keys named ``outer.inner``); the message names each differing key with both
        values (``labels``: readable names of keys, e.g. of a digest)."""
        detail = fingerprint_differences(saved, now, keys, labels or {})
        if detail:
            raise ValueError(f"{path} was written by a different run and cannot be resumed ({detail}); "
                             f"{self.remedy}")

    def load_matching(self, path: PathLike, fingerprint: Mapping, *,
                      labels: Optional[Mapping[str, str]] = None) -> Optional[Loaded]:
        """The checkpoint at ``path`` on every rank (None when there is none), checked to be this run's:
        :meth:`read_if_present`, then :meth:`check_fingerprint` on every key."""
        loaded = self.read_if_present(path)
        if loaded is not None:
            self.check_fingerprint(path, loaded[1]["fingerprint"], fingerprint, labels=labels)
        return loaded

    def _refusal(self, path: PathLike, fmt) -> str:
        prefix = f"{self.name}.v"
        if fmt in self.refused:
            why = self.refused[fmt]
        elif isinstance(fmt, str) and fmt.startswith(prefix) and fmt[len(prefix):].isdigit():
            age = "an older" if int(fmt[len(prefix):]) < self.version else "a newer"
            why = f"it was written by {age} dip_ext"
        else:
            return f"{path} is not a dip_ext {self.what} (format {fmt!r}); {self.remedy}"
        return f"{path} cannot be resumed: {why} (format {fmt!r}; this version reads {self.tag!r}); {self.remedy}"
