"""Training checkpoints of the recovery stage: one safetensors file (tensors + a JSON header), written atomically.

Layout: ``param.<name>`` (the trainable tensors), ``best.<name>`` (the best step's copies, when kept),
``opt.<index>.<key>`` (AdamW's per-parameter state), ``rng`` (the torch CPU generator state) and the header key
``json``: step, curve, losses, optimizer hyper-parameters and a fingerprint that a resume must match. No pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .. import distributed as dist
from ..files import atomic_save_safetensors, fingerprint_differences, read_safetensors

__all__ = ["FORMAT", "save_training_state", "load_training_state", "optimizer_tensors", "load_optimizer"]

FORMAT = "dip_ext-recovery-1"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's state as flat tensors ``opt.<i>.<key>`` plus its param groups without the params (JSON-safe)."""
    sd = optimizer.state_dict()
    tensors = {}
    for i, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"opt.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Restores :func:`optimizer_tensors`' output into ``optimizer`` (same parameters, same order)."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Writes ``tensors`` and the JSON-safe ``meta`` to ``path`` atomically (a kill leaves the old file whole)."""
    atomic_save_safetensors(path, tensors, {"format": FORMAT, "json": json.dumps(meta)})


def load_training_state(path: Path) -> Optional[tuple[dict, dict[str, torch.Tensor]]]:
    """``(meta, tensors)`` of a checkpoint, or None when ``path`` does not exist. ValueError for a file that is not
    a recovery checkpoint."""
    if not path.is_file():
        return None
    header, meta, tensors = read_safetensors(path, "recovery checkpoint", "remove it or start without --resume")
    if header.get("format") != FORMAT or not isinstance(meta, dict):
        raise ValueError(f"{path} is not a dip_ext recovery checkpoint")
    return meta, tensors


def resume_state(path: Optional[Path], resume: bool, fingerprint: dict,
                 what: str) -> Optional[tuple[dict, dict[str, torch.Tensor]]]:
    """The checkpoint to continue from, as rank 0 reads it, on every rank: None without ``resume``, a ``path`` or a
    file there. ValueError when its fingerprint is not ``fingerprint`` (``what`` says which run wrote it)."""
    if not resume or path is None:
        return None
    loaded = dist.read_on_main(lambda: load_training_state(path))
    if loaded is not None and loaded[0].get("fingerprint") != fingerprint:
        detail = fingerprint_differences(loaded[0].get("fingerprint") or {}, fingerprint, labels=_LABELS)
        raise ValueError(f"{path} was written by {what} ({detail}); start without --resume (or remove it)")
    return loaded


#: readable names of the fingerprint entries that are digests or counts
_LABELS = {"student": "the pruned model's weights digest (another --model or pruning)",
           "world": "the number of ranks", "train": "the training windows (count, length, digest)",
           "val": "the held-out windows (count, digest)", "windows": "the windows (count, length)",
           "ids": "the windows' token-id sum"}
