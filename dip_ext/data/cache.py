"""Where dip_ext caches texts and token ids, and the hash that keys the cache."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

__all__ = ["cache_dir", "sha256_hex", "package_folders", "cached_wheels"]


def cache_dir() -> Path:
    """dip_ext's cache folder: ``$DIP_EXT_CACHE``, else ``$XDG_CACHE_HOME/dip_ext`` or ``~/.cache/dip_ext``.

    Not created here; writers create it."""
    env = os.environ.get("DIP_EXT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dip_ext"


def sha256_hex(data: bytes | str) -> str:
    """Hex sha256 of bytes, or of a string encoded as UTF-8 (lone surrogates kept)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def package_folders(name: str) -> list[Path]:
    """The folders of the installed package ``name``, found without running its ``__init__`` ([] when it is not
    installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    return [Path(loc) for loc in (spec.submodule_search_locations or [])] if spec is not None else []


def cached_wheels(project: str, version: str) -> list[Path]:
    """The ``project-*.whl`` files in :func:`cache_dir`, version ``version`` first, then by name."""
    return sorted(cache_dir().glob(f"{project}-*.whl"), key=lambda p: (f"{project}-{version}-" not in p.name, p.name))
