"""Perplexity on non-overlapping windows and prefill throughput.

Window convention (:func:`dip_ext.data.make_blocks`): without BOS a window is ``seq_len`` text tokens and
its first token is context only (``seq_len - 1`` predictions, the SparseGPT/Wanda convention); with BOS a
window is ``[bos] + seq_len - 1`` text tokens and every text token is predicted. Perplexity is
``exp(sum of token cross-entropies / number of predicted tokens)`` over all windows, summed in float64.

Every window length is checked against the model's position limit (``max_position_embeddings``) before any
forward: a longer one raises ValueError naming the limit.

Speed: :func:`compare_prefill` times a dense and a pruned model as interleaved pairs and reports the median
speed-up with its spread over the pairs; :func:`prefill_tokens_per_second` times one model alone.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data
from . import distributed as dist
from .config import DEFAULT_SEQ_LEN
from .model_state import frozen, model_device
from .tokens import check_windows, max_positions

__all__ = ["perplexity", "window_losses", "mean_window_loss", "prefill_tokens_per_second", "compare_prefill",
           "PrefillComparison", "DEFAULT_EVAL_SPLIT"]

# A built-in text is evaluated on its held-out part unless a split is given; a user's text (file:, Text) on
# all of it (dip_ext.data.eval_split decides).
DEFAULT_EVAL_SPLIT = "heldout"
#: perplexity's window length when none is given (capped at the model's position limit)
#: prefill measurements' sequence length when none is given (capped at the model's position limit)
DEFAULT_PREFILL_LEN = 256


def _limit(model) -> Optional[int]:
    config = getattr(model, "config", None)
    return max_positions(config) if config is not None else None


def _as_text(text_or_name: str):
    """A string argument as a text name or raw text (:class:`dip_ext.data.Text`)."""
    if isinstance(text_or_name, data.Text) or text_or_name.startswith("file:"):
        return text_or_name
    # A string with whitespace is raw text; without, a text name (so a typo is not scored as a one-word
    # text): dip_ext.data.Text(s) is the way to score any string as it is.
    return data.Text(text_or_name) if any(c.isspace() for c in text_or_name) else text_or_name


def _windows(model, tokenizer, text_or_name, seq_len, max_windows, add_bos, split) -> torch.Tensor:
    config = getattr(model, "config", None)
    if isinstance(text_or_name, torch.Tensor):
        t = text_or_name
        if t.dtype not in (torch.int64, torch.int32) or t.dim() not in (1, 2):
            raise ValueError("token ids must be an int64/int32 tensor [n_tokens] or windows [n, seq_len]")
        if t.dim() == 2:
            # Ready-made windows (e.g. from data.get_blocks): taken as they are, BOS included or not.
            t = check_windows(t.long(), "windows", config=config)
            return t[:max_windows] if max_windows is not None else t
        ids, what = t.long(), "the token ids"
    elif isinstance(text_or_name, str):
        name = _as_text(text_or_name)
        split = split if split is not None else data.eval_split(name)
        text = data.get_text(name, split)
        ids = data.tokenize(tokenizer, text, cache=not isinstance(name, data.Text))
        what = f"{data.describe(name)} (split {split!r})"
    else:
        raise ValueError("text_or_name must be a text name, a dip_ext.data.Text, a string of raw text or token "
                         f"ids, got {type(text_or_name).__name__}")
    if add_bos is None:
        add_bos = data.needs_bos(tokenizer, config)
    bos = getattr(tokenizer, "bos_token_id", None)
    return data.make_blocks(ids, seq_len, max_windows, bool(add_bos), bos, spread=True, what=what)


def window_losses(model, windows: torch.Tensor, batch_size: int = 4, device=None, progress: bool = True):
    """Summed cross-entropy (float64) and number of predicted tokens over ``windows`` ``[n, seq_len]``.

    Every position but the last predicts the next token. Logits are upcast to float32 for the loss.
    Returns ``(loss_sum: float, n_predicted: int)``. ValueError before any forward when ``windows`` is not a
    2-D integer tensor, is longer than the model's position limit or holds ids outside its vocabulary. Runs under ``torch.inference_mode`` (``no_grad`` for an
    FSDP-sharded model, whose parameter all-gathers write into tensors inference mode would freeze; every rank
    must then call this with the same windows).
    """
    if isinstance(windows, torch.Tensor) and windows.dtype == torch.int32:
        windows = windows.long()
    check_windows(windows, "windows", config=getattr(model, "config", None), allow_empty=True)
    with torch.no_grad() if dist.is_sharded(model) else torch.inference_mode():
        return _window_losses(model, windows, batch_size, device, progress)


def _window_losses(model, windows, batch_size, device, progress):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device) if device is not None else model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with frozen(model, grad=True):
        with tqdm(total=windows.shape[0], desc="perplexity", unit="win", disable=not progress) as bar:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start:start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # Row by row: an fp32 copy of [seq_len, vocab] at a time, not of the whole batch.
                for row, ids in zip(logits, batch):
                    ce = F.cross_entropy(row[:-1].float(), ids[1:], reduction="none")
                    total += ce.to(torch.float64).sum()
                    count += ce.numel()
                bar.update(batch.shape[0])
    return float(total), count


def mean_window_loss(model, windows: torch.Tensor, *, batch_size: int = 4, device=None) -> float:
    """Mean next-token LM loss per predicted token of ``model`` over ``windows`` ``[n, seq_len]`` (as
    :func:`window_losses`), the same on every rank.

    Under torch.distributed rank r scores windows r, r + N, ... and the sums are reduced. An FSDP-sharded model
    runs the same number of forwards on every rank (its forwards are collectives): a rank with fewer batches
    runs the missing ones on a filler window whose loss is not counted (:func:`dip_ext.distributed.rank_batches`).
    """
    if isinstance(windows, torch.Tensor) and windows.dtype == torch.int32:
        windows = windows.long()
    check_windows(windows, "windows", config=getattr(model, "config", None))
    batches = dist.rank_batches(int(windows.shape[0]), batch_size, lockstep=dist.is_sharded(model))
    mine = [i for b in batches if b is not None for i in b]
    total, count = window_losses(model, windows[torch.as_tensor(mine, dtype=torch.long)], batch_size=batch_size,
                                 device=device, progress=False)
    for _ in range(sum(b is None for b in batches)):
        window_losses(model, windows[:1], batch_size=1, device=device, progress=False)
    sums = torch.tensor([total, count], dtype=torch.float64)
    dist.all_reduce_sum_([sums])
    return float(sums[0] / sums[1])


def perplexity(model, tokenizer, text_or_name, seq_len: Optional[int] = None, max_windows: int | None = None,
               batch_size: int = 4, add_bos: bool | None = None, device=None, progress: bool = True,
               split: str | None = None) -> float:
    """Perplexity of ``model`` on a text, over non-overlapping windows of ``seq_len`` tokens.

    ``text_or_name`` is one of:

    - a built-in text name (``"wiki"``, ``"ptb"``, ``"wikitext2"``): scored on its held-out split (wiki's
      last 20 %, ptb's and wikitext2's ``test``) unless ``split`` names another;
    - ``"file:PATH"``: the user's file, scored whole unless ``split`` asks for a part (``"calibration"`` =
      first 80 %, ``"heldout"`` = last 20 %, ``"all"``);
    - raw text: ``dip_ext.data.Text(string)`` (any string, scored whole unless ``split`` asks for a part);
      a plain string containing whitespace is taken as raw text too, one without as a text name;
    - 1-D token ids, or ready-made windows LongTensor ``[n, seq_len]`` (used as given; ``seq_len`` ignored).

    ``seq_len`` None: :data:`dip_ext.config.DEFAULT_SEQ_LEN` tokens (the pruning report's windows), or the
    model's position limit when that is shorter.
    ``max_windows`` caps the number of windows (evenly spaced over the text). ``add_bos=None`` puts BOS
    at the start of each window when the model needs it (:func:`dip_ext.data.needs_bos`). ``device``
    defaults to the model's. Runs without autograd (see :func:`window_losses`); returns a Python float.

    Raises ValueError before any forward when ``seq_len`` (or the windows' length) exceeds the model's
    position limit, when the text is shorter than one window (the message says how many tokens a window
    needs and how many the text has), and for unknown names or splits; the text loaders' errors otherwise
    (:func:`dip_ext.data.get_text`).
    """
    if isinstance(text_or_name, str):  # an unknown name or split is reported first, before the length
        data.check_name(_as_text(text_or_name), split)
    if not isinstance(text_or_name, torch.Tensor) or text_or_name.dim() != 2:
        seq_len = data.fit_seq_len(seq_len, getattr(model, "config", None), default=DEFAULT_SEQ_LEN)
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}")
    windows = _windows(model, tokenizer, text_or_name, seq_len, max_windows, add_bos, split)
    loss, count = window_losses(model, windows, batch_size, device, progress)
    if not math.isfinite(loss):
        return float("nan") if math.isnan(loss) else float("inf")
    return math.exp(loss / count)


@torch.inference_mode()
def prefill_tokens_per_second(model, seq_len: Optional[int] = None, batch: int = 1, repeats: int = 3,
                              device=None, seed: int = 0) -> float:
    """Prefill throughput: ``batch * seq_len`` tokens divided by the median wall time of one forward.

    Random token ids (seeded), no KV cache, one untimed warm-up forward; CUDA is synchronized around each
    timed forward. Returns tokens per second. ``seq_len`` None: 256, or the model's position limit when
    that is shorter; a longer ``seq_len`` raises ValueError before any forward. To compare two models, use
    :func:`compare_prefill` (interleaved pairs).
    """
    seq_len = data.fit_seq_len(seq_len, getattr(model, "config", None), default=DEFAULT_PREFILL_LEN)
    for name, v in (("batch", batch), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    device = torch.device(device) if device is not None else model_device(model)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with frozen(model, grad=True):
        model(input_ids=ids, use_cache=False)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync()
            times.append(time.perf_counter() - t0)
    return batch * seq_len / statistics.median(times)


@dataclass(frozen=True)
class PrefillComparison:
    """Dense and pruned prefill times measured as interleaved pairs (see :func:`compare_prefill`).

    ``dense_seconds[i]`` and ``pruned_seconds[i]`` are pair ``i``: one forward of each, back to back, so a
    change of machine load between pairs affects both sides of a pair alike. The speed-up of a pair is
    ``dense_seconds[i] / pruned_seconds[i]``; :attr:`speedup` is the median over the pairs and
    :attr:`speedup_min` / :attr:`speedup_max` / :attr:`speedup_quartiles` its spread.
    """

    seq_len: int
    batch: int
    dense_seconds: tuple
    pruned_seconds: tuple

    @property
    def ratios(self) -> tuple:
        """Speed-up of each pair (dense time / pruned time), in measurement order."""
        return tuple(d / p for d, p in zip(self.dense_seconds, self.pruned_seconds))

    @property
    def speedup(self) -> float:
        """Median speed-up over the pairs."""
        return statistics.median(self.ratios)

    @property
    def speedup_min(self) -> float:
        return min(self.ratios)

    @property
    def speedup_max(self) -> float:
        return max(self.ratios)

    @property
    def speedup_quartiles(self) -> tuple:
        """First and third quartile of the per-pair speed-ups (inclusive method; one pair: its ratio twice)."""
        r = self.ratios
        if len(r) < 2:
            return (r[0], r[0])
        q = statistics.quantiles(r, n=4, method="inclusive")
        return (q[0], q[2])

    @property
    def dense_tokens_per_second(self) -> float:
        """``batch * seq_len`` over the median dense forward time."""
        return self.batch * self.seq_len / statistics.median(self.dense_seconds)

    @property
    def pruned_tokens_per_second(self) -> float:
        return self.batch * self.seq_len / statistics.median(self.pruned_seconds)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable summary (times, per-pair ratios, median, min, max, quartiles)."""
        q1, q3 = self.speedup_quartiles
        return {"seq_len": self.seq_len, "batch": self.batch, "pairs": len(self.ratios),
                "dense_tokens_per_second": self.dense_tokens_per_second,
                "pruned_tokens_per_second": self.pruned_tokens_per_second,
                "speedup": self.speedup, "speedup_min": self.speedup_min, "speedup_max": self.speedup_max,
                "speedup_q1": q1, "speedup_q3": q3, "ratios": list(self.ratios),
                "dense_seconds": list(self.dense_seconds), "pruned_seconds": list(self.pruned_seconds)}

    @classmethod
    def from_dict(cls, data: dict) -> "PrefillComparison":
        """The comparison :meth:`to_dict` recorded (the summary figures are recomputed from the times)."""
        return cls(seq_len=data["seq_len"], batch=data["batch"], dense_seconds=tuple(data["dense_seconds"]),
                   pruned_seconds=tuple(data["pruned_seconds"]))

    def describe(self) -> str:
        """One line, e.g. ``×1.31 (median of 7 interleaved pairs; min ×1.26, max ×1.47)``."""
        return (f"×{self.speedup:.2f} (median of {len(self.ratios)} interleaved pairs; "
                f"min ×{self.speedup_min:.2f}, max ×{self.speedup_max:.2f})")


def compare_prefill(dense, pruned, *, seq_len: Optional[int] = None, batch: int = 1, pairs: int = 7, warmup: int = 1,
                    seed: int = 0, timer: Callable[[], float] = time.perf_counter) -> PrefillComparison:
    """Prefill speed of ``pruned`` against ``dense``, timed as interleaved pairs: dense, pruned, dense, ...

    Both models run the same random token ids ``[batch, seq_len]`` (seeded, below both vocabularies), each
    on its own device, without KV cache, in eval mode (restored afterwards) and without autograd; ``warmup``
    untimed pairs come first; CUDA is synchronized around each timed forward. ``timer`` is the clock
    (seconds). Returns a :class:`PrefillComparison` (median speed-up and its spread over ``pairs`` pairs).
    ``seq_len`` None: 256, or the shorter model's position limit when that is shorter. ValueError before any
    forward for non-positive sizes or a ``seq_len`` beyond either model's position limit.
    """
    limits = [lim for lim in (_limit(dense), _limit(pruned)) if lim is not None]
    if seq_len is None:
        seq_len = min([DEFAULT_PREFILL_LEN] + limits)
    for name, v in (("seq_len", seq_len), ("batch", batch), ("pairs", pairs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for label, m in (("dense", dense), ("pruned", pruned)):
        data.fit_seq_len(seq_len, getattr(m, "config", None), what=f"seq_len (the {label} model)")
    vocab = min(int(m.config.vocab_size) for m in (dense, pruned))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    runs = []
    for m in (dense, pruned):
        device = model_device(m)
        runs.append((m, ids.to(device), device))

    def once(m, x, device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = timer()
        m(input_ids=x, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return timer() - t0

    times: tuple = ([], [])
    with frozen(dense, grad=True), frozen(pruned, grad=True), torch.inference_mode():
        for _ in range(warmup):
            for run in runs:
                once(*run)
        for _ in range(pairs):
            for k, run in enumerate(runs):
                times[k].append(once(*run))
    return PrefillComparison(seq_len, batch, tuple(times[0]), tuple(times[1]))
