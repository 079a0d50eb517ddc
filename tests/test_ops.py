"""Every CPU op of ``dip_ext.ops`` against its plain-torch reference on fresh random data.

Covers fp32 / fp16 / bf16, 2-D and 3-D x, non-contiguous x (transposed, sliced, permuted views), sorted and
unsorted idx, int32 idx, empty and full idx, 1 and many tokens, bias None / given, non-contiguous residuals
for the in-place ops, calibration statistics (values, accumulation, merge, determinism), opcheck and
torch.compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import dip_ext
from dip_ext import ops
from dip_ext.selftest import assert_no_shared_storage, reference_copy

# Tolerances (atol, rtol) per dtype, measured against the reference computed IN THE SAME DTYPE by torch.
# fp32: both sides accumulate in fp32 but in a different order (norm statistics, GEMM blocking).
# fp16 / bf16: one rounding of the output each, possibly on either side of a tie, plus torch's own
# low-precision intermediate roundings in the reference chain -> a couple of ulps of the output.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}
DTYPES = list(TOL)
EPS = 1e-6

_settings = settings(max_examples=25, deadline=None, derandomize=False,
                     suppress_health_check=[HealthCheck.too_slow])


def assert_close(actual, expected, dtype, scale=1.0):
    """Compares with the dtype's tolerance; ``scale`` widens atol for outputs that sum many products."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


# ---- input builders -------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "transposed", "sliced", "permuted3d"]


def make_x(shape, dtype, layout, gen):
    """A tensor of ``shape`` (2-D or 3-D) whose memory layout is ``layout``.

    transposed: last dim not unit-stride (built as the transpose of a contiguous tensor);
    sliced: every other column of a wider buffer (unit stride lost, and an offset);
    permuted3d: for 3-D, [batch, seq, d] viewed from a [seq, batch, d] buffer (rows not mergeable).
    """
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(dtype)
    if layout == "transposed":
        base = torch.randn(tuple(reversed(shape)), generator=gen).to(dtype)
        return base.permute(*reversed(range(len(shape))))
    if layout == "sliced":
        wide = torch.randn((*shape[:-1], 2 * shape[-1] + 1), generator=gen).to(dtype)
        return wide[..., 1::2]
    if layout == "permuted3d":
        if len(shape) == 2:
            return make_x(shape, dtype, "transposed", gen)
        b, s, d = shape
        return torch.randn((s, b, d), generator=gen).to(dtype).transpose(0, 1)
    raise AssertionError(layout)


def make_idx(d, k, *, sorted_, int32, gen):
    """``k`` unique indices in [0, d), sorted or shuffled, int64 or int32."""
    idx = torch.randperm(d, generator=gen)[:k]
    if sorted_:
        idx = idx.sort().values
    return idx.to(torch.int32 if int32 else torch.int64)


