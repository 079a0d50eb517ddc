"""Bad input to every op raises a clear Python exception (type + a message naming the op and the problem).

None of these may crash the interpreter; each case runs in-process, so a crash would fail the whole file.
"""

from __future__ import annotations

import pytest
import torch

from dip_ext import ops

D, T, K = 8, 4, 3


@pytest.fixture
def t():
    """Valid fp32 arguments: x [T, D], norm weight/bias [D], idx [K], linear weight [5, K] / bias [5]."""
    gen = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(T, D, generator=gen),
        w=torch.randn(D, generator=gen),
        b=torch.randn(D, generator=gen),
        idx=torch.tensor([6, 1, 3]),
        wl=torch.randn(5, K, generator=gen),
        bl=torch.randn(5, generator=gen),
        y=torch.randn(T, K, generator=gen),
        wo=torch.randn(K, 5, generator=gen),  # gemm_scatter_add_ weight: [len(idx), in]
        xs=torch.randn(T, 5, generator=gen),  # gemm_scatter_add_ input
    )


# One call per op, with one argument replaced: run(t, **override).
def call(op, t, **o):
    a = {**t, **o}
    if op == "rms_norm_gather":
        return ops.rms_norm_gather(a["x"], a["w"], a["idx"], 1e-5)
    if op == "layer_norm_gather":
        return ops.layer_norm_gather(a["x"], a["w"], a["b"], a["idx"], 1e-5)
    if op == "index_select_gemm":
        return ops.index_select_gemm(a["x"], a["idx"], a["wl"], a["bl"])
    if op == "scatter_add_":
        return ops.scatter_add_(a["x"], a["idx"], a["y"])
    if op == "gemm_scatter_add_":
        return ops.gemm_scatter_add_(a["x"], a["idx"], a["xs"], a["wo"], None)
    raise AssertionError(op)


ALL_OPS = ["rms_norm_gather", "layer_norm_gather", "index_select_gemm", "scatter_add_", "gemm_scatter_add_"]
SCATTER_OPS = ["scatter_add_", "gemm_scatter_add_"]


@pytest.mark.parametrize("op", ALL_OPS)
def test_valid_arguments_pass(op, t):
    """The fixture is valid, so every failure below is due to the one bad argument."""
    call(op, t)


# ---- idx ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("bad", [D, D + 100, -1])
def test_idx_out_of_range(op, bad, t):
    with pytest.raises(IndexError, match=rf"dip_ext\.{op}: idx\[1\] = {bad} is out of range .* size {D}"):
        call(op, t, idx=torch.tensor([0, bad, 2]))


@pytest.mark.parametrize("op", ALL_OPS)
def test_idx_float(op, t):
    with pytest.raises(TypeError, match=rf"dip_ext\.{op}: idx must be int64 or int32, got Float"):
        call(op, t, idx=t["idx"].float())


@pytest.mark.parametrize("op", ALL_OPS)
def test_idx_bool_or_int16(op, t):
    with pytest.raises(TypeError, match=rf"dip_ext\.{op}: idx must be int64 or int32"):
        call(op, t, idx=t["idx"].short())


@pytest.mark.parametrize("op", ALL_OPS)
def test_idx_2d(op, t):
    with pytest.raises(ValueError, match=rf"dip_ext\.{op}: idx must be 1-D, got shape \[1, 3\]"):
        call(op, t, idx=t["idx"][None])


@pytest.mark.parametrize("op", SCATTER_OPS)
def test_duplicate_idx_in_scatter(op, t):
    with pytest.raises(ValueError, match=rf"dip_ext\.{op}: idx has duplicate index 1"):
        call(op, t, idx=torch.tensor([1, 4, 1]))


@pytest.mark.parametrize("op", SCATTER_OPS)
def test_failed_scatter_leaves_residual_untouched(op, t):
    x = t["x"].clone()
    with pytest.raises(ValueError):
        call(op, t, x=x, idx=torch.tensor([1, 4, 1]))
    assert torch.equal(x, t["x"])


def test_duplicate_idx_allowed_in_gathers(t):
    """A gather may repeat a column (it is only a scatter that needs unique indices)."""
    idx = torch.tensor([2, 2, 5])
    out = ops.rms_norm_gather(t["x"], t["w"], idx, 1e-5)
    assert torch.equal(out[:, 0], out[:, 1])


