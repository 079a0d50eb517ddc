"""Recovery windows the dense model writes itself ("self-data distillation"), cached on disk and reused.

Why: distilling on a fixed corpus teaches the pruned model the teacher's behaviour on that corpus's domain only;
distilling on text the teacher samples itself covers the teacher's whole distribution (Hinton et al. 2015 on
transfer sets; "self-data distillation" for pruned LLMs, Thangarasa et al. 2024). The prompts still come from the
recovery text, so the samples start where real text starts.

How: sample ``j`` is prompted with the first ``recover_self_prompt_len`` tokens (at most half a window) of a
training window of the text
(window ``perm[j % n]``, ``perm`` a permutation seeded by ``recover_seed``); a fraction ``recover_self_chat`` of the
samples instead wrap the decoded prompt in the tokenizer's chat template (a user turn asking to continue the text;
none when the tokenizer has no template). The teacher samples ``seq_len - prompt_len`` new tokens at temperature
``recover_self_temperature`` (plain ancestral sampling: no top-k, top-p or repetition penalty), batched with a KV
cache (``transformers``' ``generate``; prompts left-padded), stopping a sample at the end-of-sequence token, in
``recover_self_dtype`` (a copy of the teacher in that dtype, made only when a batch is generated). Each
sample's prompt and continuation (end-of-sequence included) are concatenated sample after sample into one token
stream, which is cut into ``seq_len`` windows like any text (:func:`dip_ext.data.make_blocks`).

Deterministic: batch ``b`` is sampled under its own seed (``recover_seed``, ``b``) whatever came before it, so an
interrupted run continues exactly and a run that needs more windows than the cache holds adds batches. Cache layout:
``<work_dir>/self-text-<key>/b<index>.safetensors`` (``tokens`` int64: the batch's samples concatenated;
``lengths`` int64 ``[samples]``), each written atomically. ``<key>`` digests the weights sampled from (the teacher's
in the sampling dtype: a teacher cast to it beforehand finds the same cache), the text's windows, the tokenizer's
special tokens and chat template and every option that shapes a sample, so a cache is never read for another model,
text, seed or setting.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data
from .. import distributed as dist
from ..files import atomic_save_safetensors, read_safetensors
from ..model_state import model_device, model_digest
from ..training import digest
from ..zoo import as_dtype
from .config import RecoveryConfig, bf16_native

__all__ = ["SelfText", "SelfTextPrompts", "self_text_windows", "recovery_data_windows", "windows_needed", "CHAT_INSTRUCTION"]

#: the user turn of a chat-template prompt (the decoded text prompt follows it)
CHAT_INSTRUCTION = "Continue this text:\n\n"


@dataclass
class SelfText:
    """Windows the teacher wrote: ``windows`` int64 ``[n, seq_len]``; ``samples`` read from the cache or generated
    to make them; ``generated_tokens`` / ``seconds``: the tokens this call sampled (prompts not counted) and the
    wall seconds it took (0 when everything came from the cache);
    ``folder``: the cache folder (None without a work folder)."""

    windows: torch.Tensor
    samples: int
    generated_tokens: int
    seconds: float
    folder: Optional[Path]


def windows_needed(config: RecoveryConfig) -> int:
    """How many distinct windows the recovery of ``config`` reads: distillation ``recover_steps ×
    recover_batch``, reconstruction ``recover_recon_windows`` (the larger under ``auto``), at most
    ``recover_windows``."""
    need = 0
    if config.recover in ("distill", "auto"):
        need = max(need, config.recover_steps * config.recover_batch)
    if config.recover in ("reconstruct", "auto"):
        need = max(need, config.recover_recon_windows)
    if config.recover_windows is not None:
        need = min(need, config.recover_windows)
    return max(need, 1)


def _special_ids(tokenizer) -> tuple[int, int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("self-generated recovery text needs a tokenizer with an end-of-sequence token "
                         "(tokenizer.eos_token_id is None)")
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(eos), int(pad) if pad is not None else int(eos)


def _cache_key(teacher: nn.Module, tokenizer, text: torch.Tensor, config: RecoveryConfig, chat: bool,
               dtype: str) -> str:
    eos, pad = _special_ids(tokenizer)
    template = getattr(tokenizer, "chat_template", None) if chat else None
    weights = model_digest(teacher, dtype=None if dtype == "same" else as_dtype(dtype))  # the weights sampled from
    return digest(f"{weights}|{config.recover_seed}|{float(config.recover_self_temperature)!r}|"
                  f"{dtype}|"
                  f"{config.recover_self_prompt_len}|{config.recover_self_batch}|"
                  f"{float(config.recover_self_chat) if chat else 0.0!r}|{eos}|{pad}|{template}|"
                  f"{getattr(tokenizer, 'bos_token_id', None)}|{tuple(text.shape)}|", text)


class SelfTextPrompts:
    """The prompt of each sample: ``prompts(j)`` -> token ids (see the module doc); ``is_chat(j)``: whether sample
    ``j`` wraps its text in the chat template (``chat`` False: never). ``text`` ``[n, seq_len]`` int64."""

    def __init__(self, tokenizer, text: torch.Tensor, config: RecoveryConfig, chat: bool):
        self.tokenizer, self.text = tokenizer, text
        self.prompt_len = max(1, min(config.recover_self_prompt_len, int(text.shape[1]) // 2))
        self.chat = config.recover_self_chat if chat else 0.0
        g = torch.Generator().manual_seed(config.recover_seed)
        self.order = torch.randperm(int(text.shape[0]), generator=g)

    def is_chat(self, j: int) -> bool:
        # the j-th sample is a chat prompt when the running count of chat prompts steps up at j: the fraction holds
        # within one sample over any prefix of the samples
        return int((j + 1) * self.chat) > int(j * self.chat)

    def __call__(self, j: int) -> list[int]:
        ids = self.text[int(self.order[j % len(self.order)]), :self.prompt_len].tolist()
        if not self.is_chat(j):
            return ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        chat = self.tokenizer.apply_chat_template([{"role": "user", "content": CHAT_INSTRUCTION + text}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False)
        return [int(t) for t in (chat.tolist() if isinstance(chat, torch.Tensor) else chat)]


@torch.no_grad()
def _generate_batch(teacher: nn.Module, prompts: list[list[int]], new_tokens: int, temperature: float, seed: int,
                    eos: int, pad: int) -> tuple[list[list[int]], int]:
    """Each prompt followed by its sampled continuation (up to and including the first end-of-sequence token), and
    how many tokens were sampled."""
    device = model_device(teacher)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every continuation starts at the same column
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        out = teacher.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                               temperature=float(temperature), top_k=0, top_p=1.0, repetition_penalty=1.0,
                               max_new_tokens=int(new_tokens), eos_token_id=eos, pad_token_id=pad, use_cache=True)
    samples, sampled = [], 0
    for row, p in enumerate(prompts):
        cont = out[row, width:].tolist()
        if eos in cont:
            cont = cont[:cont.index(eos) + 1]
        samples.append(list(p) + cont)
        sampled += len(cont)
    return samples, sampled


class _Sampler:
    """The model that samples: the teacher itself, or (made on first use, once) a copy of it in ``dtype``."""

    def __init__(self, teacher: nn.Module, dtype: str):
        if dtype == "auto":  # resolved here, so the cache key names the dtype the samples were drawn in
            dtype = "bfloat16" if bf16_native(model_device(teacher)) else "same"
        self.teacher, self.dtype, self.copy = teacher, dtype, None

    def model(self) -> nn.Module:
        if self.dtype == "same" or all(p.dtype == as_dtype(self.dtype) for p in self.teacher.parameters()):
            return self.teacher
        if self.copy is None:
            self.copy = copy.deepcopy(self.teacher).to(as_dtype(self.dtype)).eval()
        return self.copy


def _batch_seed(seed: int, batch: int) -> int:
    return int(digest(f"self-text|{seed}|{batch}")[:15], 16)


def self_text_windows(teacher: nn.Module, tokenizer, text: torch.Tensor, n_windows: int, config: RecoveryConfig, *,
                      work_dir=None, progress: bool = True) -> SelfText:
    """``n_windows`` windows ``[n_windows, seq_len]`` of text the dense ``teacher`` samples itself, prompted from
    the training windows ``text`` ``[n, seq_len]`` int64 (see the module doc for the sampling and the cache).

    ``work_dir``: where the cache lives (``self-text-<key>/``); batches already there are read, not generated again.
    Distributed runs: rank 0 generates and writes, the other ranks wait and read (each generates alone without a
    work folder, the same samples). Raises ValueError without a tokenizer or its end-of-sequence token, for an
    FSDP-sharded teacher, or for ``text`` windows shorter than 2 tokens.
    """
    if tokenizer is None:
        raise ValueError("self-written text (recover_data 'self' / 'mix', calibration_self) needs the dense model's "
                         "tokenizer (the samples are prompted and ended by its tokens): pass tokenizer=...")
    if dist.is_sharded(teacher):
        raise ValueError("self-written text (recover_data 'self' / 'mix', calibration_self) needs a whole (unsharded) "
                         "dense model to generate with")
    if text.dim() != 2 or text.shape[1] < 2 or text.shape[0] < 1:
        raise ValueError(f"self-generated text is prompted from training windows [n, seq_len >= 2], got "
                         f"{tuple(text.shape)}")
    seq_len, eos_pad = int(text.shape[1]), _special_ids(tokenizer)
    chat = bool(getattr(tokenizer, "chat_template", None)) and config.recover_self_chat > 0
    prompts = SelfTextPrompts(tokenizer, text, config, chat)
    sampler = _Sampler(teacher, config.recover_self_dtype)
    folder = None
    if work_dir is not None:
        folder = Path(work_dir) / f"self-text-{_cache_key(teacher, tokenizer, text, config, chat, sampler.dtype)}"
    bos = data.needs_bos(tokenizer, teacher.config)
    need = n_windows * (seq_len - int(bos))  # make_blocks puts the BOS before each window's text
    t0 = time.perf_counter()
    shared = folder is not None and dist.is_distributed()
    if shared and not dist.is_main():  # rank 0 writes every batch first; the other ranks read them
        dist.barrier()
        stream, samples, _ = _collect(folder, need, None)
        generated = 0
    else:
        stream, samples, generated = _collect(folder, need, lambda batch: _generate_batch(
            sampler.model(), [prompts(j) for j in range(batch * config.recover_self_batch,
                                                (batch + 1) * config.recover_self_batch)],
            seq_len - prompts.prompt_len, config.recover_self_temperature, _batch_seed(config.recover_seed, batch),
            *eos_pad), progress=progress)
        if shared:
            dist.barrier()
    windows = data.make_blocks(torch.tensor(stream[:need], dtype=torch.long), seq_len, None, bos,
                               getattr(tokenizer, "bos_token_id", None), what="the self-generated text")
    return SelfText(windows, samples, generated, time.perf_counter() - t0 if generated else 0.0, folder)


def _collect(folder: Optional[Path], need: int, generate, *, progress: bool = False):
    """``(token stream, samples, sampled tokens)``: batches read from ``folder`` (or generated by
    ``generate(batch)`` -> ``(samples, sampled tokens)`` and written there) until the stream holds ``need`` tokens. Without ``generate`` a missing
    batch is an error (a rank other than 0 reading what rank 0 wrote)."""
    stream: list[int] = []
    samples = generated = batch = 0
    with tqdm(total=need, desc="self-generated text", unit="tok", disable=not progress) as bar:
        while len(stream) < need:
            rows = _read_batch(folder, batch) if folder is not None else None
            bar.set_description("self-generated text" + (" (read from the cache)" if rows is not None else ""))
            if rows is None:
                if generate is None:
                    raise RuntimeError(f"rank 0 did not write {_batch_path(folder, batch)}")
                rows, sampled = generate(batch)
                generated += sampled
                if folder is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                    atomic_save_safetensors(_batch_path(folder, batch), {
                        "tokens": torch.tensor([t for r in rows for t in r], dtype=torch.long),
                        "lengths": torch.tensor([len(r) for r in rows], dtype=torch.long)})
            for r in rows:
                stream.extend(r)
            samples += len(rows)
            batch += 1
            bar.update(min(need, len(stream)) - bar.n)
    return stream, samples, generated


def _batch_path(folder: Path, batch: int) -> Path:
    return folder / f"b{int(batch):06d}.safetensors"


def _read_batch(folder: Path, batch: int) -> Optional[list[list[int]]]:
    path = _batch_path(folder, batch)
    if not path.exists():
        return None
    _, _, t = read_safetensors(path, "self-generated text cache file", "delete it; it is generated again")
    tokens, lengths = t.get("tokens"), t.get("lengths")
    if tokens is None or lengths is None or int(lengths.sum()) != int(tokens.numel()):
        raise ValueError(f"{path} is not a self-generated text batch; delete it, it is generated again")
    return [chunk.tolist() for chunk in torch.split(tokens, lengths.tolist())]


def recovery_data_windows(teacher: nn.Module, tokenizer, text: torch.Tensor, config: RecoveryConfig, *,
                          work_dir=None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The windows recovery trains on under ``config.recover_data`` and a record of them for the report.

    ``text`` ``[n, seq_len]``: the recovery text's training windows. ``text``: returned as they are; ``self``:
    :func:`windows_needed` self-generated windows prompted from them; ``mix``: half of those self-generated
    (rounded down), the rest text windows evenly spaced over ``text``, text first. The record: ``data``,
    ``text_windows``, ``self_windows``, ``self_samples``, ``generated_tokens``, ``generation_seconds``,
    ``cached`` (every self-generated window came from the cache).
    """
    if config.recover_data == "auto":
        raise ValueError("recover_data 'auto' is resolved by the recovery first (RecoveryConfig.resolved)")
    record = {"data": config.recover_data, "text_windows": int(text.shape[0]), "self_windows": 0}
    if config.recover_data == "text":
        return text, record
    need = windows_needed(config)
    n_self = need if config.recover_data == "self" else need // 2
    if n_self == 0:  # mix of a single window: it is a text window, nothing to write
        record["text_windows"] = 1
        return text[data.spread_indices(int(text.shape[0]), 1)], record
    written = self_text_windows(teacher, tokenizer, text, n_self, config, work_dir=work_dir, progress=progress)
    record.update(self_windows=int(written.windows.shape[0]), self_samples=written.samples,
                  generated_tokens=written.generated_tokens, generation_seconds=round(written.seconds, 3),
                  cached=written.generated_tokens == 0)
    if config.recover_data == "self":
        record["text_windows"] = 0
        return written.windows, record
    n_text = min(need - n_self, int(text.shape[0]))
    kept = text[data.spread_indices(int(text.shape[0]), n_text)]
    record["text_windows"] = int(kept.shape[0])
    return torch.cat([kept, written.windows]), record
