"""The teacher's top-k next-token logits, computed once per training window and kept on disk.

With ``recover_teacher_topk = k > 0`` the distillation never runs the teacher during training: before the first
step, every training window the run will use (on this rank) goes through the teacher once, and for each predicted
position the k largest tempered logits ``z = logits / T``, their token ids and the log-normaliser
``logsumexp(z)`` over the whole vocabulary are written to one small safetensors file per window. Training then
reads them back and scores the student with :func:`dip_ext.recovery.losses.topk_kl_sum`: the KL between the
teacher's and the student's distributions coarsened to k + 1 outcomes (the k tokens, and "any other token"), exact
for the k tokens' probabilities because the normaliser is the full one.

Why: the teacher's weights and activations are needed only while the cache fills, so a device can hold the
student alone during training (the stage moves an accelerator-resident teacher to the CPU afterwards), and later
runs on the same windows and teacher (another learning rate, more steps, a resumed run) skip the teacher forward.
A file is written atomically and kept once complete, so an interrupted fill loses at most the window in progress.

Layout: ``<work_dir>/teacher-topk-<key>/w<index>.safetensors`` with ``values`` float32 ``[seq_len - 1, k]``,
``indices`` int32 ``[seq_len - 1, k]`` and ``lse`` float32 ``[seq_len - 1]``. ``<key>`` digests the teacher's
weights, the training windows, k and T, so a cache is never read for another teacher, text or setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..files import atomic_save_safetensors, read_safetensors
from ..model_state import model_device, model_digest
from ..training import digest

__all__ = ["TopKTargets", "TeacherTopK", "cache_key"]


@dataclass
class TopKTargets:
    """The cached teacher targets of a micro-batch of ``b`` windows of ``s`` tokens: ``values`` float32
    ``[b, s-1, k]`` (tempered logits z = logits / T of the k most likely next tokens), ``indices`` int64
    ``[b, s-1, k]`` (their token ids) and ``lse`` float32 ``[b, s-1]`` (logsumexp of z over the full vocabulary)."""

    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor


def cache_key(teacher: nn.Module, train: torch.Tensor, k: int, temperature: float) -> str:
    """16 hex characters identifying a cache (:func:`dip_ext.training.digest`): the teacher's weights digest, the
    training windows' tokens, k, T."""
    return digest(f"{model_digest(teacher)}|{k}|{float(temperature)!r}|{tuple(train.shape)}|", train)


class TeacherTopK:
    """The on-disk cache of one teacher's top-k targets over one set of training windows (see the module doc).

    ``folder``: where the per-window files live (created on :meth:`fill`); ``train``: the training windows
    ``[n, seq_len]`` int64 the indices refer to; ``k`` >= 1 and below the vocabulary size; ``temperature`` > 0.
    """

    def __init__(self, folder, train: torch.Tensor, k: int, temperature: float):
        self.folder = Path(folder)
        self.train = train
        self.k = int(k)
        self.temperature = float(temperature)

    @classmethod
    def for_teacher(cls, work_dir, teacher: nn.Module, train: torch.Tensor, k: int,
                    temperature: float) -> "TeacherTopK":
        """The cache of ``teacher`` on ``train`` under ``work_dir`` (its folder named by :func:`cache_key`).
        ValueError when k is not below the teacher's vocabulary size."""
        vocab = int(teacher.get_output_embeddings().weight.shape[0])
        if not 1 <= k < vocab:
            raise ValueError(f"recover_teacher_topk must be between 1 and the vocabulary size - 1 ({vocab - 1}), "
                             f"got {k} (0 runs the teacher at every step instead)")
        return cls(Path(work_dir) / f"teacher-topk-{cache_key(teacher, train, k, temperature)}", train, k,
                   temperature)

    def path(self, index: int) -> Path:
        """The file of training window ``index``."""
        return self.folder / f"w{int(index):06d}.safetensors"

    def missing(self, indices: Iterable[int]) -> list[int]:
        """The distinct window indices among ``indices`` whose file is not written yet, in first-seen order."""
        return [i for i in dict.fromkeys(int(i) for i in indices) if not self.path(i).exists()]

    @torch.no_grad()
    def fill(self, teacher: nn.Module, indices: Iterable[int], *, micro_batch: int = 1,
             progress: bool = True) -> int:
        """Runs ``teacher`` (frozen; eval mode for the call) over the windows ``indices`` not cached yet, in
        micro-batches of ``micro_batch``, and writes one file per window. Returns how many windows it computed.

        An FSDP-sharded teacher's forward is a collective: every rank then runs as many micro-batches as the rank
        with the most windows to fill (the extra forwards' outputs are dropped), so ranks call it in step."""
        todo = self.missing(indices)
        rounds = -(-len(todo) // micro_batch)
        if dist.is_sharded(teacher):
            rounds = max(dist.all_gather_object(rounds))
        if rounds == 0:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        device = model_device(teacher)
        was_training = teacher.training
        teacher.eval()
        try:
            with tqdm(total=len(todo), desc="teacher top-k", unit="window", disable=not progress) as bar:
                for start in range(0, rounds * micro_batch, micro_batch):
                    chunk = todo[start:start + micro_batch]
                    if not chunk:  # a sharded teacher's forward is a collective: join the other ranks' rounds
                        teacher(input_ids=self.train[:1].to(device), use_cache=False)
                        continue
                    ids = self.train[chunk].to(device)
                    z = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float() / self.temperature
                    lse = torch.logsumexp(z, dim=-1)
                    values, top = z.topk(self.k, dim=-1)
                    for row, index in enumerate(chunk):
                        atomic_save_safetensors(self.path(index), {
                            "values": values[row], "indices": top[row].to(torch.int32), "lse": lse[row]})
                    bar.update(len(chunk))
        finally:
            teacher.train(was_training)
        return len(todo)

    def targets(self, indices: list[int], device: Optional[torch.device] = None) -> TopKTargets:
        """The stacked targets of the windows ``indices`` (each already filled), on ``device``. ValueError for a
        missing or damaged file, naming it."""
        rows = []
        for i in indices:
            path = self.path(i)
            if not path.exists():
                raise ValueError(f"teacher top-k cache {path} is missing: fill the cache before training")
            _, _, t = read_safetensors(path, "teacher top-k cache file", "delete it; it is rebuilt on the next run")
            expected = (int(self.train.shape[1]) - 1, self.k)
            if set(t) != {"values", "indices", "lse"} or tuple(t["values"].shape) != expected \
                    or tuple(t["indices"].shape) != expected or tuple(t["lse"].shape) != expected[:1]:
                raise ValueError(f"{path} does not hold top-{self.k} targets of {expected[0] + 1}-token windows; "
                                 "delete it; it is rebuilt on the next run")
            rows.append(t)
        return TopKTargets(values=torch.stack([r["values"] for r in rows]).to(device),
                           indices=torch.stack([r["indices"] for r in rows]).to(device=device, dtype=torch.int64),
                           lse=torch.stack([r["lse"] for r in rows]).to(device))
