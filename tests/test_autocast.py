"""Mixed precision: compacted models and the dip_ext ops under ``torch.autocast`` behave as the dense model
and torch's own ops do.

Ops: each op's result under autocast equals its torch equivalent's under autocast (index_select_gemm runs in
the autocast dtype like ``F.linear``; the in-place scatter ops write into the residual in the residual's
dtype; the norms and the calibration statistics are not cast), with the op's own argument errors, and under
``torch.compile``. Models, for every family: forward and ``generate`` without grad, backward and a training
step with grad, against the masked dense reference under the same autocast (the same dtypes, close values),
HF ``Trainer(bf16=True)`` training then evaluating, and ``torch.compile``. Tiny random configs (those of
test_families_hf), fp32 weights, bf16 autocast on the CPU; the op rules also with fp16, and on CUDA (skipped
without a device).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close
from test_families_hf import FAMILY_MODELS, VOCAB, compacted_pair

import dip_ext
from dip_ext import ops

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated",
                                        "ignore:Initializing zero-element tensors is a no-op")

BF16 = torch.bfloat16
FAMILIES = list(FAMILY_MODELS)
# loose bf16 tolerances (8 significant bits: 2^-9 = 2e-3 relative rounding, a few times through 4 layers and
# the logits). Most families match their masked reference exactly, but a compacted model may round where the
# reference does not (Phi's dense block sums its two bf16 block outputs before adding them to the fp32 stream,
# the compacted one adds each), and the fp32 model rounds nowhere
BF16_VS_REFERENCE, BF16_VS_FP32 = 2e-2, 5e-2


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def autocast(device: str = "cpu", dtype: torch.dtype = BF16):
    return torch.autocast(device, dtype=dtype)


def token_ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB - 1, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- the ops: each follows its torch equivalent under autocast ------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
LOW = [torch.bfloat16, torch.float16]


def _inputs(device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return dict(x=randn(2, 5, 24), residual=randn(2, 5, 24), w_norm=randn(24).abs() + 0.5, b_norm=randn(24),
                idx_in=torch.tensor([0, 3, 4, 9, 11, 17, 23], device=device),
                idx_out=torch.tensor([1, 2, 10, 20], device=device), w_in=randn(6, 7), b_in=randn(6),
                w_out=randn(4, 6), b_out=randn(4), randn=randn)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
def test_norm_gathers_are_not_cast(device, low):
    t = _inputs(device)
    x, w, b, idx = t["x"], t["w_norm"], t["b_norm"], t["idx_in"]
    for dt in (torch.float32, low):  # an fp32 residual stream, and a model held in the lower precision
        xx, ww, bb = x.to(dt), w.to(dt), b.to(dt)
        with torch.no_grad():
            expected = (ops.rms_norm_gather(xx, ww, idx, 1e-6), ops.layer_norm_gather(xx, ww, bb, idx, 1e-5))
            with autocast(device, low):
                got = (ops.rms_norm_gather(xx, ww, idx, 1e-6), ops.layer_norm_gather(xx, ww, bb, idx, 1e-5))
        for a, e in zip(got, expected):
            assert a.dtype == dt
            assert torch.equal(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
def test_index_select_gemm_runs_in_the_autocast_dtype_like_linear(device, low):
    t = _inputs(device)
    x, idx, w, b = t["x"], t["idx_in"], t["w_in"], t["b_in"]
    with autocast(device, low):
        expected = F.linear(x.index_select(-1, idx), w, b)
        for rows in (x, x[:1, :1]):  # many tokens (GEMM) and one (CUDA's GEMV path): the same rule
            got = ops.index_select_gemm(rows, idx, w, b)
            assert got.dtype == expected.dtype == low
            torch.testing.assert_close(got.float(), expected[:rows.shape[0], :rows.shape[1]].float(),
                                       rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
def test_scatter_add_writes_in_the_residual_dtype(device, low):
    t = _inputs(device)
    residual, idx, y = t["residual"], t["idx_out"], t["randn"](2, 5, 4).to(low)
    expected = residual.clone().index_add_(-1, idx, y.float())  # `residual + y` promotes to fp32
    with autocast(device, low):
        out = ops.scatter_add_(residual, idx, y)
    assert out is residual and out.dtype == torch.float32
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
def test_gemm_scatter_add_runs_the_gemm_in_the_autocast_dtype(device, low):
    t = _inputs(device)
    x, idx, w, b = t["randn"](2, 5, 6), t["idx_out"], t["w_out"], t["b_out"]
    # an fp32 residual (the GEMM's output cast up into it) and one in the lower precision (the fused kernel)
    for residual in (t["residual"], t["residual"].to(low)):
        with autocast(device, low):
            y = F.linear(x, w, b)
            expected = residual.clone().index_add_(-1, idx, y.to(residual.dtype))
            before = residual.clone()
            out = ops.gemm_scatter_add_(residual, idx, x, w, b)
        assert out is residual and out.dtype == before.dtype
        torch.testing.assert_close(out.float(), expected.float(), rtol=1.6e-2, atol=2e-2)
        untouched = torch.ones(24, dtype=torch.bool, device=device)
        untouched[idx] = False
        assert torch.equal(out[..., untouched], before[..., untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_scatter_add_rounds_like_the_dense_norm_then_adds_in_the_residual_dtype(device, low,
                                                                                         unit_offset):
    t = _inputs(device)
    residual, idx, w = t["residual"], t["idx_out"], t["w_norm"]
    y = t["randn"](2, 5, 4).to(low)  # a block's output under autocast
    # Gemma's dense norm: fp32 statistics and scale, the result in y's dtype; then `residual + ...` promotes
    yf = y.float()
    rstd = torch.rsqrt(yf.pow(2).sum(-1, keepdim=True) / residual.shape[-1] + 1e-6)
    scale = w.index_select(0, idx) + (1.0 if unit_offset else 0.0)
    expected = residual.clone().index_add_(-1, idx, (yf * rstd * scale).to(low).float())
    with autocast(device, low):
        out = ops.rms_norm_scatter_add_(residual, idx, y, w, 1e-6, unit_offset=unit_offset)
    assert out is residual and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # all in the lower precision: the fused kernel, as without autocast
    r, wl = t["residual"].to(low), w.to(low)
    expected = ops.rms_norm_scatter_add_(r.clone(), idx, y, wl, 1e-6, unit_offset=unit_offset)
    with autocast(device, low):
        assert torch.equal(ops.rms_norm_scatter_add_(r, idx, y, wl, 1e-6, unit_offset=unit_offset), expected)


def test_argument_errors_under_autocast_are_the_ops_own():
    """The rules that run an op as two steps (an fp32 residual, a bf16 block output) still check its arguments
    in its kernel, before anything is written: the op's own errors, naming it."""
    t = _inputs("cpu")
    residual, idx, x, w = t["residual"], t["idx_out"], t["randn"](2, 5, 6), t["w_out"]
    y = t["randn"](2, 5, 4).to(BF16)
    bad_idx = torch.tensor([1, 2, 10, 24])
    calls = [
        (ValueError, "gemm_scatter_add_: weight has 3 rows",
         lambda: ops.gemm_scatter_add_(residual, idx, x, w[:3])),
        (IndexError, "gemm_scatter_add_: idx", lambda: ops.gemm_scatter_add_(residual, bad_idx, x, w)),
        (ValueError, "rms_norm_scatter_add_: weight must have shape",
         lambda: ops.rms_norm_scatter_add_(residual, idx, y, t["w_norm"][:20], 1e-6)),
        (IndexError, "rms_norm_scatter_add_: idx", lambda: ops.rms_norm_scatter_add_(residual, bad_idx, y,
                                                                                       t["w_norm"], 1e-6)),
        (ValueError, "scatter_add_: y has 3 columns", lambda: ops.scatter_add_(residual, idx, y[..., :3])),
        (TypeError, "scatter_add_: y must be float32", lambda: ops.scatter_add_(residual, idx, y.double())),
    ]
    for error, message, call in calls:
        before = residual.clone()
        with autocast(), pytest.raises(error, match=message):
            call()
        assert torch.equal(residual, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
def test_calibration_stats_ignore_autocast(device, low):
    x = _inputs(device)["x"]
    expected = ops.calibration_stats(x, gram=True)
    with autocast(device, low):
        got = ops.calibration_stats(x, gram=True)
    for name in ("sum", "sumsq", "gram"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def _block(x, w_norm, idx_in, w_in, idx_out, w_out):
    """A tiny DISP sub-block through the ops (test_ops.py's compile test, plus rms_norm_scatter_add_)."""
    h = ops.rms_norm_gather(x, w_norm, idx_in, 1e-5, check_idx=False)
    h = ops.index_select_gemm(h, torch.arange(h.shape[-1]), w_in, check_idx=False)
    r = x.clone()
    ops.gemm_scatter_add_(r, idx_out, torch.relu(h), w_out, check_idx=False)
    ops.rms_norm_scatter_add_(r, idx_out, h[..., :idx_out.numel()], w_norm, 1e-5, check_idx=False)
    return ops.scatter_add_(r, idx_out, h[..., -idx_out.numel():], check_idx=False)


def test_ops_under_autocast_compile_fullgraph():
    t = _inputs("cpu")
    args = (t["x"], t["w_norm"], t["idx_in"], t["w_in"][:, :7], t["idx_out"], t["w_out"])
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), autocast():
        expected = _block(*args)
        got = compiled(*args)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected)


