"""The shared test helpers that decide whether a test can fail: assert_independent catches a reference that
shares memory with an in-place op's output, assert_rel_close fails past its tolerance, and random_masks keeps
the other layers' sets when layers are emptied or kept whole."""

import pytest
import torch
from helpers import assert_independent, assert_rel_close, random_masks

from dip_ext import STRUCTURES, ModelDims


@pytest.mark.parametrize("shares", [
    lambda x: x.float(),            # .float() of an fp32 tensor is the tensor itself
    lambda x: x,
    lambda x: x[1:],                # a view
    lambda x: x.view(-1),
    lambda x: x.T,
    lambda x: x.detach(),
    lambda x: x.to(torch.float32),
    lambda x: x[:, 2],              # a strided view
], ids=["float-of-fp32", "same", "slice", "view", "transpose", "detach", "to-same-dtype", "column"])
def test_assert_independent_catches_shared_storage(shares):
    x = torch.randn(4, 3)
    with pytest.raises(AssertionError, match="shares storage"):
        assert_independent(shares(x), x)
    with pytest.raises(AssertionError, match="shares storage"):
        assert_independent(x, shares(x))  # either argument order


@pytest.mark.parametrize("copies", [lambda x: x.clone(), lambda x: x.double(), lambda x: x.half().float(),
                                    lambda x: torch.randn(4, 3)], ids=["clone", "double", "round-trip", "other"])
def test_assert_independent_passes_copies(copies):
    x = torch.randn(4, 3)
    assert_independent(copies(x), x)


def test_assert_independent_catches_a_reference_an_in_place_op_would_change():
    """The failure it exists for: the reference of an in-place add built with .float() moves with the output."""
    out = torch.zeros(5)
    reference = out.float()  # meant as a copy; it is ``out``
    out.add_(1.0)
    assert torch.equal(out, reference)  # the comparison a test would make passes whatever the op did
    with pytest.raises(AssertionError):
        assert_independent(reference, out)
    with pytest.raises(TypeError):
        assert_independent(out.tolist(), out)


def test_assert_rel_close_fails_past_its_tolerance():
    expected = torch.tensor([10.0, -2.0, 0.5])
    assert_rel_close(expected + 5e-5, expected)  # 5e-6 of the max: inside 1e-5
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(expected + 2e-4, expected)
    assert_rel_close(expected + 2e-4, expected, rtol=1e-4)


def test_random_masks_edits_touch_only_their_layers():
    dims = ModelDims(3, 16, 24)
    plain = random_masks(dims, seed=4)
    edited = random_masks(dims, seed=4, full=[0], empty={2: ["mlp_out", "attn_in"]})
    assert all(torch.equal(edited[0][s], torch.arange(dims.size(s))) for s in STRUCTURES)
    assert all(torch.equal(edited[1][s], plain[1][s]) for s in STRUCTURES)
    assert edited[2]["mlp_out"].numel() == edited[2]["attn_in"].numel() == 0
    assert torch.equal(edited[2]["attn_out"], plain[2]["attn_out"])
    assert 0 < plain[1]["mlp_mid"].numel() < dims.size("mlp_mid")
