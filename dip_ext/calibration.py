"""The calibration pass: run the frozen model over calibration blocks and accumulate what selection needs.

Per decoder layer and prunable structure it accumulates
- activation statistics of every prunable input (``dip_ext.ops.calibration_stats``: count, per-channel sum and
  sum of squares in fp64) at the normalized attention input, the attention output projection's input, the
  normalized MLP input and the MLP down projection's input;
- first-order Fisher scores: with a mask fixed at 1 on every prunable dimension, ``g = ∂L/∂m`` per calibration
  window, score ``Σ g²`` (the diagonal empirical Fisher: the expected loss increase of dropping that dimension
  is ≈ ½·score). The tied score of the dimension-dependent baseline (one mask shared by every hidden-width set
  of every layer) is accumulated alongside: ``Σ (Σ_sets g)²``.

The pass checkpoints every few windows and resumes (nothing is lost on interruption); its result is saved with
safetensors and reusable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .families import adapter_for
from .masking import MaskedModel
from .masks import STRUCTURE_SPACE, STRUCTURES, ModelDims
from .ops import CalibrationStats, calibration_stats

#: activation statistics points: name -> (structure whose mask point it shares, input side)
STAT_POINTS = {"attn_in": "attn_in", "attn_proj_in": "attn_out", "mlp_in": "mlp_in", "mlp_mid": "mlp_mid"}
HIDDEN = tuple(s for s in STRUCTURES if STRUCTURE_SPACE[s] == "hidden")


@dataclass
class CalibrationResult:
    """Fisher scores and activation statistics of one model on ``windows`` calibration windows."""

    dims: ModelDims
    windows: int = 0
    #: scores[i][s]: float64 [width of s] — Σ_windows (∂L/∂m)² per dimension
    scores: list[dict[str, torch.Tensor]] = field(default_factory=list)
    #: float64 [d] — Σ_windows (Σ_{layers, hidden sets} ∂L/∂m)²: the dimension-dependent (tied) score
    tied_hidden: Optional[torch.Tensor] = None
    #: stats[point][i]: activation statistics (STAT_POINTS)
    stats: dict[str, list[CalibrationStats]] = field(default_factory=dict)
    #: loss per window (mean token NLL), for the record
    losses: list[float] = field(default_factory=list)

    @classmethod
    def empty(cls, dims: ModelDims) -> "CalibrationResult":
        z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        return cls(dims, 0, [{s: z(dims.size(s)) for s in STRUCTURES} for _ in range(dims.num_layers)],
                   z(dims.hidden), {}, [])

    # ---- persistence (safetensors + JSON, no pickle) -------------------------------------------------------
    def save(self, path) -> None:
        """Writes ``path`` (a .safetensors file) atomically; the small metadata rides in its header."""
        tensors = {f"scores.{i}.{s}": t for i, layer in enumerate(self.scores) for s, t in layer.items()}
        tensors["tied_hidden"] = self.tied_hidden
        for point, per_layer in self.stats.items():
            for i, st in enumerate(per_layer):
                for k, v in st.state_dict().items():
                    tensors[f"stats.{point}.{i}.{k}"] = v.reshape(-1) if k == "count" else v
        meta = {"format": "dip_ext.calibration.v1", "windows": str(self.windows), "losses": json.dumps(self.losses),
                "dims": json.dumps([self.dims.num_layers, self.dims.hidden, self.dims.ffn])}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "CalibrationResult":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a readable calibration file ({e})") from None
        if meta.get("format") != "dip_ext.calibration.v1":
            raise ValueError(f"{path}: not a dip_ext calibration file")
        dims = ModelDims(*json.loads(meta["dims"]))
        res = cls(dims, int(meta["windows"]),
                  [{s: tensors[f"scores.{i}.{s}"] for s in STRUCTURES} for i in range(dims.num_layers)],
                  tensors["tied_hidden"], {}, json.loads(meta["losses"]))
        for point in STAT_POINTS:
            if f"stats.{point}.0.sum" in tensors:
                res.stats[point] = [CalibrationStats.from_state_dict(
                    {k: tensors[f"stats.{point}.{i}.{k}"] for k in ("count", "sum", "sumsq")})
                    for i in range(dims.num_layers)]
        return res


def _check_blocks(blocks) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        raise ValueError("calibration blocks must be a LongTensor [n_windows, seq_len] of token ids")
    if blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"calibration needs at least one window of >= 2 tokens, got shape {tuple(blocks.shape)}")
    return blocks


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_calibration(model: nn.Module, blocks: torch.Tensor, *, stats: bool = True, progress: bool = True,
                    checkpoint: Optional[os.PathLike] = None, checkpoint_every: int = 8) -> CalibrationResult:
    """Fisher scores (+ activation statistics) of the frozen dense ``model`` over ``blocks`` [n, seq_len].

    One window per forward/backward (the Fisher needs per-window gradients). With ``checkpoint`` (a file path)
    the partial result is saved every ``checkpoint_every`` windows and a rerun resumes from it. Raises
    ValueError on non-finite activations or loss (names the layer / window).
    """
    blocks = _check_blocks(blocks)
    adapter = adapter_for(model)
    dims = adapter.dims(model.config)
    device = _model_device(model)
    result = CalibrationResult.empty(dims)
    if checkpoint is not None and Path(checkpoint).is_file():
        result = CalibrationResult.load(checkpoint)
        if result.dims != dims:
            raise ValueError(f"{checkpoint}: calibration checkpoint of another model ({result.dims} vs {dims})")
    start = result.windows
    if start > blocks.shape[0]:
        raise ValueError(f"{checkpoint}: checkpoint has {start} windows but only {blocks.shape[0]} were given")

    ones = [{s: torch.ones(dims.size(s), device=device, requires_grad=True) for s in STRUCTURES}
            for _ in range(dims.num_layers)]
    flat = [m for layer in ones for m in layer.values()]
    layers = adapter.decoder_layers(model)
    hooks = []
    if stats:
        if not result.stats:
            result.stats = {p: [CalibrationStats.empty(dims.size(s)) for _ in range(dims.num_layers)]
                            for p, s in STAT_POINTS.items()}
        for i, layer in enumerate(layers):
            points = adapter.mask_points(layer)
            for p, s in STAT_POINTS.items():
                module = points[s][0][0]

                def hook(mod, args, p=p, i=i):
                    x = args[0].detach()
                    if x.dim() in (2, 3):  # OPT runs its MLP on [tokens, d]
                        result.stats[p][i].merge(calibration_stats(x))
                hooks.append(module.register_forward_pre_hook(hook))

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with MaskedModel(model, ones):
            bar = tqdm(range(start, blocks.shape[0]), desc="calibration (Fisher)", disable=not progress,
                       initial=start, total=blocks.shape[0])
            for w in bar:
                ids = blocks[w:w + 1].to(device)
                loss = model(input_ids=ids, labels=ids).loss
                if not torch.isfinite(loss):
                    _check_finite(result)  # names the first layer whose activations went non-finite
                    raise ValueError(f"non-finite loss on calibration window {w}: the model or its input is broken")
                grads = torch.autograd.grad(loss, flat)
                tied = torch.zeros(dims.hidden, dtype=torch.float64)
                for k, g in enumerate(grads):
                    i, s = divmod(k, len(STRUCTURES))
                    g64 = g.detach().double().cpu()
                    result.scores[i][STRUCTURES[s]] += g64 * g64
                    if STRUCTURES[s] in HIDDEN:
                        tied += g64
                result.tied_hidden += tied * tied
                result.losses.append(float(loss.detach()))
                result.windows = w + 1
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                if checkpoint is not None and (result.windows % checkpoint_every == 0):
                    _check_finite(result)
                    result.save(checkpoint)
    finally:
        for h in hooks:
            h.remove()
        for p, req in frozen:
            p.requires_grad_(req)
        model.train(was_training)
    _check_finite(result)
    if checkpoint is not None:
        result.save(checkpoint)
    return result


def _check_finite(result: CalibrationResult) -> None:
    # layer by layer, points in forward order: a NaN spreads downstream, so the first hit is where it started
    for i in range(result.dims.num_layers):
        for p in (p for p in STAT_POINTS if p in result.stats):
            st = result.stats[p][i]
            if not (torch.isfinite(st.sum).all() and torch.isfinite(st.sumsq).all()):
                raise ValueError(f"non-finite calibration activations at layer {i} ({p}): NaN/inf in the model's "
                                 "activations (check the weights / dtype; fp16 may overflow)")
    for i, layer in enumerate(result.scores):
        for s, t in layer.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"non-finite Fisher scores at layer {i} {s}")