# ---- weights, bias, shapes ------------------------------------------------------------------------------

def test_index_select_gemm_weight_columns_ne_len_idx(t):
    with pytest.raises(ValueError, match=r"dip_ext\.index_select_gemm: weight has 4 columns but the input has 3"):
        call("index_select_gemm", t, wl=torch.randn(5, 4))


def test_index_select_gemm_weight_not_2d(t):
    with pytest.raises(ValueError, match=r"dip_ext\.index_select_gemm: weight must be 2-D"):
        call("index_select_gemm", t, wl=torch.randn(5 * K))


def test_index_select_gemm_bias_wrong_size(t):
    with pytest.raises(ValueError, match=r"dip_ext\.index_select_gemm: bias must have shape \[5\], got \[4\]"):
        call("index_select_gemm", t, bl=torch.randn(4))


def test_gemm_scatter_add_weight_rows_ne_len_idx(t):
    with pytest.raises(ValueError, match=r"dip_ext\.gemm_scatter_add_: weight has 4 rows \(outputs\) but idx has 3"):
        call("gemm_scatter_add_", t, wo=torch.randn(4, 5))


def test_gemm_scatter_add_weight_columns_ne_x_width(t):
    with pytest.raises(ValueError, match=r"dip_ext\.gemm_scatter_add_: weight has 6 columns but the input has 5"):
        call("gemm_scatter_add_", t, wo=torch.randn(K, 6))


def test_scatter_add_y_width_ne_len_idx(t):
    with pytest.raises(ValueError, match=r"dip_ext\.scatter_add_: y has 2 columns but idx has 3 entries"):
        call("scatter_add_", t, y=torch.randn(T, 2))


@pytest.mark.parametrize("op,name,shape", [("scatter_add_", "y", (T + 1, K)), ("gemm_scatter_add_", "x", (2, 5)),
                                           ("scatter_add_", "y", (1, T, K))])
def test_residual_row_count_mismatch(op, name, shape, t):
    with pytest.raises(ValueError, match=rf"dip_ext\.{op}: {name} has shape .* but residual has shape .*leading"):
        call(op, t, **{"y" if name == "y" else "xs": torch.randn(shape)})


@pytest.mark.parametrize("op", ["rms_norm_gather", "layer_norm_gather"])
@pytest.mark.parametrize("size", [D - 1, D + 1])
def test_norm_weight_wrong_size(op, size, t):
    with pytest.raises(ValueError, match=rf"dip_ext\.{op}: weight must have shape \[{D}\], got \[{size}\]"):
        call(op, t, w=torch.randn(size))


def test_norm_weight_2d(t):
    with pytest.raises(ValueError, match=rf"dip_ext\.rms_norm_gather: weight must have shape \[{D}\]"):
        call("rms_norm_gather", t, w=torch.randn(1, D))


def test_layer_norm_bias_wrong_size(t):
    with pytest.raises(ValueError, match=rf"dip_ext\.layer_norm_gather: bias must have shape \[{D}\], got \[3\]"):
        call("layer_norm_gather", t, b=torch.randn(3))


def test_negative_eps(t):
    with pytest.raises(ValueError, match=r"dip_ext\.rms_norm_gather: eps must be >= 0"):
        ops.rms_norm_gather(t["x"], t["w"], t["idx"], -1.0)


# ---- x: rank and dtype ----------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("shape", [(D,), (1, 1, T, D)])
def test_x_rank(op, shape, t):
    name = "residual" if op in SCATTER_OPS else "x"
    with pytest.raises(ValueError, match=rf"dip_ext\.{op}: {name} must have 2 dims .* or 3 dims"):
        call(op, t, x=torch.randn(shape))


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool])
def test_x_bad_dtype(op, dtype, t):
    name = "residual" if op in SCATTER_OPS else "x"
    with pytest.raises(TypeError, match=rf"dip_ext\.{op}: {name} must be float32, float16 or bfloat16"):
        call(op, t, x=t["x"].to(dtype))


