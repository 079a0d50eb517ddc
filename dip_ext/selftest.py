"""Self-test of the compiled kernels on one device: every op against its plain-torch reference.

``selftest(device)`` runs each op of :mod:`dip_ext.ops` on small random inputs in float32, float16 and bfloat16
on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...) and compares it with the torch expression its docstring
names, computed in fp32 (fp64 for the statistics) from the same inputs. It covers each kernel path the device
has (on CUDA: warp- and block-per-row norms, the decode GEMV and the gather + cuBLAS GEMM, vector and scalar
loads) and the Gram matrix under the loosest float32 matmul precision (TF32 must not leak into it). An op
that raises (for instance "no kernel for the GPU" when the build lacks its architecture) is a failed case
with the message, not an exception.

    >>> r = dip_ext.selftest("cuda")
    >>> print(r.table()); assert r.ok

Run as a script: ``python -m dip_ext.selftest [DEVICE]`` prints the table and exits 1 on failure.

Tolerances: each case passes when ``|out - ref| <= atol + rtol * |ref|`` element-wise (``ratio`` is the
largest ``|out - ref| / (atol + rtol * |ref|)``, so it passes at <= 1). ``atol`` / ``rtol`` are the output
dtype's rounding (fp32 2e-5, fp16 2e-3, bf16 1.6e-2), with ``atol`` scaled by ``sqrt(k)`` for dot products of
``k`` terms; the scatter-add is exact (one fp32 add, one rounding); the Gram entries allow 1e-5 of
``sqrt(G_ii * G_jj)``: fp32 accumulation stays below ~5e-7 of it, fp32 inputs rounded to TF32 reach ~6e-5 or more.

The helpers :func:`reference_copy` and :func:`assert_no_shared_storage` are what every in-place test uses to
build its reference: an in-place op compared with a reference that aliases its output compares the output
with itself and can never fail.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F

from . import ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (atol, rtol) of one rounding of the output, per dtype
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
GRAM_TOL = 1e-5


# ---- reference helpers (also used by the tests) ------------------------------------------------------------

def reference_copy(t: torch.Tensor) -> torch.Tensor:
    """An independent copy of ``t`` (new storage) to build a reference from BEFORE an in-place op runs.

    ``t.float()`` is not one: for a float32 tensor it is ``t`` itself."""
    return t.detach().clone()


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of one storage (then comparing them proves nothing)."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.nbytes() > 0 and sb.nbytes() > 0 and sa.data_ptr() == sb.data_ptr()


def assert_no_shared_storage(ref: torch.Tensor, out: torch.Tensor, what: str = "reference") -> None:
    """Raises AssertionError when ``ref`` shares memory with the op's output ``out``."""
    if shares_storage(ref, out):
        raise AssertionError(f"the {what} shares memory with the op's output: the comparison would compare the "
                             "output with itself (build it from reference_copy(...) before the op runs)")


# ---- results ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaseResult:
    """One op on one dtype and input shape."""

    op: str
    dtype: str
    case: str
    passed: bool
    max_abs_err: Optional[float] = None  # max |out - ref|
    ratio: Optional[float] = None        # max |out - ref| / (atol + rtol * |ref|); passes at <= 1
    error: Optional[str] = None          # the exception, when the op (or the comparison) raised


@dataclass
class SelftestResult:
    """Outcome of :func:`selftest`: ``ok`` when every case passed (and there was at least one)."""

    device: str
    device_name: str
    build_info: dict
    cases: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def failures(self) -> list:
        return [c for c in self.cases if not c.passed]

    def table(self) -> str:
        """A fixed-width table: op, dtype, case, max abs error, ratio to the tolerance, PASS / FAIL."""
        rows = [("op", "dtype", "case", "max abs err", "ratio", "")]
        for c in self.cases:
            rows.append((c.op, c.dtype, c.case, "-" if c.max_abs_err is None else f"{c.max_abs_err:.3g}",
                         "-" if c.ratio is None else f"{c.ratio:.3g}",
                         "PASS" if c.passed else "FAIL" + (f": {c.error}" if c.error else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"dip_ext selftest on {self.device} ({self.device_name}): "
                 f"{len(self.cases) - len(self.failures)}/{len(self.cases)} passed in {self.seconds:.1f} s"]
        for r in rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r[:5], widths)) + "  " + r[5])
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"device": self.device, "device_name": self.device_name, "ok": self.ok, "seconds": self.seconds,
                "build_info": self.build_info, "cases": [c.__dict__ for c in self.cases]}


# ---- comparisons --------------------------------------------------------------------------------------------

