"""Greedy decoding that a CUDA graph can capture, and a detector of host reads of device data.

:class:`DecodeSession` holds one model's decode state for one batch (a ``transformers.StaticCache`` and static
input tensors, all on the model's device) and advances it by tensor ops only, so one :meth:`DecodeSession.step`
can be captured once with :func:`capture_step` and replayed. :class:`HostSyncDetector` records the ops that read
device data back to the host (a synchronisation on CUDA, an error inside graph capture); it works on CPU tensors
too, so a CPU run proves a step has no data-dependent host reads. Works for dense and compacted models alike.

    session = DecodeSession(model, batch=8, prompt_len=128, max_len=256)
    session.prefill()
    graph = capture_step(session)          # CUDA only
    for _ in range(32):
        graph.replay()                     # session.ids holds each step's greedy tokens [8, 1]
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import StaticCache

__all__ = ["forward_kwargs", "HostSyncDetector", "DecodeSession", "capture_step"]


def forward_kwargs(model) -> dict:
    """How ``model.forward`` is called across transformers 5.x: ``{"cache_kw": name of the cache keyword
    ("cache" from 5.2x, "past_key_values" before), "logits_to_keep": whether it accepts ``logits_to_keep``}``."""
    params = inspect.signature(type(model).forward).parameters
    return {"cache_kw": "cache" if "cache" in params else "past_key_values",
            "logits_to_keep": "logits_to_keep" in params}


class HostSyncDetector(TorchDispatchMode):
    """While entered, records in ``seen`` (as ``str(op)``) every op that reads tensor data on the host.

    Those are the ops in :attr:`NAMES` (``.item()`` / ``bool(t)`` via ``_local_scalar_dense``, ``nonzero``,
    ``masked_select``, ...): a synchronisation on CUDA and an error inside CUDA-graph capture. Every op still runs
    unchanged. On CPU tensors it records the same ops, so a CPU run shows what a CUDA run would synchronise on.
    """

    NAMES = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.NAMES:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class DecodeSession:
    """Greedy decode state for one model and one batch, on the model's device and in its dtype.

    ``prompt [batch, prompt_len]``: random token ids (``torch.Generator`` seeded with ``seed``, drawn on the CPU).
    :meth:`prefill` runs the prompt through the model into the StaticCache of ``max_len`` positions and writes the
    greedy next tokens into ``ids [batch, 1]``. Each :meth:`step` feeds ``ids`` at positions ``pos [batch, 1]``
    with the additive attention mask ``mask [batch, 1, 1, max_len]`` (0 where attended, the dtype's minimum
    elsewhere), writes the next greedy tokens into ``ids`` and advances ``pos``, the cache position ``cp [1]`` and
    the mask, all in place by tensor ops: no host read, no new tensor the next step depends on, so a step can be
    captured into a CUDA graph and replayed. Passing the 4-D mask skips transformers' mask construction (whose
    checks read the device). ``steps_done`` counts eager steps (a caller replaying a graph adds its replays).
    The caller keeps ``prompt_len + steps <= max_len``; nothing checks it inside a step.
    """

    def __init__(self, model, batch: int, prompt_len: int, max_len: int, seed: int = 0):
        self.model, self.batch, self.prompt_len, self.max_len = model, batch, prompt_len, max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        kw = forward_kwargs(model)
        self.cache_kw, self.keep = kw["cache_kw"], ({"logits_to_keep": 1} if kw["logits_to_keep"] else {})
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        gen = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(self.device)
        self.neg = torch.finfo(self.dtype).min
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.full((batch, 1), prompt_len, dtype=torch.long, device=self.device)
        self.cp = torch.full((1,), prompt_len, dtype=torch.long, device=self.device)
        self.mask = torch.full((batch, 1, 1, max_len), self.neg, dtype=self.dtype, device=self.device)
        self.mask[..., :prompt_len] = 0.0
        self.steps_done = 0

    def _forward(self, ids, mask, pos):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self.cache_kw: self.cache}, **self.keep)
        return out.logits[:, -1]

    def prefill(self) -> None:
        """Runs the prompt (causal 4-D mask) into the cache; ``ids`` = the greedy token after the prompt."""
        P, L = self.prompt_len, self.max_len
        causal = torch.ones(P, L, dtype=torch.bool, device=self.device).tril()  # row i sees columns <= i
        mask = torch.zeros(P, L, dtype=self.dtype, device=self.device).masked_fill(~causal, self.neg)
        mask = mask.expand(self.batch, 1, P, L)
        pos = torch.arange(P, device=self.device).expand(self.batch, P)
        logits = self._forward(self.prompt, mask, pos)
        self.ids.copy_(logits.argmax(-1, keepdim=True))

    def step(self) -> None:
        """One greedy decode step, in place (capturable; see the class docstring)."""
        self.mask.index_fill_(-1, self.cp, 0.0)  # the new token sees itself
        logits = self._forward(self.ids, self.mask, self.pos)
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.cp.add_(1)
        self.steps_done += 1

    def cache_bytes(self) -> int:
        """Bytes held by the StaticCache's key and value tensors (0 before they are allocated)."""
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def capture_step(session: DecodeSession, warmup: int = 2, record: Optional[list] = None) -> "torch.cuda.CUDAGraph":
    """Captures one ``session.step()`` into a ``torch.cuda.CUDAGraph`` (CUDA only) and returns it.

    First runs ``warmup`` eager steps on a side stream, so everything a step creates lazily (the index sets'
    device copies, cuBLAS handles, the cache tensors) exists before capture; ``record`` (a list), if given,
    receives a clone of ``session.ids`` after each warm-up step. The captured step is recorded, not run: the
    session's tensors stay where the warm-up left them (``steps_done`` counts the capture as one step), and each
    ``graph.replay()`` then runs one step.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            session.step()
            if record is not None:
                record.append(session.ids.clone())
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        session.step()
    return graph
