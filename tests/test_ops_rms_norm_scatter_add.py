"""``ops.rms_norm_scatter_add_`` (an output RMSNorm folded into the residual scatter-add) on the CPU against an
independent plain-torch reference: the block output zero-padded to the full width d, RMS-normalised over d in
fp32, scaled by ``weight`` (or ``1 + weight``), rounded to the dtype and index-added into a clone of the residual.
Every dtype, 2-D and 3-D, non-contiguous residuals and outputs, empty / one / full index sets, unsorted and int32
indices, check_idx off, opcheck, torch.compile, the autograd fallback of RMSNormScatterAdd, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from dip_ext import ops
from dip_ext.modules import RMSNormScatterAdd, rms_norm_scatter_add

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2)}
DTYPES = list(TOL)
EPS = 1e-6


def reference(residual, idx, y, weight, eps, unit_offset):
    """Built from independent clones: the masked, full-width definition of the op (a new tensor)."""
    r, y, w, idx = residual.clone(), y.clone(), weight.clone(), idx.clone().long()
    full = torch.zeros((*y.shape[:-1], r.shape[-1]), dtype=torch.float32)
    full[..., idx] = y.to(torch.float32)
    rstd = torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + eps)
    scale = w.to(torch.float32) + (1.0 if unit_offset else 0.0)
    normed = (full * rstd * scale).to(y.dtype)
    return r.index_add_(-1, idx, normed[..., idx])


def make(shape, dtype, layout, gen):
    """A tensor of ``shape``: contiguous, transposed (no unit last stride) or sliced (every other column)."""
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(dtype)
    if layout == "transposed":
        return torch.randn(tuple(reversed(shape)), generator=gen).to(dtype).permute(*reversed(range(len(shape))))
    wide = torch.randn((*shape[:-1], 2 * shape[-1] + 1), generator=gen).to(dtype)
    return wide[..., 1::2]


def run_case(dtype, lead, d, k, *, res_layout="contiguous", y_layout="contiguous", sorted_=True, int32=False,
             unit_offset=True, seed=0, check_idx=True):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(d, generator=gen)[:k]
    idx = (idx.sort().values if sorted_ else idx).to(torch.int32 if int32 else torch.int64)
    residual = make((*lead, d), dtype, res_layout, gen)
    y = make((*lead, k), dtype, y_layout, gen) * 3
    weight = (torch.rand(d, generator=gen) - 0.5).to(dtype)
    expected = reference(residual, idx, y, weight, EPS, unit_offset)
    ptr = residual.data_ptr()
    out = ops.rms_norm_scatter_add_(residual, idx, y, weight, EPS, unit_offset=unit_offset, check_idx=check_idx)
    assert out is residual and residual.data_ptr() == ptr
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(residual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(5,), (2, 3), (1,), (0,), (2, 0)], ids=str)
@pytest.mark.parametrize("keep", ["empty", "one", "some", "full"])
@pytest.mark.parametrize("unit_offset", [True, False])
def test_matches_reference(dtype, lead, keep, unit_offset):
    d = 37
    k = {"empty": 0, "one": 1, "some": 20, "full": d}[keep]
    run_case(dtype, lead, d, k, unit_offset=unit_offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_layout,y_layout", [("transposed", "contiguous"), ("sliced", "transposed"),
                                                  ("contiguous", "sliced"), ("transposed", "transposed")])
def test_non_contiguous(dtype, res_layout, y_layout):
    run_case(dtype, (2, 4), 24, 11, res_layout=res_layout, y_layout=y_layout, sorted_=False, int32=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(DTYPES), three_d=st.booleans(), d=st.sampled_from([1, 8, 67, 640]),
       frac=st.floats(0, 1), sorted_=st.booleans(), int32=st.booleans(), unit_offset=st.booleans(),
       res_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       y_layout=st.sampled_from(["contiguous", "transposed", "sliced"]), seed=st.integers(0, 2**31 - 1))
def test_random_cases(dtype, three_d, d, frac, sorted_, int32, unit_offset, res_layout, y_layout, seed):
    run_case(dtype, (2, 3) if three_d else (7,), d, round(frac * d), res_layout=res_layout, y_layout=y_layout,
             sorted_=sorted_, int32=int32, unit_offset=unit_offset, seed=seed)


def test_statistics_over_full_width_not_kept_entries():
    """The RMS divides by d, not by len(idx): one kept entry of value v in a row of width 4 becomes v / sqrt(v²/4)."""
    residual = torch.zeros(1, 4)
    ops.rms_norm_scatter_add_(residual, torch.tensor([2]), torch.tensor([[3.0]]), torch.zeros(4), 0.0,
                              unit_offset=True)
    assert torch.allclose(residual, torch.tensor([[0.0, 0.0, 2.0, 0.0]]))


def test_unchecked_idx_gives_same_bits():
    gen = torch.Generator().manual_seed(1)
    residual, y, w = torch.randn(6, 20, generator=gen), torch.randn(6, 5, generator=gen), torch.randn(20, generator=gen)
    idx = torch.tensor([19, 0, 7, 3, 11])
    a, b = residual.clone(), residual.clone()
    ops.rms_norm_scatter_add_(a, idx, y, w, EPS)
    ops.rms_norm_scatter_add_(b, idx, y, w, EPS, check_idx=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("unit_offset", [True, False])
def test_opcheck(unit_offset):
    gen = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 3, 10, generator=gen), torch.tensor([8, 2, 5]), torch.randn(2, 3, 3, generator=gen),
            torch.randn(10, generator=gen), 1e-6, unit_offset, True)
    torch.library.opcheck(torch.ops.dip_ext.rms_norm_scatter_add_.default, args)


def test_fake_kernel_on_meta():
    r = torch.empty(2, 3, 10, device="meta")
    ops.rms_norm_scatter_add_(r, torch.tensor([1, 2], device="meta"), torch.empty(2, 3, 2, device="meta"),
                              torch.empty(10, device="meta"), 1e-6)
    with pytest.raises(ValueError, match=r"rms_norm_scatter_add_: weight is on cpu but residual is on meta"):
        ops.rms_norm_scatter_add_(r, torch.tensor([1, 2], device="meta"), torch.empty(2, 3, 2, device="meta"),
                                  torch.empty(10), 1e-6)


def test_torch_compile_fullgraph():
    def f(x, idx, y, w):
        r = x.clone()
        ops.rms_norm_scatter_add_(r, idx, y, w, 1e-6, unit_offset=True, check_idx=False)
        return r * 2

    gen = torch.Generator().manual_seed(3)
    args = (torch.randn(4, 12, generator=gen), torch.tensor([0, 5, 11]), torch.randn(4, 3, generator=gen),
            torch.randn(12, generator=gen))
    expected = f(*args)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), expected)


def test_module_kernel_and_autograd_paths_agree():
    """RMSNormScatterAdd: the kernel path (no grad) and the differentiable torch path give the same values, the
    torch path has gradients, and the kernel path leaves the input alone unless told it owns it."""
    gen = torch.Generator().manual_seed(4)
    w, idx = torch.randn(16, generator=gen), torch.tensor([1, 4, 9, 15])
    x, y = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 4, generator=gen)
    module = RMSNormScatterAdd(w.clone().requires_grad_(True), 1e-6, idx, unit_offset=True)
    with torch.no_grad():
        fast = module(x, y, inplace=False)
    assert not torch.equal(fast, x)
    yg = y.clone().requires_grad_(True)
    slow = module(x, yg, inplace=False)
    slow.sum().backward()
    assert yg.grad is not None and module.weight.grad is not None
    torch.testing.assert_close(fast, slow.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(rms_norm_scatter_add(x, idx, y, w, 1e-6, True), reference(x, idx, y, w, 1e-6, True))


# ---- bad input ----------------------------------------------------------------------------------------------

D, T, K = 8, 4, 3


@pytest.fixture
def a():
    gen = torch.Generator().manual_seed(0)
    return dict(residual=torch.randn(T, D, generator=gen), idx=torch.tensor([6, 1, 3]),
                y=torch.randn(T, K, generator=gen), weight=torch.randn(D, generator=gen), eps=1e-6)


def call(a, **override):
    b = {**a, **override}
    return ops.rms_norm_scatter_add_(b["residual"], b["idx"], b["y"], b["weight"], b["eps"], unit_offset=True)


def test_valid_arguments_pass(a):
    call(a)


OP = r"dip_ext\.rms_norm_scatter_add_: "
BAD = [
    (dict(idx=torch.tensor([0, 8, 2])), IndexError, OP + r"idx\[1\] = 8 is out of range .* size 8"),
    (dict(idx=torch.tensor([0, -1, 2])), IndexError, OP + r"idx\[1\] = -1 is out of range"),
    (dict(idx=torch.tensor([1, 4, 1])), ValueError, OP + "idx has duplicate index 1"),
    (dict(idx=torch.tensor([1.0, 2.0, 3.0])), TypeError, OP + "idx must be int64 or int32, got Float"),
    (dict(idx=torch.tensor([[1, 2, 3]])), ValueError, OP + r"idx must be 1-D, got shape \[1, 3\]"),
    (dict(y=torch.randn(T, 2)), ValueError, OP + "y has 2 columns but idx has 3 entries"),
    (dict(y=torch.randn(T + 1, K)), ValueError, OP + "y has shape .* but residual has shape .* leading"),
    (dict(y=torch.randn(T, K).double()), TypeError, OP + "y must be float32, float16 or bfloat16, got Double"),
    (dict(y=torch.randn(T, K).half()), TypeError, OP + r"y \(Half\) and residual \(Float\) must have the same dtype"),
    (dict(weight=torch.randn(D + 1)), ValueError, OP + r"weight must have shape \[8\], got \[9\]"),
    (dict(weight=torch.randn(D, 1)), ValueError, OP + r"weight must have shape \[8\], got \[8, 1\]"),
    (dict(weight=torch.randn(D).half()), TypeError, OP + r"weight \(Half\) and residual \(Float\) must have the same"),
    (dict(eps=-1.0), ValueError, OP + "eps must be >= 0, got -1"),
    (dict(residual=torch.randn(D)), ValueError, OP + r"residual must have 2 dims \[tokens, d\] or 3 dims"),
    (dict(residual=torch.ones(T, D, dtype=torch.int32)), TypeError, OP + "residual must be float32, float16 or"),
]


@pytest.mark.parametrize("override,exc,message", BAD, ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_bad_input(a, override, exc, message):
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=message):
        call(a, **override)
    assert torch.equal(a["residual"], before["residual"])  # nothing written on failure


def test_weight_on_another_device(a):
    with pytest.raises(ValueError, match=OP + "weight is on meta but residual is on cpu"):
        call(a, weight=torch.empty(D, device="meta"))