def leading_shape(tokens, three_d):
    """[tokens] or a [batch, seq] split of about ``tokens`` rows."""
    if not three_d:
        return (tokens,)
    return (2, max(tokens // 2, 1)) if tokens > 1 else (1, 1)


# Fields every op case draws: dtype, token count, width, how many columns kept, idx order and dtype, rank.
COMMON = dict(
    dtype=st.sampled_from(DTYPES),
    tokens=st.sampled_from([1, 2, 7, 33]),
    d=st.sampled_from([1, 5, 16, 67]),
    keep=st.sampled_from(["empty", "one", "some", "full"]),
    sorted_=st.booleans(),
    int32=st.booleans(),
    three_d=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
case = st.fixed_dictionaries(dict(COMMON, layout=st.sampled_from(LAYOUTS)))


def kept(d, keep):
    return {"empty": 0, "one": 1, "some": max(1, (3 * d) // 5), "full": d}[keep]


def setup_case(c):
    gen = torch.Generator().manual_seed(c["seed"])
    d = c["d"]
    k = kept(d, c["keep"])
    x = make_x((*leading_shape(c["tokens"], c["three_d"]), d), c["dtype"], c["layout"], gen)
    idx = make_idx(d, k, sorted_=c["sorted_"], int32=c["int32"], gen=gen)
    return gen, x, idx


# ---- norm + gather --------------------------------------------------------------------------------------

@_settings
@given(c=case)
def test_rms_norm_gather_matches_reference(c):
    check_rms_norm_gather(c)


def check_rms_norm_gather(c):
    gen, x, idx = setup_case(c)
    d = x.shape[-1]
    w = (1 + 0.5 * torch.randn(d, generator=gen)).to(c["dtype"])
    got = ops.rms_norm_gather(x, w, idx, EPS)
    ref = F.rms_norm(x, (d,), w, EPS)[..., idx.long()]
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], idx.numel())
    assert_close(got, ref, c["dtype"])


@_settings
@given(c=case, with_bias=st.booleans())
def test_layer_norm_gather_matches_reference(c, with_bias):
    check_layer_norm_gather(c, with_bias)


def check_layer_norm_gather(c, with_bias):
    gen, x, idx = setup_case(c)
    d = x.shape[-1]
    w = (1 + 0.5 * torch.randn(d, generator=gen)).to(c["dtype"])
    b = torch.randn(d, generator=gen).to(c["dtype"]) if with_bias else None
    got = ops.layer_norm_gather(x, w, b, idx, EPS)
    ref = F.layer_norm(x, (d,), w, b, EPS)[..., idx.long()]
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], idx.numel())
    assert_close(got, ref, c["dtype"])


def test_rms_norm_gather_statistics_over_full_width():
    """The norm must use all d columns, not only the kept ones: a huge dropped column changes the result."""
    x = torch.ones(1, 4)
    x[0, 3] = 100.0
    idx = torch.tensor([0, 1])
    got = ops.rms_norm_gather(x, torch.ones(4), idx, 0.0)
    expected = 1.0 / torch.sqrt(torch.tensor((3 + 100.0**2) / 4))
    torch.testing.assert_close(got, expected.expand(1, 2))


# ---- index-select GEMM ----------------------------------------------------------------------------------

@_settings
@given(c=case, with_bias=st.booleans(), out=st.sampled_from([1, 3, 17]))
def test_index_select_gemm_matches_reference(c, with_bias, out):
    check_index_select_gemm(c, with_bias, out)


def check_index_select_gemm(c, with_bias, out):
    gen, x, idx = setup_case(c)
    w = torch.randn(out, idx.numel(), generator=gen).to(c["dtype"])
    b = torch.randn(out, generator=gen).to(c["dtype"]) if with_bias else None
    got = ops.index_select_gemm(x, idx, w, b)
    ref = F.linear(x.index_select(-1, idx), w, b)
    assert got.shape == (*x.shape[:-1], out)
    # a dot product of k terms: error grows with its magnitude (~sqrt(k) for unit-normal data)
    assert_close(got, ref, c["dtype"], scale=max(1.0, idx.numel() ** 0.5))


# ---- scatter-add updates --------------------------------------------------------------------------------

RES_LAYOUTS = ["contiguous", "sliced_cols", "transposed", "permuted3d"]


def make_residual(lead, d, dtype, layout, gen):
    """A residual [..., d] to update in place, plus the buffer it lives in (to check untouched memory).

    sliced_cols: the first d columns of a wider buffer (row view exists, no copy needed);
    transposed / permuted3d: no unit-stride row view, so the op must write back into the caller's tensor.
    """
    shape = (*lead, d)
    if layout == "contiguous":
        base = torch.randn(shape, generator=gen).to(dtype)
        return base, base
    if layout == "sliced_cols":
        base = torch.randn((*lead, d + 3), generator=gen).to(dtype)
        return base[..., :d], base
    if layout == "transposed":
        base = torch.randn(tuple(reversed(shape)), generator=gen).to(dtype)
        return base.permute(*reversed(range(len(shape)))), base
    if layout == "permuted3d":
        if len(lead) == 1:
            return make_residual(lead, d, dtype, "transposed", gen)
        base = torch.randn((lead[1], lead[0], d), generator=gen).to(dtype)
        return base.transpose(0, 1), base
    raise AssertionError(layout)


res_case = st.fixed_dictionaries(dict(COMMON, res_layout=st.sampled_from(RES_LAYOUTS),
                                      y_layout=st.sampled_from(LAYOUTS)))


@_settings
@given(c=res_case)
def test_scatter_add_matches_index_add(c):
    check_scatter_add(c)


def check_scatter_add(c):
    gen = torch.Generator().manual_seed(c["seed"])
    lead, d, dt = leading_shape(c["tokens"], c["three_d"]), c["d"], c["dtype"]
    idx = make_idx(d, kept(d, c["keep"]), sorted_=c["sorted_"], int32=c["int32"], gen=gen)
    residual, base = make_residual(lead, d, dt, c["res_layout"], gen)
    y = make_x((*lead, idx.numel()), dt, c["y_layout"], gen)
    ref = reference_copy(residual).index_add_(-1, idx, y)
    base_before = base.clone()
    ptr = residual.data_ptr()

    out = ops.scatter_add_(residual, idx, y)

    assert out is residual or out.data_ptr() == ptr
    assert residual.data_ptr() == ptr and residual.shape == ref.shape
    assert_no_shared_storage(ref, residual)
    assert_close(residual, ref, dt)
    # memory of the buffer outside the residual view is untouched
    if c["res_layout"] == "sliced_cols":
        assert torch.equal(base[..., d:], base_before[..., d:])


@_settings
@given(c=res_case, with_bias=st.booleans(), k_in=st.sampled_from([1, 4, 19]))
def test_gemm_scatter_add_matches_index_add_of_linear(c, with_bias, k_in):
    check_gemm_scatter_add(c, with_bias, k_in)


def check_gemm_scatter_add(c, with_bias, k_in):
    gen = torch.Generator().manual_seed(c["seed"])
    lead, d, dt = leading_shape(c["tokens"], c["three_d"]), c["d"], c["dtype"]
    idx = make_idx(d, kept(d, c["keep"]), sorted_=c["sorted_"], int32=c["int32"], gen=gen)
    residual, _ = make_residual(lead, d, dt, c["res_layout"], gen)
    x = make_x((*lead, k_in), dt, c["y_layout"], gen)
    w = torch.randn(idx.numel(), k_in, generator=gen).to(dt)
    b = torch.randn(idx.numel(), generator=gen).to(dt) if with_bias else None
    ref = reference_copy(residual).index_add_(-1, idx, F.linear(x, w, b))
    ptr = residual.data_ptr()

    out = ops.gemm_scatter_add_(residual, idx, x, w, b)

    assert out.data_ptr() == ptr and residual.data_ptr() == ptr
    assert_no_shared_storage(ref, residual)
    assert_close(residual, ref, dt, scale=max(1.0, k_in ** 0.5))


# The random search above may miss a corner in one run; this grid hits each one every run.
CORNERS = [dict(tokens=t, d=d, keep=k, sorted_=srt, int32=i32, three_d=td)
           for (t, d, k, srt, i32, td) in [
               (1, 16, "empty", True, False, False), (7, 16, "empty", False, True, True),
               (1, 16, "full", True, True, False), (33, 67, "full", False, False, True),
               (33, 67, "some", False, True, False), (2, 1, "one", True, False, True)]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("corner", CORNERS, ids=lambda c: f"t{c['tokens']}-d{c['d']}-{c['keep']}-"
                         f"{'sorted' if c['sorted_'] else 'unsorted'}-{'i32' if c['int32'] else 'i64'}-"
                         f"{'3d' if c['three_d'] else '2d'}")
@pytest.mark.parametrize("layout", ["contiguous", "permuted3d"])
def test_corner_cases_all_ops(dtype, corner, layout):
    res_layout = "contiguous" if layout == "contiguous" else "transposed"
    c = dict(corner, dtype=dtype, layout=layout, res_layout=res_layout, y_layout=layout, seed=7)
    check_rms_norm_gather(c)
    check_layer_norm_gather(c, True)
    check_layer_norm_gather(c, False)
    check_index_select_gemm(c, True, 5)
    check_index_select_gemm(c, False, 1)
    check_scatter_add(c)
    check_gemm_scatter_add(c, True, 4)
    check_gemm_scatter_add(c, False, 1)


def test_scatter_add_returns_caller_tensor_for_copy_path():
    """A residual with no row view (transposed) is updated through a copy that must land back in it."""
    base = torch.zeros(6, 3)
    residual = base.t()  # [3, 6], stride (1, 3)
    idx = torch.tensor([5, 0])
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    ops.scatter_add_(residual, idx, y)
    assert torch.equal(base[5], torch.tensor([1.0, 3.0, 5.0]))
    assert torch.equal(base[0], torch.tensor([2.0, 4.0, 6.0]))
    assert base[1:5].abs().sum() == 0


def test_unchecked_idx_gives_same_result():
    """check_idx=False skips the scan only; valid input gives the same bits."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, generator=gen)
    w = torch.randn(12, generator=gen)
    idx = torch.tensor([7, 1, 4])
    assert torch.equal(ops.rms_norm_gather(x, w, idx, EPS), ops.rms_norm_gather(x, w, idx, EPS, check_idx=False))
    wl = torch.randn(4, 3, generator=gen)
    assert torch.equal(ops.index_select_gemm(x, idx, wl), ops.index_select_gemm(x, idx, wl, check_idx=False))
    r1, r2 = x.clone(), x.clone()
    y = torch.randn(5, 3, generator=gen)
    ops.scatter_add_(r1, idx, y)
    ops.scatter_add_(r2, idx, y, check_idx=False)
    assert torch.equal(r1, r2)


# ---- calibration statistics -----------------------------------------------------------------------------

def f64_reference(x):
    rows = x.reshape(-1, x.shape[-1]).double()
    return rows.shape[0], rows.sum(0), (rows * rows).sum(0), rows.T @ rows


@_settings
@given(dtype=st.sampled_from(DTYPES), three_d=st.booleans(), layout=st.sampled_from(LAYOUTS),
       tokens=st.sampled_from([1, 3, 300, 600]), d=st.sampled_from([1, 7, 40]), seed=st.integers(0, 2**31 - 1))
def test_calibration_stats_matches_float64(dtype, three_d, layout, tokens, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_x((*leading_shape(tokens, three_d), d), dtype, layout, gen)
    st_ = ops.calibration_stats(x, gram=True)
    n, s, q, g = f64_reference(x)
    assert st_.count == n
    assert st_.sum.dtype == st_.sumsq.dtype == st_.gram.dtype == torch.float64
    # fp32 partials over 256-row chunks: relative error ~1e-7 * sqrt(rows) of the sum of |values|
    scale = x.reshape(-1, d).double().abs().sum(0).max().item() + 1
    torch.testing.assert_close(st_.sum, s, atol=1e-5 * scale, rtol=1e-6)
    torch.testing.assert_close(st_.sumsq, q, atol=1e-5 * q.max().item() + 1e-6, rtol=1e-6)
    torch.testing.assert_close(st_.gram, g, atol=1e-5 * q.max().item() + 1e-6, rtol=1e-5)
    assert torch.allclose(st_.gram.diagonal(), st_.sumsq, rtol=1e-5, atol=1e-5 * q.max().item() + 1e-6)


def test_calibration_stats_without_gram_and_derived():
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    s = ops.calibration_stats(x)
    assert s.gram is None and s.count == 2
    torch.testing.assert_close(s.mean, torch.tensor([2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s.var, torch.tensor([1.0, 9.0], dtype=torch.float64))
    torch.testing.assert_close(s.rms, torch.tensor([5.0, 10.0], dtype=torch.float64).sqrt())


@pytest.mark.parametrize("gram", [False, True])
def test_calibration_stats_accumulate_equals_concatenation(gram):
    gen = torch.Generator().manual_seed(11)
    parts = [torch.randn(n, 24, generator=gen) for n in (5, 256, 300, 1)]
    acc = None
    for p in parts:
        acc = ops.calibration_stats(p, acc, gram=gram)
    one = ops.calibration_stats(torch.cat(parts), gram=gram)
    assert acc.count == one.count == sum(p.shape[0] for p in parts)
    # the 256-row fp32 chunks fall differently in the two runs: equal to fp32 rounding, not bitwise
    torch.testing.assert_close(acc.sum, one.sum, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(acc.sumsq, one.sumsq, rtol=1e-6, atol=1e-4)
    if gram:
        torch.testing.assert_close(acc.gram, one.gram, rtol=1e-5, atol=1e-3)


def test_calibration_stats_merge_equals_one_run():
    gen = torch.Generator().manual_seed(12)
    a_x, b_x = torch.randn(2, 70, 16, generator=gen), torch.randn(90, 16, generator=gen)
    a = ops.calibration_stats(a_x, gram=True)
    b = ops.calibration_stats(b_x, gram=True)
    merged = a.merge(b)
    assert merged is a
    one = ops.calibration_stats(torch.cat([a_x.reshape(-1, 16), b_x]), gram=True)
    assert merged.count == one.count == 230
    torch.testing.assert_close(merged.sum, one.sum, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(merged.sumsq, one.sumsq, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(merged.gram, one.gram, rtol=1e-5, atol=1e-3)


def test_calibration_stats_state_dict_round_trip():
    s = ops.calibration_stats(torch.randn(9, 5), gram=True)
    r = ops.CalibrationStats.from_state_dict(s.state_dict())
    assert r.count == s.count and torch.equal(r.sum, s.sum) and torch.equal(r.gram, s.gram)


def test_calibration_stats_guarantees_across_thread_counts():
    """The op's guarantee: sum and sumsq are bit-identical whatever the thread count (fixed 256-row chunks, fp32
    partials added in order in fp64); the Gram matrix is one fp32 matrix product (at::mm), whose summation order
    the BLAS may choose per thread count, so it is only equal to the exact XᵀX to fp32 rounding."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(1500, 96, generator=gen)  # several 256-row chunks, so threads split the work
    exact = x.double().T @ x.double()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            results.append(ops.calibration_stats(x, gram=True))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        assert torch.equal(r.sum, results[0].sum)
        assert torch.equal(r.sumsq, results[0].sumsq)
    for r in results:
        # fp32 accumulation over 1500 rows: relative error ~ sqrt(1500) * 2^-24 of the row norms' product.
        torch.testing.assert_close(r.gram, exact.to(r.gram.dtype), rtol=1e-5, atol=1e-3)


def test_ops_deterministic_same_input_same_bits():
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(64, 300, generator=gen)
    w = torch.randn(300, generator=gen)
    idx = torch.randperm(300, generator=gen)[:170]
    wl = torch.randn(40, 170, generator=gen)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            r = x.clone()
            ops.scatter_add_(r, idx, x[:, :170])
            outs.append((ops.rms_norm_gather(x, w, idx, EPS), ops.layer_norm_gather(x, w, w, idx, EPS), r))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(ops.index_select_gemm(x, idx, wl), ops.index_select_gemm(x, idx, wl))


# ---- dispatcher integration -----------------------------------------------------------------------------

def _opcheck_samples():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 10, generator=gen)
    w = torch.randn(10, generator=gen)
    idx = torch.tensor([8, 2, 5])
    wl = torch.randn(4, 3, generator=gen)
    bl = torch.randn(4, generator=gen)
    return [
        (torch.ops.dip_ext.rms_norm_gather.default, (x, w, idx, 1e-5, True)),
        (torch.ops.dip_ext.layer_norm_gather.default, (x, w, w.clone(), idx, 1e-5, True)),
        (torch.ops.dip_ext.layer_norm_gather.default, (x, w, None, idx, 1e-5, True)),
        (torch.ops.dip_ext.index_select_gemm.default, (x, idx, wl, bl, True)),
        (torch.ops.dip_ext.index_select_gemm.default, (x.reshape(1, 3, 10), idx.int(), wl, None, True)),
        (torch.ops.dip_ext.scatter_add_.default, (x.clone(), idx, torch.randn(3, 3, generator=gen), True)),
        (torch.ops.dip_ext.gemm_scatter_add_.default, (x.clone(), idx, torch.randn(3, 4, generator=gen),
                                                        torch.randn(3, 4, generator=gen), None, True)),
        (torch.ops.dip_ext.calibration_stats_.default,
         (x, torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64), None)),
        (torch.ops.dip_ext.calibration_stats_.default,
         (x, torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64),
          torch.zeros(10, 10, dtype=torch.float64))),
    ]


