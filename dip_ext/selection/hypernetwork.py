"""Learned DISP masks: the paper's hypernetwork (Gao et al., NeurIPS 2024), trained against a frozen model.

One small network emits the mask logits of every structure of every layer at once::

    fixed random inputs [5L, 32] -> bidirectional GRU (hidden 64) -> LayerNorm(128) -> GELU
        -> one linear head per (layer, structure) -> logits of that structure's width

The sequence runs layer-major over ``STRUCTURES``
(``l0 attn_in, l0 attn_out, ..., l0 mlp_out, l1 attn_in, ...``).
Training samples Gumbel-sigmoid masks (temperature 0.4, offset +3 so masks start near 1), applies the hard 0/1
sample with a straight-through gradient to the frozen model through :func:`dip_ext.apply_masks`, and minimises

    LM loss + lam * |log r - log p|        (= lam * log(max(r, p) / min(r, p)))

with ``p`` the target kept ratio and ``r`` the kept decoder-linear ratio of the DETERMINISTIC mask
``logit + offset > 0``. Measured on SmolLM2 (DESIGN.md §4): with ``r`` taken from the noisy samples, as in the
official code, the deterministic mask drifted to 32.5 % removed at a 30 % target. So ``r``'s value here is the
noise-free mask's; its gradient is the one of the keep probability ``sigmoid(logit + offset)`` (what the noisy
straight-through gradient is on average, for a small temperature), i.e. the paper's push without its noise.

Export is deterministic (no noise): every prunable dimension is ranked by ``logit + offset`` (ties by
position) and the longest prefix of that ranking whose kept parameters fit the budget is kept. That is one
global threshold on ``logit + offset``, placed so the export meets the target to within the next dimension
(near 0 once training has converged). See :func:`export_masks`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..eval import mean_window_loss
from ..families import adapter_for
from ..masking import apply_masks
from ..masks import STRUCTURES, DispMasks, ModelDims
from .budget import Budget

__all__ = ["HyperNetwork", "learn_masks_hypernetwork", "export_masks", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "hypernetwork.ckpt.safetensors"
_FORMAT = "dip_ext.hypernetwork-checkpoint.v1"
_HIDDEN_STRUCTS = [s for s in STRUCTURES if s != "mlp_mid"]  # the four sets over the residual width
_INPUT_DIM, _GRU_HIDDEN = 32, 64


class HyperNetwork(nn.Module):
    """Emits per-structure mask logits for a model of ``dims``.

    The per-structure heads are stored stacked (one weight ``[width, 128]`` + bias ``[width]`` per structure,
    grouped by width so one einsum evaluates them all): mathematically one ``nn.Linear`` per structure.
    Parameters are float32; construction consumes no global RNG state (everything comes from ``seed``).
    """

    def __init__(self, dims: ModelDims, seed: int = 0):
        super().__init__()
        self.dims = dims
        n_seq = dims.num_layers * len(STRUCTURES)
        feat = 2 * _GRU_HIDDEN
        gen = torch.Generator().manual_seed(int(seed))
        # The fixed inputs are a buffer (saved with the state) so a resumed run sees the very same ones.
        self.register_buffer("inputs", torch.randn(n_seq, _INPUT_DIM, generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 1)
            self.gru = nn.GRU(_INPUT_DIM, _GRU_HIDDEN, batch_first=True, bidirectional=True)
            self.norm = nn.LayerNorm(feat)
        bound = 1.0 / math.sqrt(feat)  # nn.Linear's default init
        L, d, ffn = dims.num_layers, dims.hidden, dims.ffn

        def uniform(*shape):
            return nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1) * bound)

        n_hid = len(_HIDDEN_STRUCTS)
        self.w_hidden, self.b_hidden = uniform(L, n_hid, d, feat), uniform(L, n_hid, d)
        self.w_ffn, self.b_ffn = uniform(L, ffn, feat), uniform(L, ffn)

    def features(self) -> torch.Tensor:
        """``[L, 5, 128]`` float32: the GRU features of every (layer, structure)."""
        out, _ = self.gru(self.inputs.unsqueeze(0))
        return F.gelu(self.norm(out[0])).view(self.dims.num_layers, len(STRUCTURES), -1)

    def forward(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, ``{structure: logits [width] float32}`` (before the offset)."""
        return self._split(self.features())

    def _split(self, feats: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        hid = feats[:, [STRUCTURES.index(s) for s in _HIDDEN_STRUCTS]]
        lh = torch.einsum("lsf,lsdf->lsd", hid, self.w_hidden) + self.b_hidden
        lf = torch.einsum("lf,ldf->ld", feats[:, STRUCTURES.index("mlp_mid")], self.w_ffn) + self.b_ffn
        out = []
        for i in range(self.dims.num_layers):
            entry = {s: lh[i, k] for k, s in enumerate(_HIDDEN_STRUCTS)}
            entry["mlp_mid"] = lf[i]
            out.append({s: entry[s] for s in STRUCTURES})
        return out

    @torch.no_grad()
    def warm_start(self, masks: DispMasks, offset: float = 3.0, margin: float = 3.0) -> None:
        """Sets the heads so ``logit + offset`` is ``+margin`` on kept and ``-margin`` on dropped dimensions.

        Every head is linear in its (fixed) feature vector f, so this is solved exactly rather than fitted:
        each output row moves by the minimum-norm change ``delta * [f, 1] / (|f|^2 + 1)`` of its weights and
        bias.
        """
        masks.validate(self.dims)
        feats = self.features()
        target = [{s: torch.where(m[s] > 0, margin - offset, -margin - offset) for s in STRUCTURES}
                  for m in masks.to_masks(self.dims)]
        current = self._split(feats)
        denom = feats.pow(2).sum(-1) + 1.0  # [L, 5]
        for i in range(self.dims.num_layers):
            for s in STRUCTURES:
                k = STRUCTURES.index(s)
                delta = (target[i][s] - current[i][s]) / denom[i, k]
                if s == "mlp_mid":
                    self.w_ffn[i] += delta[:, None] * feats[i, k][None, :]
                    self.b_ffn[i] += delta
                else:
                    j = _HIDDEN_STRUCTS.index(s)
                    self.w_hidden[i, j] += delta[:, None] * feats[i, k][None, :]
                    self.b_hidden[i, j] += delta


# ---- export ------------------------------------------------------------------------------------------------

def _flat_scores(logits: Sequence[dict[str, torch.Tensor]], offset: float):
    """All scores ``logit + offset`` concatenated layer-major, their group id and the group sizes."""
    scores, groups, sizes = [], [], []
    for i, layer in enumerate(logits):
        for k, s in enumerate(STRUCTURES):
            v = layer[s].detach().float().cpu().reshape(-1)
            scores.append(v + offset)
            groups.append(torch.full((v.numel(),), i * len(STRUCTURES) + k, dtype=torch.int64))
            sizes.append(v.numel())
    return torch.cat(scores), torch.cat(groups), torch.tensor(sizes, dtype=torch.int64)


def _round_widths(w: torch.Tensor, sizes: torch.Tensor, multiple_of: int) -> torch.Tensor:
    # Nearest multiple (ties down), never above the full width; monotone in w, so the prefix search stays
    # valid.
    if multiple_of == 1:
        return w
    return torch.minimum((w + (multiple_of - 1) // 2) // multiple_of * multiple_of, sizes)


def _widths_dicts(w: torch.Tensor, num_layers: int) -> list[dict[str, int]]:
    w = w.view(num_layers, len(STRUCTURES)).tolist()
    return [dict(zip(STRUCTURES, row)) for row in w]


@torch.no_grad()
def export_masks(logits: Sequence[dict[str, torch.Tensor]], budget: Budget, *, offset: float = 3.0,
                 multiple_of: int = 1) -> tuple[DispMasks, dict]:
    """Deterministic DispMasks from mask logits that meet ``budget``; never samples noise.

    ``logits[i][s]`` is a 1-D float tensor of structure ``s``'s full width. Dimensions are ranked by
    ``logit + offset`` (descending; ties by layer, structure, index) and the longest prefix of the ranking
    whose decoder-linear parameters fit ``budget.target_linear`` is kept: one global threshold, so the result
    is at most the target and adding the next-ranked dimension would exceed it. With ``multiple_of > 1``
    each kept width is rounded to the nearest multiple (a width of 0 removes that set, and with an empty
    output set the whole block; a width equal to the full size is kept) before the fit, keeping the
    highest-scoring dims of the set. Returns ``(masks, info)``; ``info`` has the kept/target counts and the
    threshold used.
    """
    if int(multiple_of) < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    multiple_of = int(multiple_of)
    num_layers = len(logits)
    scores, groups, sizes = _flat_scores(logits, offset)
    if not torch.isfinite(scores).all():
        raise ValueError("mask logits contain NaN or inf (training diverged?)")
    order = torch.sort(scores, descending=True, stable=True).indices
    n_groups = sizes.numel()

    def widths_at(k: int) -> torch.Tensor:
        raw = torch.bincount(groups[order[:k]], minlength=n_groups)
        return _round_widths(raw, sizes, multiple_of)

    def kept(k: int) -> int:
        return int(budget.kept_linear(_widths_dicts(widths_at(k), num_layers)))

    lo, hi = 0, scores.numel()  # invariant: kept(lo) <= target (or lo == 0), kept(hi + 1) > target
    if kept(hi) <= budget.target_linear:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kept(mid) <= budget.target_linear:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    widths = widths_at(k)
    # Per set, keep its highest-scoring dims (the prefix members, plus the next ones where rounding went up).
    layers, start = [], 0
    for g in range(n_groups):
        n = int(sizes[g])
        local = torch.sort(scores[start:start + n], descending=True, stable=True).indices
        idx = local[:int(widths[g])].sort().values
        if g % len(STRUCTURES) == 0:
            layers.append({})
        layers[-1][STRUCTURES[g % len(STRUCTURES)]] = idx
        start += n
    for layer in layers:
        # A block whose output set is empty contributes nothing: its input sets are moot (and counted as 0).
        if layer["attn_out"].numel() == 0:
            layer["attn_in"] = layer["attn_in"][:0]
        if layer["mlp_out"].numel() == 0:
            layer["mlp_in"], layer["mlp_mid"] = layer["mlp_in"][:0], layer["mlp_mid"][:0]
    masks = DispMasks(layers)
    kept_linear = int(budget.kept_linear(masks.widths()))
    last = float(scores[order[k - 1]]) if k > 0 else float("inf")
    nxt = float(scores[order[k]]) if k < scores.numel() else float("-inf")
    info = {"kept_decoder_linear": kept_linear, "target_decoder_linear": budget.target_linear,
            "kept_ratio": kept_linear / budget.dense_linear, "target_ratio": budget.target_ratio,
            "threshold": (last + nxt) / 2 if math.isfinite(last + nxt) else (nxt if k == 0 else last),
            "kept_dims": k, "total_dims": int(scores.numel()),
            "dims_above_zero": int((scores > 0).sum()), "multiple_of": multiple_of}
    return masks, info


# ---- checkpoints -------------------------------------------------------------------------------------------

def _digest_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


_FINGERPRINT_BEFORE_OPTIONS = {"margin": 3.0, "distill": False, "lr_schedule": "constant", "schedule_steps": None,
                               "decay_steps": None}

#: learning-rate schedules: constant (the paper's); a half cosine from ``lr`` down to 0 at ``steps``; or
#: "cosine-tail": constant, then a half cosine down to 0 over the last ``decay_steps`` steps (so a constant
#: run can be extended and annealed: its checkpoints resume under it, see :func:`learn_masks_hypernetwork`)
LR_SCHEDULES = ("constant", "cosine", "cosine-tail")

#: fingerprint keys that lay out the schedule: a resume compares the learning rates they give, not the keys
_SCHEDULE_KEYS = ("lr_schedule", "schedule_steps", "decay_steps")


def scheduled_lr(lr: float, schedule: str, step: int, steps: int, decay_steps: Optional[int] = None) -> float:
    """The learning rate of (0-based) ``step`` of ``steps``."""
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    if schedule == "cosine-tail":
        into = step - (steps - decay_steps)
        return lr if into < 0 else lr * 0.5 * (1.0 + math.cos(math.pi * into / decay_steps))
    return lr


def check_lr_schedule(lr_schedule: str, decay_steps: Optional[int], steps) -> None:
    """Raises ValueError for an unknown schedule or a ``decay_steps`` that does not fit it."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if lr_schedule == "cosine-tail":
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or not 1 <= decay_steps:
            raise ValueError(f"lr_schedule 'cosine-tail' needs decay_steps, an integer >= 1, got {decay_steps!r}")
        if isinstance(steps, int) and decay_steps > steps:
            raise ValueError(f"decay_steps ({decay_steps}) must not exceed steps ({steps})")
    elif decay_steps is not None:
        raise ValueError(f"decay_steps is only for lr_schedule 'cosine-tail', not {lr_schedule!r}")


def _first_lr_difference(saved: dict, now: dict, start: int) -> Optional[int]:
    """The first step below ``start`` whose learning rate differs between two fingerprints' schedules."""
    def lr_at(fp: dict, step: int) -> float:
        return scheduled_lr(fp["lr"], fp["lr_schedule"], step, fp["schedule_steps"], fp["decay_steps"])

    return next((s for s in range(start) if lr_at(saved, s) != lr_at(now, s)), None)


def _fingerprint(model, dims: ModelDims, budget: Budget, blocks: torch.Tensor, *, seed, lam, lr, weight_decay,
                 temperature, offset, batch_size, val_blocks=None, val_every=None, margin=3.0,
                 distill=False, lr_schedule="constant", steps=None, decay_steps=None) -> dict:
    cfg = model.config
    return {"model_type": getattr(cfg, "model_type", "?"), "num_layers": dims.num_layers,
            "hidden": dims.hidden, "ffn": dims.ffn, "heads": getattr(cfg, "num_attention_heads", None),
            "kv_heads": getattr(cfg, "num_key_value_heads", None), "vocab": getattr(cfg, "vocab_size", None),
            "ratio": budget.ratio, "ratio_of": budget.ratio_of, "target_linear": budget.target_linear,
            "seed": int(seed), "lam": float(lam), "lr": float(lr), "weight_decay": float(weight_decay),
            "temperature": float(temperature), "offset": float(offset), "batch_size": int(batch_size),
            "margin": float(margin), "distill": bool(distill), "lr_schedule": lr_schedule,
            # a decaying schedule is laid out over the run's length (checked on resume, _first_lr_difference)
            "schedule_steps": None if lr_schedule == "constant" else int(steps),
            "decay_steps": int(decay_steps) if lr_schedule == "cosine-tail" else None,
            "blocks": [int(blocks.shape[0]), int(blocks.shape[1]), _digest_tensor(blocks)],
            "val_blocks": None if val_blocks is None else [int(val_blocks.shape[0]), int(val_blocks.shape[1]),
                                                           _digest_tensor(val_blocks), int(val_every)]}


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-" + path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old checkpoint or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_checkpoint(path: Path, hnet: HyperNetwork, opt: torch.optim.Optimizer, gen: torch.Generator,
                     step: int, position: int, fingerprint: dict, extra: dict,
                     extra_tensors: Optional[dict] = None) -> None:
    from safetensors.torch import save

    tensors = {f"hnet.{k}": v.detach().cpu().contiguous() for k, v in hnet.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
    state = opt.state_dict()["state"]
    for i, st in state.items():
        for key, v in st.items():
            tensors[f"opt.{i}.{key}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().cpu()
    tensors["rng.noise"] = gen.get_state()
    meta = {"format": _FORMAT, "step": step, "position": position, "fingerprint": fingerprint, **extra}
    _atomic_write(path, save(tensors, metadata={"format": _FORMAT, "json": json.dumps(meta)}))


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header.get("json", "null"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable dip_ext hypernetwork checkpoint ({e}); "
                         f"use another checkpoint_dir or remove the file") from None
    if header.get("format") != _FORMAT or not isinstance(meta, dict) or "fingerprint" not in meta:
        raise ValueError(f"{path} is not a dip_ext hypernetwork checkpoint "
                         f"(format {header.get('format')!r}); "
                         f"use another checkpoint_dir or remove the file")
    return tensors, meta


def _restore(tensors: dict, hnet: HyperNetwork, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    hnet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("hnet.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    device = next(hnet.parameters()).device
    for st in state.values():
        for key in st:
            if key != "step":
                st[key] = st[key].to(device)
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    gen.set_state(tensors["rng.noise"])


# ---- training ----------------------------------------------------------------------------------------------

def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Block indices of ``step``: the stream of per-epoch seeded shuffles, cut into batches (stateless)."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n)
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + epoch) % 2**63)
        perm = torch.randperm(n, generator=gen)
        take = min(batch_size - len(out), n - off)
        out.extend(perm[off:off + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.int64)


def _adamw(hnet: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # The fused kernel makes one pass over the ~15 M head parameters (SmolLM2): 6x faster than foreach on CPU.
    try:
        return torch.optim.AdamW(hnet.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device / torch without the fused kernel
        return torch.optim.AdamW(hnet.parameters(), lr=lr, weight_decay=weight_decay)


def _check_blocks(model, blocks, name: str) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        what = (f"a {blocks.dim()}-D {blocks.dtype} tensor" if isinstance(blocks, torch.Tensor)
                else type(blocks).__name__)
        raise TypeError(f"{name} must be a 2-D LongTensor [n_blocks, seq_len] of token ids, got {what}")
    if blocks.shape[0] == 0:
        raise ValueError(f"{name} is empty: no calibration windows")
    if blocks.shape[1] < 2:
        raise ValueError(f"{name} need at least 2 tokens per window to have a next-token loss, got "
                         f"{blocks.shape[1]}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (int(blocks.min()) < 0 or int(blocks.max()) >= vocab):
        raise ValueError(f"{name} hold token ids outside [0, {vocab}) (tokenized for another model?)")


def _check_args(model, blocks, budget, dims, steps, lam, lr, weight_decay, temperature, batch_size,
                multiple_of, checkpoint_every, val_blocks, val_every, margin, lr_schedule="constant",
                decay_steps=None):
    _check_blocks(model, blocks, "blocks")
    check_lr_schedule(lr_schedule, decay_steps, steps)
    if val_blocks is not None:
        _check_blocks(model, val_blocks, "val_blocks")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("multiple_of", multiple_of),
                        ("checkpoint_every", checkpoint_every), ("val_every", val_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value, ok in (("lam", lam, lam >= 0), ("lr", lr, lr > 0), ("weight_decay", weight_decay,
                            weight_decay >= 0), ("temperature", temperature, temperature > 0),
                            ("margin", margin, margin > 0)):
        if not (math.isfinite(value) and ok):
            bound = "> 0" if name in ("lr", "temperature", "margin") else ">= 0"
            raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a dip_ext.selection.Budget (Budget.for_model(model, ratio)), "
                        f"got {type(budget).__name__}")
    bdims = adapter_for(budget.config).dims(budget.config)
    if bdims != dims:
        raise ValueError(f"budget was made for a model of {bdims}, this model is {dims}")


def learn_masks_hypernetwork(model: nn.Module, blocks: torch.Tensor, budget: Budget, *, steps: int = 200,
                             init_masks: Optional[DispMasks] = None, lam: float = 16.0, lr: float = 1e-3,
                             weight_decay: float = 0.05, temperature: float = 0.4, offset: float = 3.0,
                             batch_size: int = 1, seed: int = 0, multiple_of: int = 1, margin: float = 3.0,
                             distill: bool = False, lr_schedule: str = "constant",
                             decay_steps: Optional[int] = None,
                             val_blocks: Optional[torch.Tensor] = None, val_every: int = 50,
                             checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 50,
                             resume: bool = False, progress: bool = True, log: Optional[list] = None,
                             callback: Optional[Callable[[dict], None]] = None,
                             report: Optional[dict] = None) -> DispMasks:
    """Trains the DISP hypernetwork on ``blocks`` against the frozen ``model``; returns masks meeting
    ``budget``.

    Args:
        model: a dense Hugging Face causal LM of a supported family (any device / dtype). It is put in eval
            mode with ``requires_grad`` off during training; both are restored afterwards. Only the
            hypernetwork (float32, on the model's device) receives gradients.
        blocks: ``[n_blocks, seq_len]`` int64 token ids (calibration windows). Step ``t`` trains on
            ``batch_size`` windows taken from per-epoch shuffles seeded by ``seed``.
        budget: :meth:`Budget.for_model` of this model (the kept decoder-linear target).
        steps: total optimisation steps (with ``resume``, the count to reach, not to add).
        init_masks: warm start (e.g. the one-shot selection): heads set so ``logit + offset`` is ``+margin`` on
            kept and ``-margin`` on dropped dims before training.
        margin: the warm start's distance from the keep threshold (default 3). With 3, the export does not
            change for the first ~100 steps at lr 1e-3 (every logit must first cross it). Measured on SmolLM2 at
            30 % (RESULTS.md): a margin of 1 is much worse, not faster: the held-out loss of the export rose
            from 4.24 to 6.2 within 200 steps (LM loss or distillation alike; not diagnosed further, our guess
            is that early noisy updates reorder the dimensions before any signal accumulates).
        distill: train on the KL divergence from the dense model's next-token distribution (computed each step
            with the masks off, under no_grad) instead of the LM loss on the labels: a signal over the whole
            vocabulary at every position, for one extra forward per step (831 s against 596 s for 200 steps on
            one CPU core). Memory: the teacher's ``[batch, seq_len, vocab]`` float32 log-probabilities are held
            beside the student's (e.g. 0.5 GB per 1 024-token window for a 128 k vocabulary).
            Measured on SmolLM2 (RESULTS.md): at 30 %, lr 3e-3, better than the LM loss after 200 steps
            (held-out LM loss 4.026 against 4.151); after 1 000 steps worse on the calibration domain (wiki
            perplexity x1.90 against x1.78 for 1 300 LM-loss steps) and far better on another text (PTB x1.91
            against x2.19); at 20 %, lr 3e-3 was too high.
        lam, lr, weight_decay, temperature, offset: the paper's λ, AdamW settings, Gumbel-sigmoid temperature
            and logit offset.
        lr_schedule: ``"constant"`` (the paper's); ``"cosine"``: a half cosine from ``lr`` at step 0 to 0 at
            ``steps``; or ``"cosine-tail"``: ``lr`` until the last ``decay_steps`` steps, then a half cosine to
            0 over them (anneal at the end of a constant run). A checkpoint resumes under any schedule that
            gives the same learning rate at every step it has already taken: a constant run's checkpoint
            continues as a ``"cosine-tail"`` run whose decay starts at or after it, whereas a cosine run
            resumes only with the same ``steps``.
        decay_steps: the length of the ``"cosine-tail"`` decay (only with that schedule).
        multiple_of: round every exported kept width to a multiple (see :func:`export_masks`).
        val_blocks: ``[n_val, seq_len]`` held-out calibration windows (never trained on). When given, the
            exported masks (the ones that would be returned) are scored by their mean LM loss on these
            windows at the start and every ``val_every`` steps (and at the last step), and the best-scoring
            export is returned instead of the last one (early stopping: with a warm start, step 0 scores the
            one-shot masks, so training can only replace them by masks that do better on held-out text).
            Measured on SmolLM2 (RESULTS.md): training on a few dozen windows overfits after a few hundred
            steps.
        checkpoint_dir: where ``hypernetwork.ckpt.safetensors`` is written (atomically) every
            ``checkpoint_every`` steps and at the end: hypernetwork, optimizer, noise-RNG state, step, batch
            position and a fingerprint of the run's settings. An existing checkpoint there is refused unless
            ``resume``; ``resume=True`` continues from it exactly (the same final masks as an uninterrupted
            run), refuses one whose fingerprint differs, and starts fresh when there is none.
        progress: a tqdm bar with the LM loss, the deterministic mask's kept ratio and the ETA.
        log: if given, receives one dict per step run: step, lm_loss (the KL with ``distill``), budget_loss,
            kept_ratio (deterministic mask), expected_ratio (under the noise), seconds, and val_loss at
            validation steps.
        callback: called with each step's log dict after that step (and its checkpoint); may raise to stop.
        report: if given, updated with the export info (kept/target parameters, threshold) and the run
            summary (with validation: best_step, best_val_loss and the val_history ``[[step, loss], ...]``).

    Data-parallel (``torch.distributed`` initialised, e.g. by :func:`dip_ext.distributed.init_from_env` under
    torchrun): every rank calls this with the same arguments. Step ``t`` draws one global batch of
    ``batch_size * world_size`` windows from the seeded order and rank ``r`` trains on its ``r``-th share of
    ``batch_size``; the hypernetwork gradients (and the LM loss, for the log) are averaged across ranks before
    the AdamW step. The Gumbel noise comes from the same seeded generator on every rank, so all ranks sample
    the same masks and keep identical hypernetworks; the exported masks are checked to be equal on all ranks.
    Only rank 0 writes checkpoints (all ranks wait for it) and shows the progress bar; on resume rank 0 reads
    the checkpoint and sends it to the others. The fingerprint records the GLOBAL batch, so a checkpoint
    resumes under any world size with the same global batch (e.g. written by 2 ranks of batch 1, resumed by
    1 process of batch 2). Wrap the caller in :func:`dip_ext.distributed.fail_fast` so that an error on one
    rank ends the job instead of leaving the others waiting in a collective.
    """
    adapter = adapter_for(model)
    dims = adapter.dims(model.config)
    _check_args(model, blocks, budget, dims, steps, lam, lr, weight_decay, temperature, batch_size,
                multiple_of, checkpoint_every, val_blocks, val_every, margin, lr_schedule, decay_steps)
    if init_masks is not None:
        init_masks.validate(dims)
    device = next(model.parameters()).device
    blocks = blocks.cpu()
    val_blocks = None if val_blocks is None else val_blocks.cpu()
    world, rank = dist.world_size(), dist.rank()
    global_batch = batch_size * world
    fingerprint = _fingerprint(model, dims, budget, blocks, seed=seed, lam=lam, lr=lr,
                               weight_decay=weight_decay, temperature=temperature, offset=offset,
                               batch_size=global_batch, val_blocks=val_blocks, val_every=val_every,
                               margin=margin, distill=distill, lr_schedule=lr_schedule, steps=steps,
                               decay_steps=decay_steps)
    init_digest = None if init_masks is None else _masks_digest(init_masks, dims)
    if world > 1:  # ranks given different data or settings would silently train different hypernetworks
        dist.check_same((fingerprint, init_digest, steps, checkpoint_dir is None), "run settings")

    hnet = HyperNetwork(dims, seed=seed).to(device)
    opt = _adamw(hnet, lr, weight_decay)
    gen = torch.Generator().manual_seed(int(seed) + 2)  # the Gumbel noise; CPU so every device draws the same
    start = 0
    best = _Best()

    ckpt_path = None
    if checkpoint_dir is not None:
        ckpt_path = _checkpoint_path(checkpoint_dir)
        loaded = _read_on_main(ckpt_path)
        if loaded is not None:
            start = _resume_from(ckpt_path, loaded, resume, fingerprint, init_digest, global_batch, hnet, opt,
                                 gen)
            best = _Best.from_checkpoint(*loaded)
            if start > steps:
                raise ValueError(f"{ckpt_path} is at step {start}, beyond steps={steps}; pass steps >= {start} "
                                 f"(a run cannot go back) or use another checkpoint_dir")
    if start == 0 and init_masks is not None:
        hnet.warm_start(init_masks, offset=offset, margin=margin)

    def save(step: int) -> None:
        if ckpt_path is not None:
            if rank == 0:
                _save_checkpoint(ckpt_path, hnet, opt, gen, step, step * global_batch, fingerprint,
                                 {"init_masks": init_digest, "time": time.time(), "world_size": world,
                                  **best.meta()}, best.tensors())
            dist.barrier()  # a peer that fails after this point leaves a checkpoint every rank had reached

    saved_flags = [(q, q.requires_grad) for q in model.parameters()]
    was_training = model.training
    bar = None
    t_start = time.perf_counter()
    try:
        for q, _ in saved_flags:
            q.requires_grad_(False)
        model.eval()
        with apply_masks(model, None) as masked:
            def validate(step: int) -> Optional[float]:
                if val_blocks is None:
                    return None
                with torch.no_grad():
                    flat = _flatten(hnet())
                loss = _validation_loss(_unflatten(flat, dims), masked, model, val_blocks, budget, offset=offset,
                                        multiple_of=multiple_of, device=device)
                best.offer(step, loss, flat)
                return loss

            if start == 0 and best.step is None:
                validate(0)
            if start < steps:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, initial=start, desc="hypernetwork", unit="step",
                           disable=not progress or rank != 0, dynamic_ncols=True)
            for step in range(start, steps):
                t0 = time.perf_counter()
                order = _batch_indices(step, global_batch, blocks.shape[0], seed)
                ids = blocks[order[rank * batch_size:(rank + 1) * batch_size]].to(device)
                lm_loss, budget_loss, r, expected = _losses(hnet, masked, model, ids, budget, gen, lam=lam,
                                                            temperature=temperature, offset=offset,
                                                            distill=distill)
                loss = lm_loss + budget_loss
                if world == 1:
                    _check_loss(loss, lm_loss, step)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                else:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    lm_loss = _average_grads(hnet, lm_loss, world)
                    _check_loss(lm_loss + budget_loss, lm_loss, step)  # the same verdict on every rank
                for group in opt.param_groups:
                    group["lr"] = scheduled_lr(lr, lr_schedule, step, steps, decay_steps)
                opt.step()
                entry = {"step": step + 1, "lm_loss": lm_loss.item(), "budget_loss": budget_loss.item(),
                         "kept_ratio": r, "expected_ratio": expected, "seconds": time.perf_counter() - t0}
                if (step + 1) % val_every == 0 or step + 1 == steps:
                    val = validate(step + 1)
                    if val is not None:
                        entry["val_loss"] = val
                if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                    save(step + 1)
                if log is not None:
                    log.append(entry)
                if bar is not None:
                    post = dict(lm=f"{entry['lm_loss']:.3f}", kept=f"{r:.3f}", target=f"{budget.target_ratio:.3f}")
                    if best.step is not None:
                        post["val"] = f"{best.loss:.3f}@{best.step}"
                    bar.set_postfix(**post, refresh=False)
                    bar.update(1)
                if callback is not None:
                    callback(entry)
    finally:
        if bar is not None:
            bar.close()
        for q, flag in saved_flags:
            q.requires_grad_(flag)
        model.train(was_training)

    with torch.no_grad():
        logits = hnet() if best.scores is None else _unflatten(best.scores, dims)
        masks, info = export_masks(logits, budget, offset=offset, multiple_of=multiple_of)
    if world > 1:
        dist.check_same(_masks_digest(masks, dims), "exported masks")
    if report is not None:
        report.update(info)
        report.update({"steps": steps, "start_step": start, "train_seconds": time.perf_counter() - t_start,
                       "warm_start": init_masks is not None})
        if best.step is not None:
            report.update({"best_step": best.step, "best_val_loss": best.loss,
                           "val_history": [list(h) for h in best.history]})
    return masks


class _Best:
    """The best-scoring export so far on the validation windows: its step, loss and the logits behind it.

    ``scores`` is the flat (layer-major, :data:`STRUCTURES` order) float32 logit vector, so the returned masks
    are re-exported from exactly the hypernetwork output that was scored. Saved in checkpoints so a resumed
    run keeps the best of the steps before the interruption.
    """

    def __init__(self):
        self.step: Optional[int] = None
        self.loss = math.inf
        self.scores: Optional[torch.Tensor] = None
        self.history: list[tuple[int, float]] = []

    def offer(self, step: int, loss: float, scores: torch.Tensor) -> None:
        """Records ``loss`` of the export of the flat logits ``scores`` at ``step``; keeps them if best."""
        self.history.append((step, loss))
        if self.step is None or loss < self.loss:  # ties keep the earlier (warm-start) masks
            self.scores = scores.detach().float().cpu()
            self.step, self.loss = step, loss

    def meta(self) -> dict:
        return {"best_step": self.step, "best_val_loss": self.loss if self.step is not None else None,
                "val_history": self.history}

    def tensors(self) -> dict:
        return {} if self.scores is None else {"best.scores": self.scores}

    @classmethod
    def from_checkpoint(cls, tensors: dict, meta: dict) -> "_Best":
        best = cls()
        if meta.get("best_step") is not None:
            if "best.scores" not in tensors:
                raise ValueError("hypernetwork checkpoint records a best step but holds no best.scores")
            best.step, best.loss = int(meta["best_step"]), float(meta["best_val_loss"])
            best.scores = tensors["best.scores"].float()
            best.history = [(int(a), float(b)) for a, b in meta.get("val_history", [])]
        return best


@torch.no_grad()
def _validation_loss(logits, masked, model, val_blocks: torch.Tensor, budget: Budget, *, offset: float,
                     multiple_of: int, device, batch: int = 8) -> float:
    """Mean LM loss over ``val_blocks`` of the model under the masks :func:`export_masks` makes of ``logits``;
    the same number (and so the same best step) on every rank (:func:`dip_ext.eval.mean_window_loss`)."""
    masks, _ = export_masks(logits, budget, offset=offset, multiple_of=multiple_of)
    masked.set_masks(masks)
    value = mean_window_loss(model, val_blocks, batch_size=batch, device=device)
    if not math.isfinite(value):
        raise FloatingPointError(f"validation loss of the exported masks is {value}")
    return value


def _masks_digest(masks: DispMasks, dims: ModelDims) -> str:
    return hashlib.sha256(json.dumps(masks.to_config(dims)).encode()).hexdigest()[:16]


def _check_loss(loss: torch.Tensor, lm_loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"hypernetwork loss became {float(loss)} at step {step + 1} "
                                 f"(LM loss {float(lm_loss)}); lower lr or check the model / blocks")


def _average_grads(hnet: nn.Module, lm_loss: torch.Tensor, world: int) -> torch.Tensor:
    """Averages the hypernetwork gradients over the ranks in place (one collective, the LM loss riding
    along); returns the global mean LM loss.

    Every rank's LM loss is the mean over its equal share of windows of equal length, so the mean of the
    ranks' gradients is the gradient of the global batch's mean loss. The budget term is the same on every
    rank and its gradient survives the averaging unchanged.
    """
    lm = lm_loss.detach().reshape(1).to(torch.float32).clone()
    grads = [p.grad for p in hnet.parameters()]
    dist.all_reduce_sum_(grads + [lm])
    for g in grads:
        if g is not None:
            g.div_(world)
    return (lm / world).reshape(())


def _checkpoint_path(checkpoint_dir) -> Path:
    ckpt_dir = Path(checkpoint_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ValueError(f"checkpoint_dir {ckpt_dir} exists and is not a directory")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return ckpt_dir / CHECKPOINT_NAME


def _read_on_main(path: Path):
    """``(tensors, meta)`` of the checkpoint at ``path`` as rank 0 sees it, on every rank; None if rank 0 has
    none.

    Only rank 0 reads (its disk holds the checkpoints it wrote, shared or not); the others receive the content,
    so every rank restores the same state and raises the same error for a bad file.
    """
    if dist.world_size() == 1:
        return _read_checkpoint(path) if path.exists() else None
    payload = None
    if dist.is_main():
        try:
            payload = ("ok", _read_checkpoint(path)) if path.exists() else ("none", None)
        except ValueError as e:
            payload = ("error", str(e))
    kind, value = dist.broadcast_object(payload)
    if kind == "error":
        raise ValueError(value)
    return value if kind == "ok" else None


def _resume_from(path: Path, loaded: tuple[dict, dict], resume: bool, fingerprint: dict, init_digest,
                 batch_size: int, hnet, opt, gen) -> int:
    """Loads the checkpoint ``loaded`` (read from ``path``) into hnet / opt / gen after checking it is this
    run's; returns its step. ``batch_size`` is the global batch (all ranks together)."""
    tensors, meta = loaded
    if not resume:
        raise ValueError(f"{path} already holds a hypernetwork checkpoint (step {meta.get('step')}); "
                         f"pass resume=True to continue it, or use another checkpoint_dir")
    # Checkpoints written before an option existed ran with its default: they resume under that default.
    saved = {**_FINGERPRINT_BEFORE_OPTIONS, **meta["fingerprint"]}
    def differences(keys) -> str:
        return ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {fingerprint.get(k)!r}" for k in sorted(keys)
                         if saved.get(k) != fingerprint.get(k))

    detail = differences((set(saved) | set(fingerprint)) - set(_SCHEDULE_KEYS))
    if detail:
        raise ValueError(f"{path} was written by a different run and cannot be resumed ({detail})")
    try:
        differs = _first_lr_difference(saved, fingerprint, int(meta["step"]))
    except (TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: corrupt learning-rate schedule in the checkpoint ({differences(_SCHEDULE_KEYS)})"
                         ) from e
    if differs is not None:
        raise ValueError(f"{path} was written by a different run and cannot be resumed: its learning rate at step "
                         f"{differs} differs from this run's ({differences(_SCHEDULE_KEYS)})")
    if init_digest is not None and meta.get("init_masks") not in (None, init_digest):
        # Not an error: init_masks only shape step 0, and a recomputed one-shot selection may differ by a dim.
        warnings.warn("resuming a hypernetwork run warm-started from different init_masks; the warm start "
                      "only matters at step 0, so the checkpoint's state is used", stacklevel=3)
    start = int(meta["step"])
    if int(meta["position"]) != start * batch_size:
        raise ValueError(f"{path}: batch position {meta['position']} does not match step {start}")
    _restore(tensors, hnet, opt, gen)
    return start


def _losses(hnet, masked, model, ids, budget: Budget, gen, *, lam, temperature, offset, distill=False):
    """One step's (LM loss, budget loss) tensors, and the kept ratios of the deterministic mask and expected.

    LM loss: the frozen model under a hard Gumbel-sigmoid sample (straight-through); with ``distill`` the mean
    per-token KL(dense || masked) of the next-token distributions instead. Budget loss: on the
    deterministic mask ``logit + offset > 0`` with the gradient of the keep probability
    ``sigmoid(logit + offset)`` (see the module docstring).
    """
    dims = hnet.dims
    teacher = _dense_log_probs(masked, model, ids) if distill else None
    flat = _flatten(hnet()) + offset
    u = torch.rand(flat.numel(), generator=gen).clamp_(1e-6, 1 - 1e-6).to(flat.device)
    soft = torch.sigmoid((flat + torch.log(u) - torch.log1p(-u)) / temperature)  # logistic = Gumbel - Gumbel
    sample = (soft > 0.5).to(soft.dtype) + soft - soft.detach()
    masked.set_masks(_unflatten(sample, dims))
    if teacher is None:
        lm_loss = model(input_ids=ids, labels=ids, use_cache=False).loss.float()
    else:
        student = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        lm_loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")

    keep_p = torch.sigmoid(flat)
    det = (flat > 0).to(flat.dtype) + keep_p - keep_p.detach()
    r = budget.kept_ratio(_widths(det, dims))
    if not isinstance(r, torch.Tensor):  # every block emptied: the count is the int 0
        r = torch.tensor(float(r), device=flat.device)
    budget_loss = lam * (torch.log(r.clamp_min(1e-8)) - math.log(budget.target_ratio)).abs()
    with torch.no_grad():
        expected = float(budget.kept_ratio(_widths(keep_p, dims)))
    return lm_loss, budget_loss, r.item(), expected


@torch.no_grad()
def _dense_log_probs(masked, model, ids: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, vocab]`` float32 log-probabilities of the unmasked model (the distillation teacher)."""
    masked.set_masks([dict.fromkeys(STRUCTURES) for _ in range(masked.dims.num_layers)])
    return F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


def _widths(flat_masks: torch.Tensor, dims: ModelDims) -> list[dict[str, torch.Tensor]]:
    return [{s: m.sum() for s, m in layer.items()} for layer in _unflatten(flat_masks, dims)]


def _flatten(per_layer: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Per-structure vectors concatenated layer-major in :data:`STRUCTURES` order (inverse: :func:`_unflatten`)."""
    return torch.cat([layer[s] for layer in per_layer for s in STRUCTURES])


def _unflatten(flat: torch.Tensor, dims: ModelDims) -> list[dict[str, torch.Tensor]]:
    """Inverse of the layer-major concatenation of per-structure vectors."""
    sizes = [dims.size(s) for s in STRUCTURES] * dims.num_layers
    parts = torch.split(flat, sizes)
    n = len(STRUCTURES)
    return [dict(zip(STRUCTURES, parts[i * n:(i + 1) * n])) for i in range(dims.num_layers)]