@pytest.mark.parametrize("op,arg,name", [
    ("rms_norm_gather", "w", "weight"), ("layer_norm_gather", "w", "weight"), ("layer_norm_gather", "b", "bias"),
    ("index_select_gemm", "wl", "weight"), ("index_select_gemm", "bl", "bias"),
    ("scatter_add_", "y", "y"), ("gemm_scatter_add_", "xs", "x"), ("gemm_scatter_add_", "wo", "weight"),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_mismatch(op, arg, name, dtype, t):
    # a float64 activation is refused for its own dtype before the pair is compared
    with pytest.raises(TypeError, match=rf"dip_ext\.{op}: .*{name}.* (must have the same dtype|must be float32)"):
        call(op, t, **{arg: t[arg].to(dtype)})


# ---- device mismatch (the 'meta' device stands in for a second device) -----------------------------------

@pytest.mark.parametrize("op,arg,name", [
    ("rms_norm_gather", "w", "weight"), ("rms_norm_gather", "idx", "idx"), ("layer_norm_gather", "b", "bias"),
    ("index_select_gemm", "wl", "weight"), ("index_select_gemm", "idx", "idx"), ("scatter_add_", "y", "y"),
    ("gemm_scatter_add_", "wo", "weight"), ("gemm_scatter_add_", "xs", "x"),
])
def test_device_mismatch(op, arg, name, t):
    with pytest.raises(ValueError, match=rf"dip_ext\.{op}: .*{name} is on meta but .* is on cpu"):
        call(op, t, **{arg: t[arg].to("meta")})


def test_calibration_stats_device_mismatch(t):
    s = ops.CalibrationStats.empty(D, device="meta")
    with pytest.raises(ValueError, match=r"dip_ext\.calibration_stats_: sum is on meta but x is on cpu"):
        ops.calibration_stats(t["x"], s)


# ---- calibration statistics -----------------------------------------------------------------------------

def test_calibration_stats_different_width(t):
    s = ops.calibration_stats(t["x"])
    with pytest.raises(ValueError, match=rf"dip_ext\.calibration_stats: the statistics have width {D} but x has "
                                         r"width 5"):
        ops.calibration_stats(torch.randn(3, 5), s)
    assert s.count == T  # the failed call did not count its rows


def test_calibration_stats_merge_different_width(t):
    with pytest.raises(ValueError, match=r"CalibrationStats\.merge: widths differ \(8 vs 5\)"):
        ops.calibration_stats(t["x"]).merge(ops.calibration_stats(torch.randn(3, 5)))


def test_calibration_stats_merge_gram_and_no_gram(t):
    with pytest.raises(ValueError, match=r"CalibrationStats\.merge: one object has a gram matrix"):
        ops.calibration_stats(t["x"], gram=True).merge(ops.calibration_stats(t["x"]))


@pytest.mark.parametrize("shape", [(D,), (1, 1, T, D)])
def test_calibration_stats_rank(shape):
    with pytest.raises(ValueError, match=r"dip_ext\.calibration_stats: x must have 2 or 3 dims"):
        ops.calibration_stats(torch.randn(shape))


def test_calibration_stats_integer_x():
    with pytest.raises(TypeError, match=r"dip_ext\.calibration_stats_: x must be float32, float16 or bfloat16"):
        ops.calibration_stats(torch.ones(3, D, dtype=torch.int64))


def test_calibration_stats_not_a_tensor():
    with pytest.raises(TypeError, match=r"dip_ext\.calibration_stats: x must be a tensor, got list"):
        ops.calibration_stats([[1.0, 2.0]])


def test_calibration_stats_raw_op_bad_buffers(t):
    """The raw op checks its buffers too (the Python face cannot be bypassed into a crash)."""
    f32 = torch.zeros(D)
    f64 = torch.zeros(D, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"dip_ext\.calibration_stats_: sum must be float64"):
        torch.ops.dip_ext.calibration_stats_(t["x"], f32, f64, None)
    with pytest.raises(ValueError, match=r"dip_ext\.calibration_stats_: the statistics have width 7"):
        torch.ops.dip_ext.calibration_stats_(t["x"], f64[:7], f64, None)
    with pytest.raises(ValueError, match=rf"dip_ext\.calibration_stats_: gram must have shape \[{D}, {D}\]"):
        torch.ops.dip_ext.calibration_stats_(t["x"], f64, f64.clone(), torch.zeros(D, 3, dtype=torch.float64))


# ---- overlapping memory (the in-place ops refuse it, like torch's index_add_) ------------------------------

def test_expanded_residual_refused(t):
    """A stride-0 residual: every row is the same memory, so a row-parallel update would race / add T times."""
    residual = torch.zeros(1, D).expand(T, D)
    with pytest.raises(ValueError, match=r"dip_ext\.scatter_add_: residual has elements that share memory "
                                         r"\(stride 0, e\.g\. an expand\(\)ed tensor"):
        ops.scatter_add_(residual, t["idx"], t["y"])
    with pytest.raises(ValueError, match=r"dip_ext\.gemm_scatter_add_: residual has elements that share memory"):
        ops.gemm_scatter_add_(residual, t["idx"], t["xs"], t["wo"])
    assert residual.abs().sum() == 0


@pytest.mark.parametrize("alias", ["same", "view", "partial", "strided"])
def test_y_sharing_memory_with_residual_refused(alias, t):
    x = t["x"].clone()
    before = x.clone()
    idx, y = {
        "same": (torch.arange(D), lambda r: r),                         # y is residual
        "view": (t["idx"], lambda r: r[:, :K]),                         # y is a column slice of residual
        "partial": (t["idx"], lambda r: r.view(-1)[2:2 + T * K].view(T, K)),  # overlapping flat range
        "strided": (t["idx"], lambda r: r.t()[:K].t()),                  # a transposed view of a slice
    }[alias]
    with pytest.raises(ValueError, match=r"dip_ext\.scatter_add_: y shares memory with residual, which the op "
                                         r"writes in place .* pass y\.clone\(\)"):
        ops.scatter_add_(x, idx, y(x))
    assert torch.equal(x, before)


@pytest.mark.parametrize("arg,name", [("xs", "x"), ("wo", "weight"), ("bias", "bias")])
def test_gemm_scatter_inputs_sharing_memory_with_residual_refused(arg, name):
    residual = torch.randn(K, D)  # K rows, so [K, 5] and [K] views of it fit as weight / bias
    x, w, b = torch.randn(K, 5), torch.randn(K, 5), torch.randn(K)
    aliases = {"xs": dict(x=residual[:, :5]), "wo": dict(w=residual[:, 1:6]), "bias": dict(b=residual[1, :K])}
    a = {"x": x, "w": w, "b": b, **aliases[arg]}
    before = residual.clone()
    with pytest.raises(ValueError, match=rf"dip_ext\.gemm_scatter_add_: {name} shares memory with residual"):
        ops.gemm_scatter_add_(residual, torch.tensor([6, 1, 3]), a["x"], a["w"], a["b"])
    assert torch.equal(residual, before)


def test_disjoint_views_of_one_buffer_allowed():
    """Views of one buffer that torch can prove disjoint (two halves) are fine."""
    buf = torch.zeros(2 * T * D)
    residual, y = buf[:T * D].view(T, D), buf[T * D:T * D + T * K].view(T, K)
    y.fill_(1.0)
    ops.scatter_add_(residual, torch.tensor([6, 1, 3]), y)
    assert residual[:, [6, 1, 3]].eq(1.0).all() and residual.sum() == T * K


def test_calibration_stats_outputs_sharing_memory_refused(t):
    s = torch.zeros(D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dip_ext\.calibration_stats_: sumsq shares memory with sum"):
        torch.ops.dip_ext.calibration_stats_(t["x"], s, s, None)
    gram = torch.zeros(D, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dip_ext\.calibration_stats_: sum shares memory with gram"):
        torch.ops.dip_ext.calibration_stats_(t["x"], gram[0], torch.zeros(D, dtype=torch.float64), gram)
    with pytest.raises(ValueError, match=r"dip_ext\.calibration_stats_: gram has elements that share memory"):
        torch.ops.dip_ext.calibration_stats_(t["x"], s, s.clone(), torch.zeros(1, D, dtype=torch.float64).expand(D, D))
    assert s.abs().sum() == 0 and gram.abs().sum() == 0