# ---- compacted models of every family ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_forward_without_grad_matches_masked_dense(family):
    dense, masks, compacted = compacted_pair(family)
    ids = token_ids()
    with torch.no_grad():
        fp32 = compacted(ids).logits
        with autocast():
            with dip_ext.apply_masks(dense, masks):
                ref = dense(ids, output_hidden_states=True)
            out = compacted(ids, output_hidden_states=True)
    assert out.logits.dtype == ref.logits.dtype == BF16  # the lm_head is a linear: it runs in bf16
    # the residual stream stays fp32, as the dense model's (`residual + block(x)` promotes)
    assert [h.dtype for h in out.hidden_states] == [h.dtype for h in ref.hidden_states]
    assert_rel_close(out.logits.float(), ref.logits.float(), BF16_VS_REFERENCE)
    assert_rel_close(out.logits.float(), fp32, BF16_VS_FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_masked_dense(family):
    dense, masks, compacted = compacted_pair(family)
    ids = token_ids(1, 4)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, use_cache=True,
              pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), autocast():
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(ids, **kw)
        out = compacted.generate(ids, **kw)
    assert out.sequences.shape == ref.sequences.shape == (1, 8)
    assert [t.dtype for t in out.logits] == [t.dtype for t in ref.logits]
    # the prefill reads the same prompt; later steps may pick another token where two logits are within bf16
    assert_rel_close(out.logits[0].float(), ref.logits[0].float(), BF16_VS_REFERENCE)


