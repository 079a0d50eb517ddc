"""Block-wise reconstruction: each compacted decoder layer, in order, fitted to the dense model's hidden state after
that layer, fed the pruned model's own input.

Layer i sees ``x_s`` (the residual stream of the student with layers < i already reconstructed) and is trained
for a few Adam epochs so that ``layer_i(x_s)`` ≈ ``t_{i+1}``, the dense model's residual stream after layer i on
the same windows. Because the target is the dense stream (not the dense layer applied to ``x_s``), each layer also
corrects what the layers before it could not, and errors do not compound. Published as sub-module reconstruction
("block reconstruction", e.g. BRECQ, Li et al. ICLR 2021, for quantization; for pruning it matches LoRA with far
less data). The loss is the per-token relative squared error ‖y − t‖² / ‖t‖² averaged over tokens (attention-sink
tokens with residual norms hundreds of times the median would otherwise decide the fit).

Memory: the two streams ``[n_windows, seq_len, d]`` (student and dense) plus one layer's activations; only one
layer trains at a time, so there is no backward through the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import spread_indices
from ..families import adapter_for
from ..model_state import model_device
from ..training import copy_into, requires_grad_only
from .checkpoint import LABELS, RECONSTRUCT_FORMAT, reconstruct_fingerprint
from .checks import check_reconstruction_teacher
from .config import RecoveryConfig

__all__ = ["ReconstructionRun", "reconstruct", "relative_error", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "reconstruct.safetensors"
#: windows per Adam step of the reconstruction
BATCH = 4


@dataclass
class ReconstructionRun:
    """Per layer: relative output error ‖y − t‖²/‖t‖² (token mean) of the student layer on its own inputs before and
    after the fit; the windows and tokens used; seconds (summed over resumed runs)."""

    error_before: list = field(default_factory=list)
    error_after: list = field(default_factory=list)
    windows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: Optional[int] = None


class _Captured(Exception):
    pass


def _layer_kwargs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first decoder layer's input and keyword arguments (position embeddings, masks ...) for windows ``ids``,
    captured from a forward that stops there."""
    layer0 = adapter_for(model).decoder_layers(model)[0]
    box = {}

    def hook(module, args, kwargs):
        box["x"] = args[0] if args else kwargs["hidden_states"]
        box["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return box["x"], box["kwargs"]


def _run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def relative_error(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖y − t‖² / ‖t‖² (float32 0-d tensor; ``[..., d]`` inputs)."""
    y, t = y.float(), t.float()
    return ((y - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()


def _stream(layer, xs: torch.Tensor, kw_for) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([_run_layer(layer, xs[b:b + BATCH], kw_for(min(BATCH, xs.shape[0] - b)))
                          for b in range(0, xs.shape[0], BATCH)])


def reconstruct(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, config: RecoveryConfig, *,
                work_dir: Optional[Path] = None, resume: bool = False, progress: bool = True,
                main: bool = True) -> ReconstructionRun:
    """Fits every compacted decoder layer of ``student`` in place (see the module docstring) on
    ``config.recover_recon_windows`` of ``windows`` ``[n, seq_len]`` (evenly spaced), ``recover_recon_epochs`` Adam
    epochs of ``recover_recon_lr`` per layer, batches of 4 windows in a seeded order. Deterministic for a seed.

    ``work_dir``: after each layer the fitted layers' weights are saved (``reconstruct.safetensors``, atomically, by
    the ``main`` process); with ``resume`` the saved layers are loaded and the streams recomputed through them, so a
    killed run loses at most the layer in progress (ValueError naming each difference for a checkpoint of other
    options, windows or student). Data-parallel ranks each run the same fit on the same windows (it is cheap; only
    rank 0 writes). ValueError for an FSDP-sharded teacher (it runs the teacher layer by layer).
    """
    check_reconstruction_teacher(teacher)
    adapter = adapter_for(student)
    s_layers, t_layers = adapter.decoder_layers(student), adapter.decoder_layers(teacher)
    picked = windows[spread_indices(windows.shape[0], min(config.recover_recon_windows, windows.shape[0]))]
    picked = picked.to(model_device(student))
    run = ReconstructionRun(windows=picked.shape[0], tokens=int(picked.numel()))
    kw_for = _kwargs_by_batch(teacher, picked)
    with torch.no_grad():
        xs = torch.cat([_layer_kwargs(student, picked[b:b + BATCH])[0] for b in range(0, run.windows, BATCH)])
        xt = torch.cat([_layer_kwargs(teacher, picked[b:b + BATCH])[0] for b in range(0, run.windows, BATCH)])
    path = Path(work_dir) / CHECKPOINT_NAME if work_dir is not None else None
    fingerprint = reconstruct_fingerprint(student, picked, config)
    loaded = RECONSTRUCT_FORMAT.load_matching(path, fingerprint, labels=LABELS) if resume and path else None
    tensors, meta = loaded if loaded is not None else ({}, {"layers_done": 0, "seconds": 0.0})
    done, seconds0 = int(meta["layers_done"]), float(meta["seconds"])
    if loaded is not None:
        run.resumed_from = done
        run.error_before, run.error_after = list(meta["error_before"]), list(meta["error_after"])
    t0 = time.perf_counter()
    with requires_grad_only(student):  # _fit_layer opens each layer in turn
        for i in tqdm(range(len(s_layers)), desc="reconstruct", unit="layer", disable=not (progress and main)):
            layer, target = s_layers[i], _stream(t_layers[i], xt, kw_for)
            if i < done:
                copy_into(layer.named_parameters(), tensors, prefix=f"layer.{i}.")
                xs = _stream(layer, xs, kw_for)
            else:
                before, after, xs = _fit_layer(layer, xs, target, kw_for, config, seed=config.recover_seed + i)
                run.error_before.append(before)
                run.error_after.append(after)
            xt = target
            if i >= done and path is not None and main:
                state = {f"layer.{j}.{name}": p for j in range(i + 1) for name, p in s_layers[j].named_parameters()}
                RECONSTRUCT_FORMAT.write(path, state, {
                    "fingerprint": fingerprint, "layers_done": i + 1, "seconds": seconds0 + time.perf_counter() - t0,
                    "error_before": run.error_before, "error_after": run.error_after})
    run.seconds = seconds0 + time.perf_counter() - t0
    return run


def _kwargs_by_batch(teacher: nn.Module, picked: torch.Tensor):
    """``kw_for(b)``: the decoder layers' keyword arguments for a batch of ``b`` windows (computed once per size
    from the teacher; position embeddings and masks depend on the batch's shape only)."""
    cache: dict[int, dict] = {}

    def kw_for(b: int) -> dict:
        if b not in cache:
            with torch.no_grad():
                cache[b] = _layer_kwargs(teacher, picked[:b])[1]
        return cache[b]
    return kw_for


def _fit_layer(layer: nn.Module, xs: torch.Tensor, target: torch.Tensor, kw_for, config: RecoveryConfig, *,
               seed: int) -> tuple[float, float, torch.Tensor]:
    """Adam on ``layer``'s parameters toward ``target`` from inputs ``xs``; returns the relative error before and
    after (token means over all windows) and the fitted layer's outputs (the next layer's inputs)."""
    params = list(layer.parameters())
    if not params:  # a layer whose blocks were both removed holds nothing to fit
        out = _stream(layer, xs, kw_for)
        err = float(relative_error(out, target))
        return err, err, out
    before = float(relative_error(_stream(layer, xs, kw_for), target))
    optimizer = torch.optim.Adam(params, lr=config.recover_recon_lr)
    gen = torch.Generator().manual_seed(seed)
    n = xs.shape[0]
    was_training = layer.training
    layer.train()
    try:
        with requires_grad_only(layer, params):
            for _ in range(config.recover_recon_epochs):
                order = torch.randperm(n, generator=gen)
                for b in range(0, n, BATCH):
                    idx = order[b:b + BATCH]
                    loss = relative_error(_run_layer(layer, xs[idx], kw_for(idx.numel())), target[idx])
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    finally:
        layer.train(was_training)
    out = _stream(layer, xs, kw_for)
    return before, float(relative_error(out, target)), out