@pytest.mark.parametrize("i", range(9))
def test_opcheck(i):
    op, args = _opcheck_samples()[i]
    torch.library.opcheck(op, args)


def _block(x, w_norm, idx_in, w_in, idx_out, w_out):
    """A tiny DISP sub-block: norm+gather, GEMM, GEMM scattered back into a copy of the residual."""
    h = ops.rms_norm_gather(x, w_norm, idx_in, 1e-5, check_idx=False)
    h = ops.index_select_gemm(h, torch.arange(h.shape[-1]), w_in, check_idx=False)
    r = x.clone()
    ops.gemm_scatter_add_(r, idx_out, torch.relu(h), w_out, check_idx=False)
    return ops.scatter_add_(r, idx_out, r[..., idx_out] * 0.5, check_idx=False)


def _block_args():
    gen = torch.Generator().manual_seed(6)
    return (torch.randn(2, 3, 12, generator=gen), torch.randn(12, generator=gen), torch.tensor([0, 3, 4, 9, 11]),
            torch.randn(6, 5, generator=gen), torch.tensor([1, 2, 10]), torch.randn(3, 6, generator=gen))


def test_torch_compile_fullgraph_aot_eager():
    args = _block_args()
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), _block(*args))


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    args = _block_args()
    compiled = torch.compile(_block, fullgraph=True)
    torch.testing.assert_close(compiled(*args), _block(*args))