def _loss_and_grads(model, ids, masks=None):
    model.zero_grad(set_to_none=True)
    with autocast():
        if masks is None:
            loss = model(ids, labels=ids).loss
        else:
            with dip_ext.apply_masks(model, masks):
                loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_matches_masked_dense_and_a_training_step_works(family):
    dense, masks, compacted = compacted_pair(family)
    ids = token_ids()
    # with grad in eval mode (no dropout): the differentiable path, against the masked reference
    ref = _loss_and_grads(dense, ids, masks)
    loss = _loss_and_grads(compacted, ids)
    assert loss.dtype == ref.dtype
    assert abs(float(loss) - float(ref)) <= BF16_VS_REFERENCE * float(ref)
    params = [(n, p) for n, p in compacted.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in params)
    for n, p in params:
        assert p.grad.dtype == p.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all(), n
    # a training step in training mode (the families' dropouts live)
    compacted.train()
    opt = torch.optim.SGD(compacted.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in params}
    loss = _loss_and_grads(compacted, ids)
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, before[n]) for n, p in params)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for _, p in params)
    # and evaluation without grad afterwards, as Trainer.evaluate does
    compacted.eval()
    with torch.no_grad(), autocast():
        assert torch.isfinite(compacted(ids, labels=ids).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_trainer_bf16_trains_then_evaluates(tmp_path, family):
    from transformers import Trainer, TrainingArguments

    _, _, compacted = compacted_pair(family)
    rows = [{"input_ids": ids, "labels": ids} for ids in token_ids(8, 6, seed=1)]
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=2,
                             per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no",
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=compacted, args=args, train_dataset=rows, eval_dataset=rows)
    trainer.train()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])  # rms_norm / rms_norm_scatter_add / layer_norm
def test_compiled_model_under_autocast_matches_eager(family):
    _, _, compacted = compacted_pair(family)
    ids = token_ids()
    torch._dynamo.reset()
    compiled = torch.compile(compacted, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), autocast():
        expected = compacted(ids).logits
        got = compiled(ids).logits
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected)
