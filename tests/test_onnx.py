"""ONNX export: :func:`dip_ext.export_onnx` of a compacted model of every family (Llama, Mistral, Qwen2, Qwen3,
Gemma3, OPT, Phi; attention removed in two layers, an MLP in one) run in onnxruntime computes the PyTorch model's
logits, for two batch / sequence shapes through one file (dynamic axes) and a left-padded batch; a dense model and
the ids-only signature too; bad arguments refused before any trace, a dip_ext op left in the trace refused; every
dip_ext op's torch equivalent (int64 and int32 index sets) equals the op and exports; the legacy TorchScript
exporter is refused in one line, while ``torch.jit.trace`` still holds.
Tiny random configs, fp32, CPU. Skipped only where onnxruntime is not installed."""

import copy

import pytest
import torch
from helpers import dims_of, hide_module, perturb_norms_and_biases, random_masks, tiny_llama
from test_families_hf import FAMILY_MODELS, REMOVED_ATTN, VOCAB, compacted_pair

import dip_ext
from dip_ext import LegacyOnnxExportError, ops
from dip_ext import onnx_export
from dip_ext.onnx_export import TORCH_EQUIVALENTS, TorchEquivalents

ort = pytest.importorskip("onnxruntime", reason="the ONNX tests run the exported files in onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated",
                                        "ignore:Initializing zero-element tensors is a no-op")

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def token_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB - 1, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run_onnx(path, ids: torch.Tensor, mask=None) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy()}
    if mask is not None:
        feed["attention_mask"] = mask.numpy()
    return torch.from_numpy(session.run(["logits"], feed)[0])


def torch_logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).logits


