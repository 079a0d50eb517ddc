"""The CUDA kernel of ``ops.rms_norm_scatter_add_`` against the independent plain-torch reference (skipped without
a CUDA device): every dtype, 2-D and 3-D, row-strided / transposed residuals and outputs, empty / full / unsorted
index sets, rows wider than a block, bad input on the device, and capture of the unchecked call in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from dip_ext import ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference(residual, idx, y, weight, eps, unit_offset):
    """On the CPU, from clones: y zero-padded to d, normalised over d in fp32, scaled, rounded, index-added."""
    r, y, w, idx = residual.cpu().clone(), y.cpu().clone(), weight.cpu().clone(), idx.cpu().clone().long()
    full = torch.zeros((*y.shape[:-1], r.shape[-1]), dtype=torch.float32)
    full[..., idx] = y.float()
    normed = (full * torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + eps) * (w.float() + float(unit_offset)))
    return r.index_add_(-1, idx, normed[..., idx].to(y.dtype))


def make(shape, dtype, layout, g):
    if layout == "contiguous":
        return torch.randn(shape, generator=g).to("cuda", dtype)
    if layout == "strided":  # row stride d + 3
        return torch.randn((*shape[:-1], shape[-1] + 3), generator=g).to("cuda", dtype)[..., :shape[-1]]
    return torch.randn(tuple(reversed(shape)), generator=g).to("cuda", dtype).permute(*reversed(range(len(shape))))


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 9), (300,), (0,)], ids=str)
@pytest.mark.parametrize("kind", ["sorted", "unsorted", "empty", "full"])
@pytest.mark.parametrize("d", [640, 37, 4096])
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("strided", "transposed"),
                                     ("transposed", "strided")])
def test_matches_reference(dtype, lead, kind, d, layouts):
    g = torch.Generator().manual_seed(d + len(lead))
    k = {"empty": 0, "full": d}.get(kind, (3 * d) // 5)
    idx = torch.randperm(d, generator=g)[:k]
    idx = (idx.sort().values if kind != "unsorted" else idx).to("cuda")
    residual = make((*lead, d), dtype, layouts[0], g)
    y = make((*lead, k), dtype, layouts[1], g) * 3
    weight = (torch.rand(d, generator=g) - 0.5).to("cuda", dtype)
    for unit_offset in (True, False):
        expected = reference(residual, idx, y, weight, 1e-6, unit_offset)
        before = residual.clone()
        ops.rms_norm_scatter_add_(residual, idx, y, weight, 1e-6, unit_offset=unit_offset)
        torch.testing.assert_close(residual.cpu(), expected, atol=TOL[dtype], rtol=TOL[dtype])
        residual.copy_(before)


def test_bad_input_on_cuda():
    r, y, w = torch.randn(4, 8, device="cuda"), torch.randn(4, 3, device="cuda"), torch.randn(8, device="cuda")
    with pytest.raises(ValueError, match="idx has duplicate index 1"):
        ops.rms_norm_scatter_add_(r, torch.tensor([1, 4, 1], device="cuda"), y, w, 1e-6)
    with pytest.raises(ValueError, match="weight is on cpu but residual is on cuda"):
        ops.rms_norm_scatter_add_(r, torch.tensor([1, 4, 5], device="cuda"), y, w.cpu(), 1e-6)
    with pytest.raises(IndexError, match=r"idx\[2\] = 8 is out of range"):
        ops.rms_norm_scatter_add_(r, torch.tensor([1, 4, 8], device="cuda"), y, w, 1e-6)


def test_unchecked_call_captures_in_a_cuda_graph():
    g = torch.Generator().manual_seed(0)
    r, y = torch.randn(16, 640, generator=g).cuda(), torch.randn(16, 320, generator=g).cuda()
    w, idx = torch.randn(640, generator=g).cuda(), torch.randperm(640, generator=g)[:320].sort().values.cuda()
    expected = reference(r, idx, y, w, 1e-6, True)
    static = r.clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ops.rms_norm_scatter_add_(static.clone(), idx, y, w, 1e-6, unit_offset=True, check_idx=False)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.rms_norm_scatter_add_(static, idx, y, w, 1e-6, unit_offset=True, check_idx=False)
    static.copy_(r)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static.cpu(), expected, atol=2e-5, rtol=2e-5)
