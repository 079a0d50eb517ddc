"""Python face of the dip_ext kernels (``torch.ops.dip_ext.*``), with fake kernels for ``torch.compile``.

Shapes: ``x`` is ``[tokens, d]`` or ``[batch, seq, d]`` in float32 / float16 / bfloat16; ``idx`` is a 1-D
int64 (or int32) index set over the last dim. Every op checks its arguments in the C++ glue and raises a
``ValueError`` / ``IndexError`` / ``TypeError`` naming the op and the problem.

``check_idx=False`` skips the per-call range / duplicate scan of ``idx`` (a host read, i.e. a device sync
on CUDA): compacted models validate their index sets once and use it so decode stays capturable by CUDA
graphs. Passing unchecked bad indices is undefined behaviour, like any unchecked kernel. ``check_idx=True``
while the current CUDA stream is capturing a graph raises ``ValueError`` before anything is read (the capture
stays valid): validate once outside the capture, then pass ``check_idx=False`` inside it.

The in-place ops refuse overlapping memory like ``torch.Tensor.index_add_`` (``ValueError``): a residual whose
elements share memory (``expand()``, stride 0), and an input (``y``, ``x``, ``weight``, ``bias``, ``idx``)
that shares memory with the residual. ``calibration_stats_`` likewise refuses outputs that share memory with
each other or with ``x``. The legacy ONNX exporter (``torch.onnx.export(..., dynamo=False)``), which
would drop them, is refused (``LegacyOnnxExportError``); :func:`dip_ext.export_onnx` exports.

Under ``torch.autocast`` (CPU or CUDA) each op follows its torch equivalent, with or without grad and under
``torch.compile``: ``index_select_gemm`` runs in the autocast dtype like ``F.linear``; the in-place ops write
into ``residual`` in the residual's own dtype, as the dense model's ``residual + block(x)`` promotes (``y`` is
cast to it, ``gemm_scatter_add_`` casts its GEMM's output); the norm-gathers and ``calibration_stats_`` are
not cast. No aten call inside a kernel is autocast (a GEMM there keeps the dtype the rule gives it). Each
wrapper's docstring states its rule ("Under autocast").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from . import _C  # registers the ops
from .errors import refuse_legacy_onnx_export

_ops = torch.ops.dip_ext


def build_info() -> dict:
    """What the compiled extension was built with: version, torch version, CUDA archs (machine code and PTX,
    and where the list came from), OpenMP, the C++ standard."""
    return dict(_C.build_info())


def rms_norm_gather(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, eps: float,
                    *, check_idx: bool = True) -> torch.Tensor:
    """``F.rms_norm(x, (d,), weight, eps)[..., idx]``; statistics in fp32 over all d.

    Returns ``[..., len(idx)]`` in x's dtype.

    Under autocast: not cast; runs in x's dtype (weight must match it), as the dense models' RMSNorms do.
    """
    return _ops.rms_norm_gather(x, weight, idx, float(eps), check_idx)


def layer_norm_gather(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor,
                      eps: float, *, check_idx: bool = True) -> torch.Tensor:
    """``F.layer_norm(x, (d,), weight, bias, eps)[..., idx]``. Returns ``[..., len(idx)]``.

    Under autocast: not cast; runs in x's dtype (weight and bias must match it), statistics in fp32.
    """
    return _ops.layer_norm_gather(x, weight, bias, idx, float(eps), check_idx)


def index_select_gemm(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, *, check_idx: bool = True) -> torch.Tensor:
    """``F.linear(x.index_select(-1, idx), weight, bias)``; weight is ``[out, len(idx)]``.

    Returns ``[..., out]``.

    Under autocast: like ``F.linear``, x, weight and bias (floating, not fp64) are cast to the autocast dtype,
    which the result has, whichever kernel (GEMV or GEMM) the token count picks.
    """
    return _ops.index_select_gemm(x, idx, weight, bias, check_idx)


def scatter_add_(residual: torch.Tensor, idx: torch.Tensor, y: torch.Tensor,
                 *, check_idx: bool = True) -> torch.Tensor:
    """``residual.index_add_(-1, idx, y)`` in place (idx unique); returns ``residual``.

    Each element is added in fp32 and rounded once to the residual's dtype: bit-identical to ``index_add_`` on
    an fp32 copy, then a cast (``residual.float().clone().index_add_(-1, idx, y.float()).to(residual.dtype)``).
    ``y`` must not share memory with ``residual``, nor ``residual`` have elements that share memory
    (``ValueError``).

    Under autocast: ``y`` (a block's output, often in the autocast dtype) is cast to the residual's dtype, so
    an fp32 residual stays fp32 and receives ``y`` exactly, as ``residual + y`` promotes in the dense model.
    """
    refuse_legacy_onnx_export("scatter_add_")
    _ops.scatter_add_(residual, idx, y, check_idx)
    return residual


def gemm_scatter_add_(residual: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, *, check_idx: bool = True) -> torch.Tensor:
    """``residual.index_add_(-1, idx, F.linear(x, weight, bias))`` in place; weight is ``[len(idx), x.size(-1)]``.

    ``x``, ``weight`` and ``bias`` must not share memory with ``residual`` (``ValueError``). Returns ``residual``.

    Under autocast: the GEMM runs in the autocast dtype like ``F.linear`` (x, weight, bias cast to it) and
    its output is added into the residual in the residual's dtype (exactly, into an fp32 residual: the GEMM
    and the scatter-add then run as two steps).
    """
    refuse_legacy_onnx_export("gemm_scatter_add_")
    _ops.gemm_scatter_add_(residual, idx, x, weight, bias, check_idx)
    return residual


def rms_norm_scatter_add_(residual: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                          eps: float, *, unit_offset: bool = False, check_idx: bool = True) -> torch.Tensor:
    """Output RMSNorm folded into the residual update, in place (idx unique); returns ``residual``.

    ``y [..., len(idx)]`` is a block's output on its kept entries (zero elsewhere), so its RMS over the full width
    ``d = residual.size(-1)`` is ``sqrt(sum_j y_j^2 / d + eps)``; then ``residual[..., idx] += y * rsqrt(...) *
    (o + weight[idx])`` with ``weight [d]`` and ``o = 1`` when ``unit_offset`` (Gemma's ``(1 + w)`` scale), else 0.
    Statistics in fp32; the normalised value is rounded to the dtype before it is added (as the unfused model).

    Under autocast: the normalised value is computed in fp32 (``weight`` in its own dtype), rounded to y's
    dtype and added into the residual in the residual's dtype, as the dense model's norm (which returns y's
    dtype) and ``residual + ...`` (which promotes) do: an fp32 residual stays fp32 when y is bf16. When y or
    weight is in another dtype than the residual this runs unfused.
    """
    refuse_legacy_onnx_export("rms_norm_scatter_add_")
    _ops.rms_norm_scatter_add_(residual, idx, y, weight, float(eps), bool(unit_offset), check_idx)
    return residual


@dataclass
class CalibrationStats:
    """Running per-channel statistics of activations ``[..., d]``.

    ``count`` rows seen; ``sum`` and ``sumsq`` float64 ``[d]``; ``gram`` float64 ``[d, d]`` (XᵀX) or None.
    """

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    gram: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, d: int, *, gram: bool = False, device=None) -> "CalibrationStats":
        z = dict(dtype=torch.float64, device=device)
        return cls(0, torch.zeros(d, **z), torch.zeros(d, **z), torch.zeros(d, d, **z) if gram else None)

    @property
    def width(self) -> int:
        return self.sum.numel()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (float64)."""
        m = self.mean
        return (self.sumsq / max(self.count, 1) - m * m).clamp_min(0)

    @property
    def rms(self) -> torch.Tensor:
        """Root mean square per channel, ‖X[:, j]‖ / sqrt(count) (float64)."""
        return (self.sumsq / max(self.count, 1)).sqrt()

    def to(self, device) -> "CalibrationStats":
        """A copy on ``device`` (``self`` when already there). Statistics accumulate on the device of the
        activations they are fed, so keep them there while collecting and move them once at the end: a
        cross-device ``merge`` per call reads device memory on the host (a sync) every time."""
        device = torch.device(device)
        if self.sum.device == device:
            return self
        return CalibrationStats(self.count, self.sum.to(device), self.sumsq.to(device),
                                None if self.gram is None else self.gram.to(device))

    def merge(self, other: "CalibrationStats") -> "CalibrationStats":
        """Adds ``other`` into ``self`` (same width; both with or both without gram) and returns ``self``."""
        if other.width != self.width:
            raise ValueError(f"CalibrationStats.merge: widths differ ({self.width} vs {other.width})")
        if (self.gram is None) != (other.gram is None):
            raise ValueError("CalibrationStats.merge: one object has a gram matrix and the other has not")
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.sumsq += other.sumsq.to(self.sumsq.device)
        if self.gram is not None:
            self.gram += other.gram.to(self.gram.device)
        return self

    def state_dict(self) -> dict:
        out = {"count": torch.tensor(self.count, dtype=torch.int64), "sum": self.sum, "sumsq": self.sumsq}
        if self.gram is not None:
            out["gram"] = self.gram
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> "CalibrationStats":
        return cls(int(state["count"]), state["sum"], state["sumsq"], state.get("gram"))


def calibration_stats(x: torch.Tensor, stats: Optional[CalibrationStats] = None,
                      gram: bool = False) -> CalibrationStats:
    """Accumulates ``x [..., d]`` into ``stats`` (a new object when None) and returns it.

    Passing the returned object back accumulates; ``a.merge(b)`` combines two. With ``gram=True`` a new object
    also tracks XᵀX. Torch equivalent (up to rounding): ``x2 = x.reshape(-1, d).double()``;
    ``sum += x2.sum(0)``; ``sumsq += (x2 * x2).sum(0)``; ``gram += x2.T @ x2``; ``count += x2.shape[0]``.

    Sums are deterministic (chunking fixed by the row count, fp32 partials, fp64 final reduction). The Gram
    product is an fp64 GEMM on the CPU and an fp32 GEMM with TF32 disabled on CUDA, whatever
    ``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision`` say. Nothing is read back
    to the host (``count`` comes from the shape), so accumulating into statistics on x's device never syncs.

    Under autocast: not cast, and the Gram GEMM keeps the precision above (autocast would run it in bf16).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dip_ext.calibration_stats: x must be a tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"dip_ext.calibration_stats: x must have 2 or 3 dims, got shape {tuple(x.shape)}")
    if stats is None:
        stats = CalibrationStats.empty(x.shape[-1], gram=gram, device=x.device)
    elif stats.width != x.shape[-1]:
        raise ValueError(f"dip_ext.calibration_stats: the statistics have width {stats.width} but x has width "
                         f"{x.shape[-1]} (statistics fed a different width)")
    _ops.calibration_stats_(x, stats.sum, stats.sumsq, stats.gram)
    stats.count += x.numel() // max(x.shape[-1], 1)
    return stats


# ---- fake (meta) kernels: shapes only, so torch.compile / FakeTensor tracing works without graph breaks ----

def _with_last(x: torch.Tensor, last: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], last))


def _same_device(op: str, first: str, **tensors) -> None:
    """Device check of the fake kernels. They also run when a 'meta' tensor is mixed with real ones (Meta
    outranks CPU/CUDA in dispatch), so without it such a call would silently return a meta tensor."""
    ref = tensors[first]
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"dip_ext.{op}: {name} is on {t.device} but {first} is on {ref.device}; "
                             "move them to one device")


@torch.library.register_fake("dip_ext::rms_norm_gather")
def _(x, weight, idx, eps, check_idx=True):
    _same_device("rms_norm_gather", "x", x=x, weight=weight, idx=idx)
    return _with_last(x, idx.shape[0])


@torch.library.register_fake("dip_ext::layer_norm_gather")
def _(x, weight, bias, idx, eps, check_idx=True):
    _same_device("layer_norm_gather", "x", x=x, weight=weight, bias=bias, idx=idx)
    return _with_last(x, idx.shape[0])


@torch.library.register_fake("dip_ext::index_select_gemm")
def _(x, idx, weight, bias=None, check_idx=True):
    _same_device("index_select_gemm", "x", x=x, idx=idx, weight=weight, bias=bias)
    return _with_last(x, weight.shape[0])


@torch.library.register_fake("dip_ext::scatter_add_")
def _(residual, idx, y, check_idx=True):
    _same_device("scatter_add_", "residual", residual=residual, idx=idx, y=y)


@torch.library.register_fake("dip_ext::gemm_scatter_add_")
def _(residual, idx, x, weight, bias=None, check_idx=True):
    _same_device("gemm_scatter_add_", "residual", residual=residual, idx=idx, x=x, weight=weight, bias=bias)


@torch.library.register_fake("dip_ext::rms_norm_scatter_add_")
def _(residual, idx, y, weight, eps, unit_offset=False, check_idx=True):
    _same_device("rms_norm_scatter_add_", "residual", residual=residual, idx=idx, y=y, weight=weight)


@torch.library.register_fake("dip_ext::calibration_stats_")
def _(x, sum, sumsq, gram=None):
    _same_device("calibration_stats_", "x", x=x, sum=sum, sumsq=sumsq, gram=gram)
    return None


# ---- autocast rules: each op follows its torch equivalent under torch.autocast ----------------------------
#
# Without them an op meets autocast only inside its kernel, where the aten GEMM it calls (index_select_gemm,
# gemm_scatter_add_, the Gram matrix of calibration_stats_) would be cast behind the kernel's back (a kernel
# reading a bf16 GEMM output as fp32), and the in-place ops would refuse a block output in the autocast dtype.
# A rule casts the arguments as autocast casts the torch equivalent, then runs the op with autocast off: the
# kernels always see the dtypes they check. Autocast sits above autograd and is traced by torch.compile, so
# the rules hold with and without grad and in compiled graphs; they are registered for CPU and CUDA autocast.

_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _lowered(t: Optional[torch.Tensor], device_type: str) -> Optional[torch.Tensor]:
    """``t`` in the autocast dtype where autocast would cast it (torch's rule: floating, not fp64, on the
    autocast device)."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.device.type != device_type:
        return t
    return t.to(torch.get_autocast_dtype(device_type))


def _mixed(t: torch.Tensor, residual: torch.Tensor) -> bool:
    """``t`` and ``residual`` in two dtypes the ops accept: a rule adds ``t`` in the residual's dtype.
    Anything else goes to the kernel as it is, which accepts or refuses it as outside autocast."""
    return t.dtype != residual.dtype and t.dtype in _OP_DTYPES and residual.dtype in _OP_DTYPES


def _no_tokens(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its tokens (first dim sliced to 0): a kernel called on it checks its arguments, computes
    nothing. The rules that run an op as two steps call it so, to keep the op's own argument errors."""
    return t[:0] if t.dim() else t


def _autocast_not_cast(name: str):
    op = getattr(_ops, name)
    return lambda device_type, *args, **kwargs: op(*args, **kwargs)


def _autocast_index_select_gemm(device_type, x, idx, weight, bias=None, check_idx=True):
    low = partial(_lowered, device_type=device_type)
    return _ops.index_select_gemm(low(x), idx, low(weight), low(bias), check_idx)


def _autocast_scatter_add_(device_type, residual, idx, y, check_idx=True):
    _ops.scatter_add_(residual, idx, y.to(residual.dtype) if _mixed(y, residual) else y, check_idx)


def _autocast_gemm_scatter_add_(device_type, residual, idx, x, weight, bias=None, check_idx=True):
    low = partial(_lowered, device_type=device_type)
    x, weight, bias = low(x), low(weight), low(bias)
    if not _mixed(x, residual):
        _ops.gemm_scatter_add_(residual, idx, x, weight, bias, check_idx)
        return
    # an fp32 residual stream: the GEMM in the autocast dtype, its output added in the residual's dtype
    _ops.gemm_scatter_add_(_no_tokens(residual).to(x.dtype), idx, _no_tokens(x), weight, bias, check_idx)
    _ops.scatter_add_(residual, idx, F.linear(x, weight, bias).to(residual.dtype), False)


def _autocast_rms_norm_scatter_add_(device_type, residual, idx, y, weight, eps, unit_offset=False,
                                    check_idx=True):
    if not (_mixed(y, residual) or _mixed(weight, residual)):
        _ops.rms_norm_scatter_add_(residual, idx, y, weight, eps, unit_offset, check_idx)
        return
    # y (or the weight) in another dtype than the residual: normalised in fp32 with the weight as it is,
    # rounded to y's dtype as the dense model's norm returns it, then added in the residual's dtype (the
    # differentiable path, modules.rms_norm_scatter_add, computes the same)
    _ops.rms_norm_scatter_add_(_no_tokens(residual).to(y.dtype), idx, _no_tokens(y), weight.to(y.dtype), eps,
                               unit_offset, check_idx)
    yf = y.float()
    rstd = torch.rsqrt(yf.pow(2).sum(-1, keepdim=True) / residual.shape[-1] + eps)
    scale = weight.float().index_select(0, idx) + (1.0 if unit_offset else 0.0)
    _ops.scatter_add_(residual, idx, (yf * rstd * scale).to(y.dtype).to(residual.dtype), False)


_AUTOCAST_RULES = {
    "rms_norm_gather": _autocast_not_cast("rms_norm_gather"),
    "layer_norm_gather": _autocast_not_cast("layer_norm_gather"),
    "index_select_gemm": _autocast_index_select_gemm,
    "scatter_add_": _autocast_scatter_add_,
    "gemm_scatter_add_": _autocast_gemm_scatter_add_,
    "rms_norm_scatter_add_": _autocast_rms_norm_scatter_add_,
    "calibration_stats_": _autocast_not_cast("calibration_stats_"),
}

# the registrations live as long as this object: module-level
_autocast_lib = torch.library.Library("dip_ext", "IMPL")


def _register_autocast(name: str, rule, device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    without_autocast = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(without_autocast):
            return rule(device_type, *args, **kwargs)

    _autocast_lib.impl(name, kernel, key, with_keyset=True)


for _name, _rule in _AUTOCAST_RULES.items():
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_name, _rule, _device_type)


__all__ = ["rms_norm_gather", "layer_norm_gather", "index_select_gemm", "scatter_add_", "gemm_scatter_add_",
           "rms_norm_scatter_add_", "calibration_stats", "CalibrationStats"]