def _compare(out: torch.Tensor, ref: torch.Tensor, bound: Union[float, torch.Tensor]) -> tuple:
    """(max abs error, max error / bound); raises on a shape mismatch."""
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0, 0.0
    err = (out.double() - ref.double()).abs()
    if not torch.isfinite(err).all():
        return math.inf, math.inf
    return float(err.max()), float((err / bound).max())


def _bound(ref: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    atol, rtol = TOL[dtype]
    return atol * scale + rtol * ref.double().abs()


@contextlib.contextmanager
def _float32_matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision for the block, restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# ---- the cases ----------------------------------------------------------------------------------------------

def _cases(device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Iterator[tuple]:
    """Yields (op, case, fn). fn() returns (out, ref, dtype, atol_scale) -- compared with the dtype's tolerance,
    atol scaled -- or (out, ref, bound) with an explicit bound (0.0: exact), or a list of those."""

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen) * scale + offset).to(device, dtype)

    def subset(d, k, sort=True):
        i = torch.randperm(d, generator=gen)[:k]
        return (i.sort().values if sort else i).to(device)

    # norm + gather: a warp per row (d <= 1024) and a block per row (d > 1024) on CUDA; odd widths use the
    # scalar loads, a 3-D strided view the row stride.
    for shape, sort in (((5, 67), False), ((2, 3, 1100), True), ((4, 256), True)):
        d = shape[-1]

        def rms(shape=shape, sort=sort, d=d):
            x, w, idx = rand(*shape), rand(d, scale=0.1, offset=1.0), subset(d, (3 * d) // 5, sort)
            out = ops.rms_norm_gather(x, w, idx, 1e-6)
            return out, F.rms_norm(x.float(), (d,), w.float(), 1e-6)[..., idx], dtype, 1.0

        def ln(shape=shape, sort=sort, d=d):
            x = rand(*shape, offset=20.0)  # a large mean: the variance must be two-pass
            w, b, idx = rand(d, scale=0.1, offset=1.0), rand(d, scale=0.1), subset(d, (3 * d) // 5, sort)
            res = []
            for bias in (b, None):
                out = ops.layer_norm_gather(x, w, bias, idx, 1e-5)
                ref = F.layer_norm(x.float(), (d,), w.float(), None if bias is None else bias.float(), 1e-5)
                res.append((out, ref[..., idx], dtype, 1.0))
            return res

        yield "rms_norm_gather", f"x{list(shape)}", rms
        yield "layer_norm_gather", f"x{list(shape)} bias/none", ln

    # index-select GEMM: one token is the decode GEMV on CUDA, more is gather + cuBLAS; k % 8 == 0 takes the
    # 16-byte weight loads, odd k the scalar ones.
    for tokens, d, k in ((1, 96, 64), (5, 131, 77), (16, 600, 520), (20, 96, 40)):
        def gemm(tokens=tokens, d=d, k=k):
            x, idx = rand(tokens, d), subset(d, k, sort=tokens != 5)
            w, b = rand(48, k, scale=1 / math.sqrt(k)), rand(48)
            out = ops.index_select_gemm(x, idx, w, b)
            return out, F.linear(x.double()[..., idx], w.double(), b.double()), dtype, math.sqrt(k)

        yield "index_select_gemm", f"{tokens} tok, k={k}", gemm

    # scatter-add: exact (one fp32 add, one rounding); the reference comes from an independent copy.
    for shape, k in (((3, 40), 17), ((2, 4, 520), 256)):
        def scatter(shape=shape, k=k):
            residual, idx = rand(*shape), subset(shape[-1], k, sort=k != 17)
            y = rand(*shape[:-1], k)
            ref = reference_copy(residual).float().index_add_(-1, idx, y.float()).to(dtype)
            out = ops.scatter_add_(residual, idx, y)
            assert_no_shared_storage(ref, out)
            return out, ref, 0.0

        yield "scatter_add_", f"residual{list(shape)}, k={k}", scatter

    for tokens, k_in in ((3, 24), (20, 64)):
        def gemm_scatter(tokens=tokens, k_in=k_in):
            d = 72
            residual, idx = rand(tokens, d), subset(d, 40, sort=False)
            x, w, b = rand(tokens, k_in), rand(40, k_in, scale=1 / math.sqrt(k_in)), rand(40)
            ref = reference_copy(residual).double().index_add_(
                -1, idx, F.linear(x.double(), w.double(), b.double()))
            out = ops.gemm_scatter_add_(residual, idx, x, w, b)
            assert_no_shared_storage(ref, out)
            # the op rounds the linear output to the dtype, then adds: two roundings of magnitude ~|ref|
            return out, ref, dtype, 2.0 * math.sqrt(k_in)

        yield "gemm_scatter_add_", f"{tokens} tok, k_in={k_in}", gemm_scatter

    # calibration statistics with the Gram matrix, under the loosest float32 matmul precision.
    for rows, d in ((70, 48), (600, 40)):
        def stats(rows=rows, d=d):
            # zero-mean data: fp32 accumulation stays < ~5e-7 of sqrt(G_ii G_jj), TF32 inputs reach ~6e-5
            x = rand(rows, d)
            with _float32_matmul_precision("medium"):  # TF32 (CUDA) or bf16 (oneDNN) allowed: must not matter
                st = ops.calibration_stats(x, gram=True)
            if st.count != rows:
                raise AssertionError(f"count {st.count}, expected {rows}")
            xd = x.double()
            s, q, g = xd.sum(0), (xd * xd).sum(0), xd.T @ xd
            # fp32 partials: relative error ~ 1e-7 * sqrt(rows) of the sum of |values|
            s_bound = 1e-5 * xd.abs().sum(0) + 1e-6
            g_bound = GRAM_TOL * torch.sqrt(torch.outer(q, q)) + 1e-12
            return [(st.sum, s, s_bound), (st.sumsq, q, 1e-5 * q + 1e-6), (st.gram, g, g_bound)]

        yield "calibration_stats", f"{rows}x{d} +gram", stats


def _run_case(fn: Callable, dtype: torch.dtype) -> tuple:
    """(passed, max abs err, ratio) over the comparisons fn returns."""
    res = fn()
    triples = res if isinstance(res, list) else [res]
    worst_abs, worst_ratio = 0.0, 0.0
    for t in triples:
        out, ref = t[0], t[1]
        if isinstance(t[2], torch.dtype):  # (out, ref, dtype, atol scale): the dtype's tolerance
            if out.dtype != t[2]:
                raise AssertionError(f"output dtype {out.dtype}, expected {t[2]}")
            bound = _bound(ref, t[2], t[3])
        else:
            bound = t[2]
        if isinstance(bound, float) and bound == 0.0:  # exact
            a = 0.0 if out.numel() == 0 else float((out.double() - ref.double()).abs().max())
            r = 0.0 if a == 0.0 else math.inf
        else:
            a, r = _compare(out, ref, bound)
        worst_abs, worst_ratio = max(worst_abs, a), max(worst_ratio, r)
    return worst_ratio <= 1.0, worst_abs, worst_ratio


def selftest(device: Union[str, torch.device] = "cpu", *, dtypes=DTYPES, seed: int = 0,
             print_tracebacks: bool = False) -> SelftestResult:
    """Runs every dip_ext op against its plain-torch reference on ``device`` for each of ``dtypes``.

    Returns a :class:`SelftestResult` (``.ok``, ``.table()``, ``.failures``, ``.to_dict()``). Never raises for a
    failing op: its case fails with the error message (and, with ``print_tracebacks``, its traceback goes to
    stderr). Raises ``ValueError`` for a device torch cannot use.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("dip_ext.selftest: CUDA device requested but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{name}, sm_{major}{minor}"
    elif device.type == "cpu":
        name = platform.processor() or platform.machine()
    else:
        raise ValueError(f"dip_ext.selftest: unsupported device {device} (cpu or cuda)")
    info = ops.build_info()
    result = SelftestResult(str(device), name, info)
    t0 = time.perf_counter()
    if device.type == "cuda" and not info.get("cuda"):
        result.cases.append(CaseResult("build", "-", "CUDA kernels", False,
                                       error="this build of dip_ext has no CUDA kernels (CPU-only build)"))
        result.seconds = time.perf_counter() - t0
        return result
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    # References and the ops' own GEMMs in IEEE fp32 whatever the caller set (the Gram case loosens it itself).
    with ctx, _float32_matmul_precision("highest"):
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(seed)
            dname = str(dtype).replace("torch.", "")
            for op, case, fn in _cases(device, dtype, gen):
                try:
                    passed, a, r = _run_case(fn, dtype)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # a kernel fault surfaces here, in its own case
                    result.cases.append(CaseResult(op, dname, case, passed, a, r))
                except Exception as e:  # noqa: BLE001  (a failing op is a result, not a crash)
                    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
                    result.cases.append(CaseResult(op, dname, case, False, error=msg))
                    if print_tracebacks:
                        traceback.print_exc()
    result.seconds = time.perf_counter() - t0
    return result


def main(argv: list[str]) -> int:
    """``python -m dip_ext.selftest [DEVICE] [--json] [--traceback]``: the table, then 0 when every case passed."""
    device = next((a for a in argv if not a.startswith("-")), "cuda" if torch.cuda.is_available() else "cpu")
    r = selftest(device, print_tracebacks="--traceback" in argv)
    print(r.table())
    if "--json" in argv:
        print(json.dumps(r.to_dict(), indent=1))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
