"""Thin helpers on ``torch.distributed`` for data-parallel mask learning (torchrun / accelerate launch).

Nothing here is a transport of its own: every collective is a ``torch.distributed`` one (gloo for CPU tensors,
NCCL for CUDA tensors). Every helper degrades to a no-op / identity when no process group is initialised, so
single-process code calls them unconditionally.

Launch contract: ``torchrun`` and ``accelerate launch`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` initialises the default process group from them
(and does nothing when they are absent, i.e. a plain ``python -m dip_ext`` run).

Failure contract: a rank that raises inside :func:`fail_fast` prints ``dip_ext: rank R failed: ...`` and
leaves with exit code 1 at once (``os._exit``: no atexit handlers that could block in a collective). torchrun
then stops the other workers and exits non-zero. Peers blocked in a collective under another launcher are
released by the process group timeout (``DIP_EXT_DIST_TIMEOUT`` seconds, default 1800: long enough for
rank 0 to evaluate and save a large model while the others wait at the final barrier).
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Optional, TypeVar

import torch

__all__ = ["is_distributed", "rank", "world_size", "local_rank", "is_main", "launched_distributed",
           "init_from_env", "is_sharded", "all_reduce_sum_", "broadcast_object", "all_gather_object", "barrier",
           "check_same", "fail_fast", "read_on_main", "rank_batches", "Placement", "DEFAULT_TIMEOUT_S",
           "collective_device"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True when a default process group is initialised (any world size)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK`` from the launcher; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes files and reports."""
    return rank() == 0


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch, ...) set ``RANK`` and ``WORLD_SIZE``."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("DIP_EXT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"DIP_EXT_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"DIP_EXT_DIST_TIMEOUT must be > 0 seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def init_from_env(backend: Optional[str] = None, device: Optional[str | torch.device] = None) -> bool:
    """Initialises the default process group from the launcher's environment; returns whether one is active.

    Does nothing (returns False) when ``RANK`` / ``WORLD_SIZE`` are not set, and nothing more when a group is
    already initialised. ``backend``: None picks ``"nccl"`` when ``device`` is a CUDA device and ``"gloo"``
    otherwise. With NCCL the current CUDA device is set to ``cuda:LOCAL_RANK`` first (one GPU per process).
    The collective timeout is ``DIP_EXT_DIST_TIMEOUT`` seconds (default 1800).
    """
    if is_distributed():
        return True
    if not launched_distributed():
        return False
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("launched by torchrun / accelerate (RANK and WORLD_SIZE are set) but this torch "
                           "build has no torch.distributed")
    is_cuda = device is not None and torch.device(device).type == "cuda"
    if backend is None:
        backend = "nccl" if is_cuda else "gloo"
    kwargs = {}
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend nccl needs CUDA; use --device cpu (gloo) or a CUDA machine")
        torch.cuda.set_device(local_rank())
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(backend=backend, timeout=_timeout(), **kwargs)
    return True


def is_sharded(model) -> bool:
    """True when ``model`` is (or contains) an FSDP2-sharded module: its forward and backward are collectives,
    so every rank must run the same number of them (see :mod:`dip_ext.sharding`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())


def collective_device() -> torch.device:
    """Where tensors must be for this process group's collectives: the current CUDA device under NCCL (it reduces
    CUDA tensors only), else the CPU (gloo; CUDA tensors would be staged, slowly)."""
    if is_distributed() and "nccl" in str(_dist().get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: Iterable[Optional[torch.Tensor]]) -> None:
    """Sums each tensor over all ranks, in place (None entries are skipped); no-op without a process group.

    Tensors of one dtype are packed into a single flat buffer on the collective device (one collective per
    dtype, not per tensor), reduced, and copied back, so tensors may live on any device and have any shape.
    Every rank must pass tensors of the same shapes and dtypes in the same order. Sums are identical on all
    ranks (the collective returns one result), though their rounding may differ from a one-process sum.
    """
    tensors = [t for t in tensors if t is not None]
    if world_size() == 1 or not tensors:
        return
    dev = collective_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(dev) for t in group])
        _dist().all_reduce(flat)
        start = 0
        for t in group:
            n = t.numel()
            t.detach().copy_(flat[start:start + n].view_as(t))
            start += n


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; keep it small-ish). Identity without a process group."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    _dist().broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Waits for every rank; no-op without a process group."""
    if world_size() > 1:
        if "nccl" in str(_dist().get_backend()):
            _dist().barrier(device_ids=[torch.cuda.current_device()])
        else:
            _dist().barrier()


