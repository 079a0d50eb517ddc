"""dip_ext.selftest: every op against its plain-torch reference on one device, as a typed result.

The CPU run is the CI check; the CUDA run is skipped without a GPU. Each broken-op test swaps one op of
dip_ext.ops for a wrong one and checks that the self-test notices (a self-test that cannot fail checks nothing).
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from dip_ext import ops

# The module, whatever dip_ext's top level binds the name `selftest` to (the package exports the function).
st = importlib.import_module("dip_ext.selftest")

OPS = {"rms_norm_gather", "layer_norm_gather", "index_select_gemm", "scatter_add_", "gemm_scatter_add_",
       "calibration_stats"}


@pytest.fixture(scope="module")
def cpu_result():
    return st.selftest("cpu")


def test_cpu_selftest_passes(cpu_result):
    r = cpu_result
    assert isinstance(r, st.SelftestResult) and all(isinstance(c, st.CaseResult) for c in r.cases)
    assert r.ok, r.table()
    assert r.failures == []
    assert {c.op for c in r.cases} == OPS
    assert {c.dtype for c in r.cases} == {"float32", "float16", "bfloat16"}
    assert all(c.passed and c.error is None and c.ratio <= 1.0 for c in r.cases)
    assert r.device == "cpu" and r.build_info["version"]


def test_table_lists_every_case(cpu_result):
    table = cpu_result.table()
    lines = table.splitlines()
    n = len(cpu_result.cases)
    assert lines[0].startswith("dip_ext selftest on cpu") and f"{n}/{n} passed" in lines[0]
    assert len(lines) == 2 + len(cpu_result.cases)
    assert all(line.rstrip().endswith("PASS") for line in lines[2:])
    assert set(cpu_result.to_dict()) >= {"device", "ok", "cases", "build_info"}


def _broken_scatter(residual, idx, y, *, check_idx=True):
    """Adds y twice: what a kernel racing on itself, or a test comparing with an aliased reference, hides."""
    torch.ops.dip_ext.scatter_add_(residual, idx, y, check_idx)
    torch.ops.dip_ext.scatter_add_(residual, idx, y.clone(), check_idx)
    return residual


def _broken_norm(x, weight, idx, eps, *, check_idx=True):
    """Statistics over the kept columns only (the classic DISP mistake)."""
    xs = x[..., idx.long()].float()
    y = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps) * weight[idx.long()].float()
    return y.to(x.dtype)


def _broken_gemm(x, idx, weight, bias=None, *, check_idx=True):
    """Drops the bias."""
    return torch.ops.dip_ext.index_select_gemm(x, idx, weight, None, check_idx)


_calibration_stats = ops.calibration_stats


def _broken_stats(x, stats=None, gram=False):
    """Counts every row twice."""
    out = _calibration_stats(x, stats, gram)
    out.count += x.numel() // x.shape[-1]
    return out


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32's 10 mantissa bits (round to nearest), as cuBLAS does with TF32 enabled."""
    i = x.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _stats_with_tf32_gram(x, stats=None, gram=False):
    """The Gram matrix of TF32-rounded inputs: the precision loss the op must not have."""
    out = _calibration_stats(x, stats, gram)
    if out.gram is not None:
        t = _tf32(x.reshape(-1, x.shape[-1])).double()
        out.gram.copy_(t.T @ t)
    return out


@pytest.mark.parametrize("name,broken", [("scatter_add_", _broken_scatter), ("rms_norm_gather", _broken_norm),
                                         ("index_select_gemm", _broken_gemm),
                                         ("calibration_stats", _broken_stats),
                                         ("calibration_stats", _stats_with_tf32_gram)])
def test_a_broken_op_fails_the_selftest(monkeypatch, name, broken):
    monkeypatch.setattr(ops, name, broken)
    r = st.selftest("cpu", dtypes=(torch.float32,))
    assert not r.ok
    failed = {c.op for c in r.failures}
    assert failed == {name}, r.table()
    assert "FAIL" in r.table()


def test_an_op_that_raises_is_a_failed_case_not_an_exception(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("dip_ext.gemm_scatter_add_: no kernel for the GPU")
    monkeypatch.setattr(ops, "gemm_scatter_add_", boom)
    r = st.selftest("cpu", dtypes=(torch.bfloat16,))
    bad = r.failures
    assert bad and all(c.op == "gemm_scatter_add_" and "no kernel for the GPU" in c.error for c in bad)


def test_reference_helpers_catch_an_aliased_reference():
    """The mistake the helper exists for: for fp32, residual.float() IS residual, so a reference built from it
    is the op's own output."""
    residual = torch.randn(3, 8)
    aliased = residual.float()
    with pytest.raises(AssertionError, match="shares memory with the op's output"):
        st.assert_no_shared_storage(aliased, residual)
    with pytest.raises(AssertionError):
        st.assert_no_shared_storage(residual[:, 2:], residual)  # a view is no reference either
    st.assert_no_shared_storage(st.reference_copy(residual).float(), residual)
    st.assert_no_shared_storage(residual.half().float(), residual)  # a conversion copies


def test_bad_device():
    with pytest.raises(ValueError, match="unsupported device"):
        st.selftest("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_cuda_requested_without_a_gpu():
    with pytest.raises(ValueError, match="CUDA device requested"):
        st.selftest("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_selftest_passes():
    r = st.selftest("cuda")
    assert r.ok, r.table()
    assert r.device.startswith("cuda") and "sm_" in r.device_name


@pytest.mark.slow  # a fresh interpreter importing torch
def test_module_entry_point(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dip_ext.selftest", "cpu"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "passed" in p.stdout.splitlines()[0]
