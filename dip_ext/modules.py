"""Building blocks of a compacted DISP layer: fused norm+gather, compact linears, residual scatter-add.

Inference (no autograd needed) runs on the dip_ext kernels; when autograd is recording (e.g. fine-tuning a
compacted model) the same maths runs on differentiable plain-torch ops, so gradients stay correct.
Index sets are validated once when a layer is compacted; the kernels are then called with
``check_idx=False`` so no per-call host sync happens (CUDA graphs can capture decode).

Under ``torch.autocast`` both paths keep the dense model's dtypes: the compact linears are ``nn.Linear``
(autocast runs them in its dtype), the norms read the residual stream in its dtype, and a block's output,
often in the autocast dtype, is added into the residual in the residual's dtype (an fp32 stream stays fp32,
as the dense model's ``residual + block(x)`` promotes). The kernels do so by their autocast rules
(:mod:`dip_ext.ops`), the differentiable fallbacks by casting the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


def _autograd_needed(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class IndexSet:
    """A sorted int64 index set kept OUTSIDE the state dict, with a cached copy per device.

    Index sets are part of the architecture (they live in ``config.json``), not weights: Hugging Face's loader
    re-creates non-persistent buffers uninitialised, so they are not buffers. ``on(device)`` returns the copy
    for the device of the activations (made once, then reused, so CUDA-graph replays see fixed addresses).
    """

    def __init__(self, idx):
        self.cpu = torch.as_tensor(idx, dtype=torch.int64, device="cpu").clone()
        self._copies: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.cpu
        t = self._copies.get(device)
        if t is None:
            t = self._copies[device] = self.cpu.to(device)
        return t

    def numel(self) -> int:
        return self.cpu.numel()

    def __repr__(self) -> str:
        return f"IndexSet({self.cpu.numel()})"


def index_sets(module: nn.Module) -> list[IndexSet]:
    """The index sets ``module`` itself holds (not those of its children)."""
    return [v for v in vars(module).values() if isinstance(v, IndexSet)]


class IndexSetsFollowDevice:
    """Module mixin: moving the module (``.to`` / ``.cuda`` / ``.to_empty``) also makes its index sets' copy for the
    new device, so the first forward there does not create it lazily inside a ``torch.compile`` / CUDA-graph region
    (which would put a host-to-device copy into the graph). List it before the ``nn.Module`` class it is mixed into.
    """

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        sets = index_sets(self)
        if sets:
            try:
                device = fn(torch.empty(0, dtype=torch.int64)).device
            except Exception:  # noqa: BLE001 - an _apply that is not a device move (e.g. share_memory_)
                return out
            for idx in sets:
                idx.on(device)
        return out


def _execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device an accelerate hook (``device_map`` dispatch, offloading) runs ``module`` on, if it has one."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return None if device is None else torch.device(device)


def place_index_sets(model: nn.Module) -> None:
    """Makes every index set's copy for the device its module computes on, before any forward.

    Loaders that place weights without ``Module.to`` (``from_pretrained(..., device_map=...)``, accelerate's
    dispatch and offloading) bypass :class:`IndexSetsFollowDevice`; this walk covers them. A module computes on
    the execution device of the nearest accelerate hook on it or an ancestor (offloaded weights sit on "meta"
    until the hook brings them), else on the device of its first parameter or buffer (its own or a
    descendant's), else on its parent's.
    """

    def visit(module: nn.Module, device: torch.device, hooked: bool) -> None:
        execution = _execution_device(module)
        if execution is not None:
            device, hooked = execution, True
        elif not hooked:
            first = next(module.parameters(), None)
            if first is None:
                first = next(module.buffers(), None)
            device = device if first is None else first.device
        for idx in index_sets(module):
            idx.on(device)
        for child in module.children():
            visit(child, device, hooked)

    visit(model, torch.device("cpu"), False)


class _IndexedRMSNorm(IndexSetsFollowDevice, nn.Module):
    """An RMSNorm's full-width ``weight`` (scale ``1 + weight`` with ``unit_offset``), its ``eps`` and one index set:
    what :class:`RMSNormGather` and :class:`RMSNormScatterAdd` hold."""

    def __init__(self, weight: torch.Tensor, eps: float, idx: torch.Tensor, *, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.variance_epsilon = float(eps)
        self.unit_offset = bool(unit_offset)
        self.idx = IndexSet(idx)

    def extra_repr(self) -> str:
        return (f"d={self.weight.numel()}, kept={self.idx.numel()}, eps={self.variance_epsilon}"
                + (", scale=1+weight" if self.unit_offset else ""))


class RMSNormGather(_IndexedRMSNorm):
    """RMSNorm over the full width d, then only the columns ``idx``.

    ``x [..., d]`` → ``[..., len(idx)]`` in x's dtype; statistics in fp32. ``weight`` keeps its full width d
    (it is a handful of numbers, and every kept subset of every block reads a different part of it). With
    ``unit_offset`` the scale is ``1 + weight`` (Gemma's norms, whose stored weight is centred on 0); the kernel
    then reads ``1 + weight`` rounded to x's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.idx.on(x.device)
        weight = (1 + self.weight.float()).to(x.dtype) if self.unit_offset else self.weight
        if _autograd_needed(x, self.weight) or x.dim() not in (2, 3):
            return F.rms_norm(x, (x.shape[-1],), weight, self.variance_epsilon).index_select(-1, idx)
        return ops.rms_norm_gather(x, weight, idx, self.variance_epsilon, check_idx=False)


class LayerNormGather(IndexSetsFollowDevice, nn.Module):
    """LayerNorm (with optional bias) over the full width d, then only the columns ``idx``.

    ``x [..., d]`` → ``[..., len(idx)]``; the affine parameters keep width d.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, idx: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.eps = float(eps)
        self.idx = IndexSet(idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather(x, self.idx)

    def gather(self, x: torch.Tensor, idx: IndexSet) -> torch.Tensor:
        """The same norm, gathering another index set (Phi's parallel block reads two sets of one norm)."""
        idx = idx.on(x.device)
        if _autograd_needed(x, self.weight, self.bias) or x.dim() not in (2, 3):
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps).index_select(-1, idx)
        return ops.layer_norm_gather(x, self.weight, self.bias, idx, self.eps, check_idx=False)

    def extra_repr(self) -> str:
        return f"d={self.weight.numel()}, kept={self.idx.numel()}, eps={self.eps}"


def compact_linear(linear: nn.Linear, rows: Optional[torch.Tensor] = None,
                   cols: Optional[torch.Tensor] = None) -> nn.Linear:
    """A new ``nn.Linear`` holding ``W[rows][:, cols]`` (and ``b[rows]``); None keeps all rows / columns."""
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        rows = rows.to(w.device)
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    out.weight.requires_grad_(linear.weight.requires_grad)
    if out.bias is not None:
        out.bias.requires_grad_(linear.bias.requires_grad)
    return out


def residual_add(x: torch.Tensor, idx: IndexSet, y: torch.Tensor, *, inplace: bool) -> torch.Tensor:
    """``x[..., idx] += y``: in place on ``x`` when ``inplace`` (x is ours), else on a copy.

    Callers pass ``inplace=False`` for the layer's input (it may be referenced elsewhere, e.g. collected
    hidden states) and ``inplace=True`` afterwards.
    """
    idx = idx.on(x.device)
    # under autocast a block's output may come in a lower precision than the residual stream: the fallbacks
    # add it in the residual's dtype, as the kernel's autocast rule does
    if _autograd_needed(x, y):
        return x.index_add(-1, idx, y.to(x.dtype))
    if not inplace:
        x = x.clone()
    if x.dim() not in (2, 3):
        return x.index_add_(-1, idx, y.to(x.dtype))
    return ops.scatter_add_(x, idx, y, check_idx=False)


def rms_norm_scatter_add(x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                         unit_offset: bool) -> torch.Tensor:
    """Differentiable plain-torch ``x[..., idx] += rms_norm(y)``: a new tensor (see :func:`ops.rms_norm_scatter_add_`
    for the semantics: RMS of the zero-padded output over the full width ``x.size(-1)``, fp32 statistics).

    The normalised value is rounded to y's dtype, then added in x's dtype: under autocast y may come in a
    lower precision than the residual stream (the kernel's autocast rule computes the same)."""
    yf = y.float()
    rstd = torch.rsqrt(yf.pow(2).sum(-1, keepdim=True) / x.shape[-1] + eps)
    scale = weight.float().index_select(0, idx) + (1.0 if unit_offset else 0.0)
    return x.index_add(-1, idx, (yf * rstd * scale).to(y.dtype).to(x.dtype))


class RMSNormScatterAdd(_IndexedRMSNorm):
    """An RMSNorm on a block's OUTPUT, folded into its residual update (Gemma's post-attention / post-feedforward
    norms): ``x[..., idx] += rms_norm(y) ⊙ scale[idx]``, the RMS taken over the full width d of the zero-padded
    output. ``y [..., len(idx)]``, ``x [..., d]``; ``weight`` keeps its full width d; the scale is ``1 + weight``
    with ``unit_offset``. Exact against normalising the dense, masked output. In place on ``x`` when ``inplace``.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, inplace: bool) -> torch.Tensor:
        idx = self.idx.on(x.device)
        if _autograd_needed(x, y, self.weight) or x.dim() not in (2, 3):
            return rms_norm_scatter_add(x, idx, y, self.weight, self.variance_epsilon, self.unit_offset)
        if not inplace:
            x = x.clone()
        return ops.rms_norm_scatter_add_(x, idx, y, self.weight, self.variance_epsilon, unit_offset=self.unit_offset,
                                         check_idx=False)