def check_same(value: Any, what: str) -> None:
    """Raises RuntimeError on every rank unless ``value`` (small, picklable, comparable) is equal on all."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values[1:]):
        raise RuntimeError(f"{what} differ across ranks ({values}); the ranks went out of sync")


@contextmanager
def fail_fast(exit_code: int = 1, brief: tuple = ()):
    """Turns an exception on one rank into a clear, immediate non-zero exit of that process.

    Without a process group (or world size 1) the exception propagates unchanged. With peers, the failing
    rank prints ``dip_ext: rank R failed: <error>`` (and the traceback) to stderr and calls
    ``os._exit(exit_code)``: its peers are either stopped by the launcher (torchrun stops every worker once
    one fails) or see a broken collective / the process group timeout, instead of waiting for a collective
    the failed rank will never join. ``KeyboardInterrupt`` / ``SystemExit`` are handled the same way.
    Exceptions of the types in ``brief`` (user errors such as a bad argument) get the one line only, no
    traceback.
    """
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - every failure must end this rank, not leave peers hanging
        if world_size() == 1:
            raise
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        if not isinstance(e, brief):
            sys.stderr.write(traceback.format_exc())
        sys.stderr.write(f"dip_ext: rank {rank()} failed: {type(e).__name__}: {msg}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(exit_code)


def read_on_main(read: Callable[[], T], *, errors: tuple = (ValueError,)) -> T:
    """``read()`` called on rank 0 only; every rank returns its value, or raises its error.

    For files only rank 0 is sure to see (checkpoints it wrote, the output folder): the others receive the
    value (pickled, keep it small-ish), so every rank continues from the same state. An exception of a type in
    ``errors`` raised by ``read`` on rank 0 is raised on every rank as a ValueError with the same message (any
    other exception ends rank 0, and :func:`fail_fast` the job). Without a process group: ``read()``.
    """
    if world_size() == 1:
        return read()
    payload = None
    if is_main():
        try:
            payload = ("ok", read())
        except errors as e:
            payload = ("error", str(e))
    kind, value = broadcast_object(payload)
    if kind == "error":
        raise ValueError(value)
    return value


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rank_batches(n: int, batch_size: int, *, lockstep: bool) -> list[Optional[list[int]]]:
    """The windows this rank processes, batch by batch: rank ``r`` of ``N`` takes windows ``r, r + N, ...``.

    With ``lockstep`` (an FSDP-sharded model, whose forwards are collectives) every rank gets as many batches as
    the busiest one: the missing ones are None, meaning "run a filler forward and keep nothing of it".
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    world = world_size()
    mine = list(range(rank(), n, world))
    batches: list[Optional[list[int]]] = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    if lockstep and world > 1:
        most = _ceil_div(_ceil_div(n, world), batch_size)  # rank 0's count: it has the most windows
        batches += [None] * (most - len(batches))
    return batches


@dataclass(frozen=True)
class Placement:
    """Where a run's model lives: one process, data-parallel ranks holding whole copies, or FSDP shards.

    The pipeline's stages receive this instead of asking ``torch.distributed`` themselves. ``kind``:
    ``"single"`` (no process group, or one process), ``"data_parallel"`` (every rank holds the whole model and
    takes a share of the windows; sums are all-reduced) or ``"fsdp"`` (the frozen model is sharded: every
    forward is a collective, so ranks run forwards in lockstep; see :mod:`dip_ext.sharding`).
    """

    kind: Literal["single", "data_parallel", "fsdp"]
    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, model=None) -> "Placement":
        """The placement of ``model`` in this process (sharded or not) and the current process group."""
        world = world_size()
        if model is not None and is_sharded(model):
            return cls("fsdp", rank(), world)
        return cls("data_parallel" if world > 1 else "single", rank(), world)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reads checkpoints, writes files and reports."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"
