"""CUDA kernels of dip_ext against plain-torch references (skipped without a CUDA device).

Covers fp32 / fp16 / bf16, 2-D and 3-D x, non-contiguous x (row-strided views and transposes), sorted /
unsorted / empty / full idx, 1, 7, 16, 17 and many tokens (the GEMV path is one token, gather + cuBLAS
above), odd widths that force the scalar (misaligned) paths, short and long inputs of the statistics (their
chunking differs), CUDA bad input (overlapping memory, check_idx inside a graph capture), the Gram matrix
with TF32 enabled globally, and capture of the ``check_idx=False`` calls in a CUDA graph. No hypothesis: the
GPU machine may not have it.

In-place ops are compared with references built from an independent copy taken BEFORE the op
(``reference_copy``); ``assert_no_shared_storage`` guards each such comparison, so a reference that aliases the
op's output (``residual.float()`` is ``residual`` itself for fp32) fails loudly instead of passing silently.

``DIP_EXT_TEST_DEVICE=cpu`` runs this file against the CPU kernels (CUDA-only tests skip): it checks the tests
themselves (references, tolerances) on a machine without a GPU.

Tolerances: references are computed in fp32 (fp64 for statistics) from the same low-precision inputs, so the
error is the output rounding plus fp32 reordering: fp32 2e-5, fp16 2e-3, bf16 1.6e-2 relative, scaled by the
output magnitude for the GEMMs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from dip_ext import ops
from dip_ext.selftest import assert_no_shared_storage, reference_copy

DEV = os.environ.get("DIP_EXT_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
cuda_only = pytest.mark.skipif(DEV != "cuda", reason="CUDA-only behaviour")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
IDX_KINDS = ["sorted", "unsorted", "empty", "full"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_idx(kind: str, d: int, seed: int = 0, frac: float = 0.6, multiple: int = 1) -> torch.Tensor:
    """int64 index set over [0, d) on the GPU; ``multiple`` rounds its length (vector paths need k % 8 == 0)."""
    g = _gen(seed)
    if kind == "empty":
        return torch.empty(0, dtype=torch.int64, device=DEV)
    if kind == "full":
        return torch.arange(d, device=DEV)
    k = max(1, int(d * frac) // multiple * multiple)
    sel = torch.randperm(d, generator=g)[:k]
    if kind == "sorted":
        sel = sel.sort().values
    return sel.to(DEV)


def make_x(shape, dtype, layout: str = "contiguous", seed: int = 0) -> torch.Tensor:
    """Random activations of ``shape`` (last dim d) as a contiguous tensor, a row-strided view (row stride d + 3,
    so rows are not 16-byte aligned) or a transposed view (inner stride != 1, forces a copy)."""
    g = _gen(seed)
    d = shape[-1]
    if layout == "contiguous":
        return torch.randn(shape, generator=g).to(DEV, dtype)
    if layout == "strided":
        big = torch.randn((*shape[:-1], d + 3), generator=g).to(DEV, dtype)
        x = big[..., 1:d + 1]
        assert not x.is_contiguous() or math.prod(shape[:-1]) == 1  # one row: a slice of it is contiguous
        return x
    if layout == "transposed":
        t = torch.randn((d, math.prod(shape[:-1])), generator=g).to(DEV, dtype)
        x = t.t().reshape(shape) if len(shape) == 2 else t.t().unflatten(0, shape[:-1])
        assert x.stride(-1) != 1 or x.numel() <= d
        return x
    raise ValueError(layout)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype, scale: float = 1.0) -> None:
    assert out.dtype == dtype and out.device.type == torch.device(DEV).type
    assert out.shape == ref.shape, (out.shape, ref.shape)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * scale, rtol=tol)


# ---------------------------------------------------------------- norm + gather

NORM_SHAPES = [(1, 64), (7, 1000), (17, 4099), (300, 256), (2, 8, 1000), (3, 100, 2048)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("kind", IDX_KINDS)
def test_rms_norm_gather(dtype, shape, kind):
    x = make_x(shape, dtype, seed=1)
    d = shape[-1]
    w = (1 + 0.1 * torch.randn(d, generator=_gen(2))).to(DEV, dtype)
    idx = make_idx(kind, d, seed=3)
    out = ops.rms_norm_gather(x, w, idx, 1e-6)
    ref = F.rms_norm(x.float(), (d,), w.float(), 1e-6)[..., idx]
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("kind", IDX_KINDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_gather(dtype, shape, kind, with_bias):
    d = shape[-1]
    # A large common offset checks the two-pass variance (one-pass E[x^2]-E[x]^2 would cancel badly).
    x = (make_x(shape, torch.float32, seed=4) + 30.0).to(dtype)
    w = (1 + 0.1 * torch.randn(d, generator=_gen(5))).to(DEV, dtype)
    b = (0.1 * torch.randn(d, generator=_gen(6))).to(DEV, dtype) if with_bias else None
    idx = make_idx(kind, d, seed=7)
    out = ops.layer_norm_gather(x, w, b, idx, 1e-5)
    ref = F.layer_norm(x.float(), (d,), w.float(), None if b is None else b.float(), 1e-5)[..., idx]
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("shape", [(5, 1001), (33, 4096), (2, 9, 130)], ids=str)
def test_norm_gather_non_contiguous(dtype, layout, shape):
    x = make_x(shape, dtype, layout, seed=8)
    d = shape[-1]
    w = torch.randn(d, generator=_gen(9)).to(DEV, dtype)
    idx = make_idx("unsorted", d, seed=10)
    assert_close(ops.rms_norm_gather(x, w, idx, 1e-6), F.rms_norm(x.float(), (d,), w.float(), 1e-6)[..., idx], dtype)
    assert_close(ops.layer_norm_gather(x, w, w, idx, 1e-6),
                 F.layer_norm(x.float(), (d,), w.float(), w.float(), 1e-6)[..., idx], dtype)


def test_norm_gather_wide_rows_without_smem_cache():
    # fp32 d = 13000 is 52 KB per row: over the shared-memory cache budget, so the kernel re-reads x.
    d = 13000
    x = make_x((3, d), torch.float32, seed=11)
    w = torch.randn(d, generator=_gen(12)).to(DEV)
    idx = make_idx("sorted", d, seed=13)
    assert_close(ops.rms_norm_gather(x, w, idx, 1e-6), F.rms_norm(x, (d,), w, 1e-6)[..., idx], torch.float32)
    assert_close(ops.layer_norm_gather(x, w, None, idx, 1e-6), F.layer_norm(x, (d,), w, None, 1e-6)[..., idx],
                 torch.float32)


def test_norm_gather_int32_idx_and_zero_tokens():
    x = make_x((4, 96), torch.bfloat16, seed=14)
    w = torch.ones(96, device=DEV, dtype=torch.bfloat16)
    idx = make_idx("sorted", 96, seed=15)
    out = ops.rms_norm_gather(x, w, idx.int(), 1e-6)
    assert_close(out, F.rms_norm(x.float(), (96,), w.float(), 1e-6)[..., idx], torch.bfloat16)
    empty = ops.rms_norm_gather(x[:0], w, idx, 1e-6)
    assert empty.shape == (0, idx.numel())


# ---------------------------------------------------------------- index-select GEMM (GEMV for one token)

TOKENS = [1, 7, 16, 17, 300]


def _gemm_ref(x, idx, w, b):
    return F.linear(x.float()[..., idx], w.float(), None if b is None else b.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("kind", IDX_KINDS)
@pytest.mark.parametrize("d", [256, 257])  # 256: k % 8 == 0 (16-byte weight loads); 257: odd k (scalar path)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_index_select_gemm(dtype, tokens, kind, d, with_bias):
    x = make_x((tokens, d), dtype, seed=20)
    idx = make_idx(kind, d, seed=21, multiple=8 if d % 8 == 0 else 1)
    n = 72
    w = torch.randn(n, idx.numel(), generator=_gen(22)).to(DEV, dtype)
    b = torch.randn(n, generator=_gen(23)).to(DEV, dtype) if with_bias else None
    out = ops.index_select_gemm(x, idx, w, b)
    assert_close(out, _gemm_ref(x, idx, w, b), dtype, scale=math.sqrt(max(idx.numel(), 1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 5, 16, 40])
@pytest.mark.parametrize("k", [2504, 2501])  # several k tiles of the GEMV's activation tile
def test_index_select_gemm_long_k(dtype, tokens, k):
    d = 4096
    x = make_x((tokens, d), dtype, seed=24)
    idx = torch.randperm(d, generator=_gen(25))[:k].sort().values.to(DEV)
    w = torch.randn(97, k, generator=_gen(26)).to(DEV, dtype)
    out = ops.index_select_gemm(x, idx, w)
    assert_close(out, _gemm_ref(x, idx, w, None), dtype, scale=math.sqrt(k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 300), (2, 8, 300), (3, 100, 300)], ids=str)  # 1 token: GEMV
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_index_select_gemm_3d_and_layouts(dtype, shape, layout):
    x = make_x(shape, dtype, layout, seed=27)
    idx = make_idx("unsorted", shape[-1], seed=28)
    # A weight view with a row stride != len(idx): the GEMV must honour stride(0).
    w = torch.randn(64, idx.numel() + 5, generator=_gen(29)).to(DEV, dtype)[:, 2:idx.numel() + 2]
    out = ops.index_select_gemm(x, idx, w)
    assert out.shape == (*shape[:-1], 64)
    assert_close(out, _gemm_ref(x, idx, w, None), dtype, scale=math.sqrt(idx.numel()))


def test_index_select_gemm_zero_tokens_and_zero_outputs():
    x = make_x((0, 64), torch.float16)
    idx = make_idx("sorted", 64)
    w = torch.randn(8, idx.numel(), device=DEV, dtype=torch.float16)
    assert ops.index_select_gemm(x, idx, w).shape == (0, 8)
    x1 = make_x((3, 64), torch.float16)
    assert ops.index_select_gemm(x1, idx, w[:0]).shape == (3, 0)


# ---------------------------------------------------------------- scatter-add residual updates

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 17, 300])
@pytest.mark.parametrize("kind", IDX_KINDS)
@pytest.mark.parametrize("d", [64, 1001, 4096])
def test_scatter_add(dtype, tokens, kind, d):
    residual = make_x((tokens, d), dtype, seed=30)
    idx = make_idx(kind, d, seed=31)
    y = make_x((tokens, idx.numel()), dtype, seed=32) if idx.numel() else torch.empty(tokens, 0, device=DEV,
                                                                                       dtype=dtype)
    # fp32 add of the two inputs, rounded once: exactly what index_add_ in fp32 then a cast gives. The reference
    # starts from a copy taken before the op (for fp32, residual.float() would be residual itself).
    ref = reference_copy(residual).float().index_add_(-1, idx, y.float()).to(dtype)
    out = ops.scatter_add_(residual, idx, y)
    assert out is residual
    assert_no_shared_storage(ref, residual)
    torch.testing.assert_close(residual, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("y_layout", ["contiguous", "strided", "transposed"])
def test_scatter_add_layouts(dtype, res_layout, y_layout):
    d = 203
    residual = make_x((3, 3, d), dtype, res_layout, seed=33)
    idx = make_idx("unsorted", d, seed=34)
    y = make_x((3, 3, idx.numel()), dtype, y_layout, seed=35)
    ref = reference_copy(residual).float().index_add_(-1, idx, y.float()).to(dtype)
    ptr = residual.data_ptr()
    out = ops.scatter_add_(residual, idx, y)
    assert out is residual and residual.data_ptr() == ptr
    assert_no_shared_storage(ref, residual)
    torch.testing.assert_close(residual, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 17, 300])
@pytest.mark.parametrize("kind", ["sorted", "unsorted", "empty", "full"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gemm_scatter_add(dtype, tokens, kind, with_bias):
    d, k_in = 320, 136
    residual = make_x((tokens, d), dtype, seed=40)
    idx = make_idx(kind, d, seed=41)
    x = make_x((tokens, k_in), dtype, seed=42)
    w = torch.randn(idx.numel(), k_in, generator=_gen(43)).to(DEV, dtype) / math.sqrt(k_in)
    b = torch.randn(idx.numel(), generator=_gen(44)).to(DEV, dtype) if with_bias else None
    ref = reference_copy(residual).float().index_add_(-1, idx, F.linear(x, w, b).float())
    out = ops.gemm_scatter_add_(residual, idx, x, w, b)
    assert out is residual
    assert_no_shared_storage(ref, residual)
    assert_close(residual, ref, dtype, scale=4.0)


def test_gemm_scatter_add_3d():
    residual = make_x((2, 5, 128), torch.bfloat16, seed=45)
    idx = make_idx("sorted", 128, seed=46)
    x = make_x((2, 5, 64), torch.bfloat16, seed=47)
    w = (torch.randn(idx.numel(), 64, generator=_gen(48)) / 8).to(DEV, torch.bfloat16)
    ref = reference_copy(residual).float().index_add_(-1, idx, F.linear(x, w).float())
    ops.gemm_scatter_add_(residual, idx, x, w)
    assert_no_shared_storage(ref, residual)
    assert_close(residual, ref, torch.bfloat16, scale=4.0)


# ---------------------------------------------------------------- calibration statistics

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (300, 1001), (2, 300, 256), (1000, 40)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_calibration_stats(dtype, shape, layout):
    x = make_x(shape, dtype, layout, seed=50)
    x.add_(2.0)  # in place: keeps the strided layout; a mean away from 0 makes sum and sumsq both non-trivial
    st = ops.calibration_stats(x)
    xd = x.double().reshape(-1, shape[-1])
    rows = xd.shape[0]
    assert st.count == rows
    assert st.sum.dtype == torch.float64 and st.sum.device.type == torch.device(DEV).type
    torch.testing.assert_close(st.sum, xd.sum(0), rtol=1e-5, atol=1e-5 * rows)
    torch.testing.assert_close(st.sumsq, (xd * xd).sum(0), rtol=1e-5, atol=1e-5 * rows)
    # Accumulates when passed back, and matches the CPU kernel (same chunking, both fp64 at the end).
    ops.calibration_stats(x, st)
    torch.testing.assert_close(st.sum, 2 * xd.sum(0), rtol=1e-5, atol=2e-5 * rows)
    cpu = ops.calibration_stats(x.cpu())
    torch.testing.assert_close(st.sumsq.cpu() / 2, cpu.sumsq, rtol=1e-5, atol=1e-5 * rows)


def test_calibration_stats_long_input_chunking():
    # 17 000 rows take the long (256-row) chunks, 16 383 the short ones: both must match fp64.
    for rows in (16383, 17000):
        x = make_x((rows, 24), torch.bfloat16, seed=52)
        st = ops.calibration_stats(x)
        xd = x.double()
        torch.testing.assert_close(st.sum, xd.sum(0), rtol=1e-5, atol=1e-5 * rows)
        torch.testing.assert_close(st.sumsq, (xd * xd).sum(0), rtol=1e-5, atol=1e-5 * rows)


def test_calibration_gram_exact_with_tf32_enabled():
    """TF32 rounds fp32 GEMM inputs to 10 mantissa bits (>= ~6e-5 of sqrt(G_ii G_jj) here, measured with
    emulated rounding); the Gram matrix must stay exact to fp32 accumulation (< ~5e-7) whatever the global
    setting. fp32 input only: fp16 / bf16 values are exact in TF32, so they could not show the difference."""
    x = make_x((600, 64), torch.float32, seed=53)  # zero-mean: fp32 accumulation error stays tiny
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # TF32 on for every fp32 matmul
    try:
        st = ops.calibration_stats(x, gram=True)
    finally:
        torch.set_float32_matmul_precision(before)
    xd = x.double()
    g = xd.T @ xd
    bound = 1e-5 * torch.sqrt(torch.outer(g.diagonal(), g.diagonal()))
    err = (st.gram - g).abs()
    assert (err <= bound).all(), f"max error {float((err / bound).max()):.3g} x the fp32 bound"


def test_calibration_stats_deterministic_and_gram():
    x = make_x((4000, 384), torch.bfloat16, seed=51)
    a = ops.calibration_stats(x, gram=True)
    b = ops.calibration_stats(x, gram=True)
    assert torch.equal(a.sum, b.sum) and torch.equal(a.sumsq, b.sumsq)
    xd = x.double()
    torch.testing.assert_close(a.gram, xd.t() @ xd, rtol=1e-4, atol=1e-2)


# ---------------------------------------------------------------- bad input on CUDA

@cuda_only
def test_cuda_bad_input():
    x = make_x((4, 64), torch.float16)
    w = torch.ones(64, device=DEV, dtype=torch.float16)
    idx = make_idx("sorted", 64)
    with pytest.raises(ValueError, match="rms_norm_gather.*device"):
        ops.rms_norm_gather(x, w.cpu(), idx, 1e-6)
    with pytest.raises(ValueError, match="index_select_gemm.*device"):
        ops.index_select_gemm(x, idx.cpu(), torch.ones(8, idx.numel(), device=DEV, dtype=torch.float16))
    with pytest.raises(IndexError, match="out of range"):
        ops.rms_norm_gather(x, w, torch.tensor([0, 64], device=DEV), 1e-6)
    with pytest.raises(IndexError, match="out of range"):
        ops.index_select_gemm(x, torch.tensor([-1], device=DEV), torch.ones(8, 1, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="duplicate"):
        ops.scatter_add_(x, torch.tensor([3, 3], device=DEV), torch.ones(4, 2, device=DEV, dtype=torch.float16))
    with pytest.raises(TypeError, match="same dtype"):
        ops.scatter_add_(x, idx, torch.ones(4, idx.numel(), device=DEV))
    with pytest.raises(ValueError, match="leading"):
        ops.gemm_scatter_add_(x, idx, torch.ones(5, 8, device=DEV, dtype=torch.float16),
                              torch.ones(idx.numel(), 8, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="width"):
        ops.calibration_stats(make_x((3, 32), torch.float32), ops.calibration_stats(x))
    torch.cuda.synchronize()  # no kernel faulted on the rejected inputs


def test_overlapping_memory_refused():
    d = 64
    idx = make_idx("sorted", d, seed=54, frac=0.25)
    k = idx.numel()
    expanded = make_x((1, d), torch.float16, seed=55).expand(4, d)
    with pytest.raises(ValueError, match=r"scatter_add_: residual has elements that share memory"):
        ops.scatter_add_(expanded, idx, make_x((4, k), torch.float16))
    r = make_x((4, d), torch.float16, seed=56)
    before = r.clone()
    with pytest.raises(ValueError, match=r"scatter_add_: y shares memory with residual"):
        ops.scatter_add_(r, idx, r[:, :k])
    with pytest.raises(ValueError, match=r"gemm_scatter_add_: x shares memory with residual"):
        ops.gemm_scatter_add_(r, idx, r[:, 1:9], make_x((k, 8), torch.float16))
    tall = make_x((k, d), torch.float16, seed=59)  # k rows, so a [k, 8] view of it fits as the weight
    with pytest.raises(ValueError, match=r"gemm_scatter_add_: weight shares memory with residual"):
        ops.gemm_scatter_add_(tall, idx, make_x((k, 8), torch.float16), tall[:, :8])
    assert torch.equal(r, before)
    s = torch.zeros(d, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match=r"calibration_stats_: sumsq shares memory with sum"):
        torch.ops.dip_ext.calibration_stats_(r, s, s, None)
    if DEV == "cuda":
        torch.cuda.synchronize()


@cuda_only
def test_check_idx_inside_graph_capture_is_refused():
    x = make_x((2, 64), torch.float16, seed=57)
    w = torch.ones(64, device=DEV, dtype=torch.float16)
    idx = make_idx("sorted", 64, seed=58)
    ops.rms_norm_gather(x, w, idx, 1e-6)  # warm-up outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match=r"rms_norm_gather: check_idx=True .* CUDA graph is being captured"):
        with torch.cuda.graph(graph, stream=s):
            ops.rms_norm_gather(x, w, idx, 1e-6)
    # the refusal came before any host read: the device and the stream still work
    torch.cuda.synchronize()
    torch.testing.assert_close(ops.rms_norm_gather(x, w, idx, 1e-6).float(),
                               F.rms_norm(x.float(), (64,), w.float(), 1e-6)[..., idx], atol=2e-3, rtol=2e-3)


@cuda_only
def test_build_holds_code_for_this_gpu():
    import dip_ext
    info = dip_ext.build_info()
    assert info["cuda"] and info["cuda_sass"], info
    major, minor = torch.cuda.get_device_capability()
    here = major * 10 + minor
    num = lambda a: int(a.split("_")[1].rstrip("af"))  # noqa: E731
    # machine code runs on its own major version at the same or a later minor; sm_XYa only on sm_XY exactly
    same_major = [a for a in info["cuda_sass"] if num(a) == here
                  or (not a.endswith(("a", "f")) and num(a) // 10 == major and num(a) % 10 <= minor)]
    older_ptx = [a for a in info["cuda_ptx"] if num(a) <= here]
    assert same_major or older_ptx, f"sm_{here} can run none of {info['cuda_sass']} / {info['cuda_ptx']}"


# ---------------------------------------------------------------- CUDA graphs

@cuda_only
@pytest.mark.parametrize("tokens", [1, 32])  # GEMV and gather + cuBLAS paths
def test_compacted_calls_capture_in_cuda_graph(tokens):
    dtype, d = torch.bfloat16, 512
    g = _gen(60)
    attn_in = make_idx("sorted", d, seed=61, multiple=8)
    attn_out = make_idx("sorted", d, seed=62, multiple=8)
    w_norm = torch.randn(d, generator=g).to(DEV, dtype)
    w_in = (torch.randn(256, attn_in.numel(), generator=g) / 16).to(DEV, dtype)
    w_out = (torch.randn(attn_out.numel(), 256, generator=g) / 16).to(DEV, dtype)
    static_x = torch.randn(tokens, d, generator=g).to(DEV, dtype)

    def step(x):
        h = ops.rms_norm_gather(x, w_norm, attn_in, 1e-6, check_idx=False)
        a = ops.index_select_gemm(x, attn_in, w_in, check_idx=False)
        r = x.clone()
        ops.gemm_scatter_add_(r, attn_out, a, w_out, check_idx=False)
        ops.scatter_add_(r, attn_in, h, check_idx=False)
        return r

    def reference(x):
        h = F.rms_norm(x.float(), (d,), w_norm.float(), 1e-6)[..., attn_in].to(dtype)
        a = F.linear(x[..., attn_in], w_in)
        r = reference_copy(x).float().index_add_(-1, attn_out, F.linear(a, w_out).float())
        return r.index_add_(-1, attn_in, h.float())

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside capture (cuBLAS workspaces, allocator)
            step(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_x)
    for seed in (63, 64):
        static_x.copy_(torch.randn(tokens, d, generator=_gen(seed)).to(DEV, dtype))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(static_x)
        assert_no_shared_storage(ref, static_out)
        assert_close(static_out, ref, dtype, scale=8.0)
