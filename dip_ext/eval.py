"""Perplexity on non-overlapping windows and prefill throughput.

Window convention (:func:`dip_ext.data.make_blocks`): without BOS a window is ``seq_len`` text tokens and
its first token is context only (``seq_len - 1`` predictions, the SparseGPT/Wanda convention); with BOS a
window is ``[bos] + seq_len - 1`` text tokens and every text token is predicted. Perplexity is
``exp(sum of token cross-entropies / number of predicted tokens)`` over all windows, summed in float64.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from . import data
from .model_state import model_device

__all__ = ["perplexity", "window_losses", "mean_window_loss", "prefill_tokens_per_second", "DEFAULT_EVAL_SPLIT"]

# A named text is evaluated on its held-out part unless a split is given.
DEFAULT_EVAL_SPLIT = "heldout"


def _windows(model, tokenizer, text_or_name, seq_len, max_windows, add_bos, split) -> torch.Tensor:
    if isinstance(text_or_name, torch.Tensor):
        t = text_or_name
        if t.dtype not in (torch.int64, torch.int32) or t.dim() not in (1, 2):
            raise ValueError("token ids must be an int64/int32 tensor [n_tokens] or windows [n, seq_len]")
        if t.dim() == 2:
            # Ready-made windows (e.g. from data.get_blocks): taken as they are, BOS included or not.
            if t.shape[1] < 2 or t.shape[0] < 1:
                raise ValueError(f"windows must be [n >= 1, seq_len >= 2], got {list(t.shape)}")
            return t[:max_windows].long() if max_windows is not None else t.long()
        ids = t.long()
    elif isinstance(text_or_name, str):
        is_name = text_or_name.startswith("file:") or not any(c.isspace() for c in text_or_name)
        if is_name:
            # A string without whitespace is a text name (a typo must not be scored as a one-word text).
            text = data.get_text(text_or_name, split or DEFAULT_EVAL_SPLIT)
        elif split is not None:
            raise ValueError("split applies to a text name, not to raw text")
        else:
            text = text_or_name
        ids = data.tokenize(tokenizer, text, cache=is_name)
    else:
        raise ValueError("text_or_name must be a text, a text name or token ids, "
                         f"got {type(text_or_name).__name__}")
    if add_bos is None:
        add_bos = data.needs_bos(tokenizer, getattr(model, "config", None))
    bos = getattr(tokenizer, "bos_token_id", None)
    step = seq_len - 1 if add_bos else seq_len
    if 0 < ids.numel() < step and ids.numel() + int(bool(add_bos)) >= 2:
        # A text shorter than one window is scored as one shorter window rather than refused.
        seq_len = ids.numel() + int(bool(add_bos))
    return data.make_blocks(ids, seq_len, max_windows, bool(add_bos), bos, spread=True)


def window_losses(model, windows: torch.Tensor, batch_size: int = 4, device=None, progress: bool = True):
    """Summed cross-entropy (float64) and number of predicted tokens over ``windows`` ``[n, seq_len]``.

    Every position but the last predicts the next token. Logits are upcast to float32 for the loss.
    Returns ``(loss_sum: float, n_predicted: int)``. Runs under ``torch.inference_mode`` (``no_grad`` for an
    FSDP-sharded model, whose parameter all-gathers write into tensors inference mode would freeze; every rank
    must then call this with the same windows).
    """
    from .distributed import is_sharded

    with torch.no_grad() if is_sharded(model) else torch.inference_mode():
        return _window_losses(model, windows, batch_size, device, progress)


def _window_losses(model, windows, batch_size, device, progress):
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device) if device is not None else model_device(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and windows.numel() and (int(windows.max()) >= vocab or int(windows.min()) < 0):
        raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocabulary)")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
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
    finally:
        model.train(was_training)
    return float(total), count


def mean_window_loss(model, windows: torch.Tensor, *, batch_size: int = 4, device=None) -> float:
    """Mean next-token LM loss per predicted token of ``model`` over ``windows`` ``[n, seq_len]`` (as
    :func:`window_losses`), the same on every rank.

    Under torch.distributed rank r scores windows r, r + N, ... and the sums are reduced. An FSDP-sharded model
    runs the same number of forwards on every rank (its forwards are collectives): a rank with fewer windows
    runs the missing ones on a filler window whose loss is not counted.
    """
    from . import distributed as dist

    world = dist.world_size()
    mine = windows[dist.rank()::world]
    total, count = window_losses(model, mine, batch_size=batch_size, device=device, progress=False)
    if dist.is_sharded(model):
        missing = math.ceil(math.ceil(windows.shape[0] / world) / batch_size) - math.ceil(mine.shape[0] / batch_size)
        for _ in range(missing):
            window_losses(model, windows[:1], batch_size=1, device=device, progress=False)
    sums = torch.tensor([total, count], dtype=torch.float64)
    dist.all_reduce_sum_([sums])
    return float(sums[0] / sums[1])


def perplexity(model, tokenizer, text_or_name, seq_len: int = 512, max_windows: int | None = None,
               batch_size: int = 4, add_bos: bool | None = None, device=None, progress: bool = True,
               split: str | None = None) -> float:
    """Perplexity of ``model`` on a text, over non-overlapping windows of ``seq_len`` tokens.

    ``text_or_name``: a text name (``"wiki"``, ``"ptb"``, ``"wikitext2"``, ``"file:PATH"``; evaluated on
    its held-out split unless ``split`` says otherwise), raw text (any string containing whitespace),
    1-D token ids, or ready-made windows LongTensor ``[n, seq_len]`` (used as given).
    ``max_windows`` caps the number of windows (evenly spaced over the text). ``add_bos=None`` puts BOS
    at the start of each window when the model needs it (:func:`dip_ext.data.needs_bos`). ``device``
    defaults to the model's. Runs without autograd (see :func:`window_losses`); returns a Python float.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}")
    windows = _windows(model, tokenizer, text_or_name, seq_len, max_windows, add_bos, split)
    loss, count = window_losses(model, windows, batch_size, device, progress)
    if not math.isfinite(loss):
        return float("nan") if math.isnan(loss) else float("inf")
    return math.exp(loss / count)


@torch.inference_mode()
def prefill_tokens_per_second(model, seq_len: int = 256, batch: int = 1, repeats: int = 3,
                              device=None, seed: int = 0) -> float:
    """Prefill throughput: ``batch * seq_len`` tokens divided by the median wall time of one forward.

    Random token ids (seeded), no KV cache, one untimed warm-up forward; CUDA is synchronized around each
    timed forward. Returns tokens per second.
    """
    for name, v in (("seq_len", seq_len), ("batch", batch), ("repeats", repeats)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    device = torch.device(device) if device is not None else model_device(model)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    was_training = model.training
    model.eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        model(input_ids=ids, use_cache=False)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return batch * seq_len / statistics.median(times)