# ---- models: ONNX Runtime computes the PyTorch model ------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_compacted_model_runs_in_onnxruntime(tmp_path, family):
    _, masks, model = compacted_pair(family)
    assert all(masks.layers[i]["attn_out"].numel() == 0 for i in REMOVED_ATTN)
    assert masks.layers[2]["mlp_out"].numel() == 0
    path = dip_ext.export_onnx(model, tmp_path / "model.onnx", attention_mask=True)
    assert path == tmp_path / "model.onnx" and path.is_file()
    # two shapes through one file (neither the traced 2 x 8), then left padding
    for batch, seq in [(1, 5), (3, 11)]:
        ids = token_ids(batch, seq)
        mask = torch.ones_like(ids)
        torch.testing.assert_close(run_onnx(path, ids, mask), torch_logits(model, ids, mask), **TOL)
    ids = token_ids(3, 9, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    torch.testing.assert_close(run_onnx(path, ids, mask), torch_logits(model, ids, mask), **TOL)


def tiny_pair():
    """A 2-layer Llama (helpers.TINY_LLAMA) and its compaction: layer 0 without MLP, layer 1 without attention."""
    dense = perturb_norms_and_biases(tiny_llama(seed=3))
    masks = random_masks(dims_of(dense), 3, 0.6, empty={0: ["mlp_out"], 1: ["attn_out"]})
    return dense, dip_ext.compact(copy.deepcopy(dense), masks)


def test_dense_model_ids_only(tmp_path):
    """A dense model, token ids in, logits out, with the signature the docstring states: named dynamic dims,
    int64 ids, fp32 logits."""
    model = tiny_pair()[0]
    path = dip_ext.export_onnx(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [inp], [out] = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("input_ids", ["batch", "sequence"], "tensor(int64)")
    assert (out.name, out.shape, out.type) == ("logits", ["batch", "sequence", VOCAB], "tensor(float)")
    for batch, seq in [(1, 6), (4, 3)]:
        ids = token_ids(batch, seq, seed=2)
        torch.testing.assert_close(run_onnx(path, ids), torch_logits(model, ids), **TOL)
    assert dip_ext.export_onnx(model, path) == path  # its own files: replaced
    (tmp_path / "theirs.onnx.data").write_text("not dip_ext's")
    with pytest.raises(FileExistsError, match="theirs.onnx.data, which dip_ext did not write"):
        dip_ext.export_onnx(model, tmp_path / "theirs.onnx")
    assert not (tmp_path / "theirs.onnx").exists()
    assert (tmp_path / "theirs.onnx.data").read_text() == "not dip_ext's"


def test_compacted_model_ids_only_fixed_shapes(tmp_path):
    """The reported case (a compacted Llama, token ids in, logits out), with ``dynamic=False``; traced in eval
    mode, the model's own mode restored."""
    model = tiny_pair()[1].train()
    ids = token_ids(2, 5)
    path = dip_ext.export_onnx(model, tmp_path / "model.onnx", example_input_ids=ids, dynamic=False)
    assert model.training
    assert ort.InferenceSession(str(path)).get_inputs()[0].shape == [2, 5]
    torch.testing.assert_close(run_onnx(path, ids), torch_logits(model.eval(), ids), **TOL)


def test_refusals_before_any_trace(tmp_path, monkeypatch):
    model = tiny_pair()[1]
    with pytest.raises(ValueError, match="example_input_ids must be an int64 tensor"):
        dip_ext.export_onnx(model, tmp_path / "bad.onnx", example_input_ids=token_ids(2, 5).float())
    with pytest.raises(TypeError, match="must be a Hugging Face causal LM"):
        dip_ext.export_onnx(torch.nn.Linear(2, 2), tmp_path / "bad.onnx")
    hide_module(monkeypatch, "onnxscript")
    with pytest.raises(ImportError, match="pip install onnx onnxscript"):
        dip_ext.export_onnx(model, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_op_the_trace_does_not_replace_is_refused(tmp_path, monkeypatch):
    """Were an op reached by a path the replacement does not see, the program would hold it: refused, never
    written as a graph without it."""
    class PassThrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(onnx_export, "TorchEquivalents", PassThrough)
    with pytest.raises(RuntimeError, match=r"still calls .*dip_ext\.rms_norm_gather"):
        dip_ext.export_onnx(tiny_pair()[1], tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


# ---- the ops: each torch equivalent computes the op, and exports ------------------------------------------------

class AllOps(torch.nn.Module):
    """One residual update through every inference op, with index sets of one dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.tensor([0, 2, 3, 6], dtype=dtype)  # of the residual's 8 entries
        self.b = torch.tensor([1, 4, 7], dtype=dtype)
        self.c = torch.tensor([0, 1, 3], dtype=dtype)  # of a's 4
        self.w = torch.nn.Parameter(torch.rand(8, generator=g) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(8, generator=g))
        self.up = torch.nn.Parameter(torch.randn(5, 3, generator=g))
        self.up_bias = torch.nn.Parameter(torch.randn(5, generator=g))
        self.down = torch.nn.Parameter(torch.randn(3, 5, generator=g))
        self.down_bias = torch.nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        h = ops.index_select_gemm(ops.rms_norm_gather(x, self.w, self.a, 1e-6), self.c, self.up, self.up_bias)
        ops.gemm_scatter_add_(x, self.b, h, self.down, self.down_bias)
        ops.scatter_add_(x, self.a, ops.layer_norm_gather(x, self.w, self.bias, self.a, 1e-5))
        ops.rms_norm_scatter_add_(x, self.b, h[..., :3].contiguous(), self.w, 1e-6, unit_offset=True)
        return ops.rms_norm_scatter_add_(x, self.a, h[..., 1:].contiguous(), self.w, 1e-6)


class BothIndexDtypes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wide, self.narrow = AllOps(torch.int64), AllOps(torch.int32)

    def forward(self, x: torch.Tensor):
        return self.wide(x), self.narrow(x)


def test_every_op_equivalent_matches_the_kernel_and_exports(tmp_path):
    module = BothIndexDtypes()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kernels = module(x)
        with TorchEquivalents():
            equivalents = module(x)
        torch.testing.assert_close(equivalents, kernels, rtol=1e-5, atol=1e-5)
        with TorchEquivalents():
            program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert not [n for n in program.graph.nodes if "dip_ext" in str(n.target)]
    torch.onnx.export(program, dynamo=True, verbose=False).save(tmp_path / "ops.onnx")
    session = ort.InferenceSession(str(tmp_path / "ops.onnx"), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 5, 8)
    got = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
    with torch.no_grad():
        expected = module(x3)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), e, **TOL)


def test_every_inference_op_has_an_equivalent_and_others_are_refused():
    assert set(TORCH_EQUIVALENTS) == {"rms_norm_gather", "layer_norm_gather", "index_select_gemm", "scatter_add_",
                                      "gemm_scatter_add_", "rms_norm_scatter_add_"}
    with TorchEquivalents(), pytest.raises(NotImplementedError, match="calibration_stats_ has no ONNX form"):
        ops.calibration_stats(torch.randn(3, 4))


# ---- the legacy exporter: refused in one line; torch.jit.trace unaffected -------------------------------------

class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


# both use deprecated exporters on purpose
LEGACY_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")


@LEGACY_WARNINGS
@pytest.mark.parametrize("how", ["no_grad", "frozen"])
def test_legacy_exporter_is_refused_in_one_line(tmp_path, how):
    """Without grad (or with frozen weights) the model runs on the kernels, whose in-place updates the TorchScript
    exporter would drop: it used to write a file of the embedding, final norm and head alone."""
    model = compacted_pair("llama")[2]
    if how == "frozen":
        model.requires_grad_(False)
    ids = token_ids(2, 7)
    with torch.set_grad_enabled(how != "no_grad"), pytest.raises(LegacyOnnxExportError) as err:
        torch.onnx.export(Logits(model), (ids,), str(tmp_path / "legacy.onnx"), dynamo=False)
    message = str(err.value)
    assert "\n" not in message and "dynamo=False" in message and "dip_ext.export_onnx(model, path)" in message


@LEGACY_WARNINGS
def test_jit_trace_still_matches():
    model = compacted_pair("gemma3")[2]
    with torch.no_grad():
        traced = torch.jit.trace(Logits(copy.deepcopy(model)), (token_ids(2, 7),), check_trace=False)
        ids = token_ids(2, 7, seed=3)
        torch.testing.assert_close(traced(ids), torch_logits(model, ids), rtol=0, atol=0)