def test_build_info_keys():
    info = dip_ext.build_info()
    assert {"version", "torch_version", "cuda", "cuda_archs", "cuda_arch_source", "cuda_sass", "cuda_ptx",
            "openmp"} <= set(info)
    assert info["version"] == dip_ext.__version__
    assert info["torch_version"].split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert (info["cuda_archs"] is None) == (not info["cuda"])


_PATHS_SCRIPT = r"""
import sys, torch, dip_ext
from dip_ext import ops
gen = torch.Generator().manual_seed(21)
out = {}
for dt in (torch.float32, torch.float16, torch.bfloat16):
    x = torch.randn(9, 83, generator=gen).to(dt)
    w = torch.randn(83, generator=gen).to(dt)
    idx = torch.randperm(83, generator=gen)[:50].sort().values  # sorted: the AVX-512 path where available
    r = torch.randn(9, 83, generator=gen).to(dt)
    ops.scatter_add_(r, idx, x[:, :50])
    out[str(dt)] = [ops.rms_norm_gather(x, w, idx, 1e-6), ops.layer_norm_gather(x, w, w, idx, 1e-6),
                    ops.index_select_gemm(x, idx, torch.eye(50).to(dt)), r]
torch.save(out, sys.argv[1])
"""


@pytest.mark.slow  # two fresh interpreters importing torch
def test_simd_and_scalar_paths_agree(tmp_path):
    """DIP_EXT_NO_AVX512=1 forces the scalar loops: both paths must give the same results (sorted idx)."""
    import os
    import subprocess
    import sys
    files = {}
    for flag in ("0", "1"):
        files[flag] = tmp_path / f"out{flag}.pt"
        env = dict(os.environ, DIP_EXT_NO_AVX512=flag)
        # cwd outside the checkout: its source folder (no compiled _C) must not shadow the installed package
        subprocess.run([sys.executable, "-c", _PATHS_SCRIPT, str(files[flag])], env=env, check=True, cwd=tmp_path)
    simd, scalar = torch.load(files["0"]), torch.load(files["1"])
    for dt, dtype in zip(simd, DTYPES):
        for name, a, b in zip(["rms", "ln", "gather_gemm", "scatter"], simd[dt], scalar[dt]):
            if name == "scatter":  # same float add, same rounding: bit-exact
                assert torch.equal(a, b), (dt, name)
            else:  # the norm statistics are summed in another order
                assert_close(a, b, dtype)
