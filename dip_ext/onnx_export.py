"""ONNX export of a Hugging Face causal LM, compacted or dense: token ids (and an attention mask) → logits.

``torch.onnx.export`` alone cannot export a compacted model. The legacy (TorchScript) exporter records the
in-place ops (``scatter_add_``, ``rms_norm_scatter_add_`` …), which return nothing, as nothing: it would drop
every residual update and all that only feeds one (the op wrappers refuse it, see :mod:`dip_ext.ops`). The
dynamo exporter finds no ONNX function for the ``dip_ext`` ops, and ``torch.export`` turns each in-place op into
an ``auto_functionalized`` node, which has no ONNX translation at all.

:func:`export_onnx` traces the model with ``torch.export`` while every ``dip_ext`` op is replaced by its exact
torch equivalent (the formula its docstring in :mod:`dip_ext.ops` states), in-place ops by the same in-place
update in aten ops, which ``torch.export`` functionalizes like any ``index_add_``. The exported program then
holds only aten ops, whose ONNX translations are torch.onnx's own; the dynamo exporter writes the file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim
from torch.overrides import TorchFunctionMode

from .modules import rms_norm_scatter_add
from .outputs import check_own_files, own_files


def _added(residual: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``residual`` with ``y`` added at ``idx`` of the last dim, each element in fp32 and rounded once (as the
    in-place kernels add)."""
    return residual.float().index_add(-1, idx.long(), y.float()).to(residual.dtype)


def _rms_norm_gather(x, weight, idx, eps, check_idx=True):
    return F.rms_norm(x, (x.shape[-1],), weight, eps).index_select(-1, idx)


def _layer_norm_gather(x, weight, bias, idx, eps, check_idx=True):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).index_select(-1, idx)


def _index_select_gemm(x, idx, weight, bias=None, check_idx=True):
    return F.linear(x.index_select(-1, idx), weight, bias)


# The in-place ops write into residual and return None, as the registered ops do (their Python wrappers
# return residual): copy_ keeps the update a mutation of that tensor, which torch.export functionalizes.
# index_add exports as ONNX ScatterND, whose indices must be int64: int32 index sets are widened.
def _scatter_add_(residual, idx, y, check_idx=True):
    residual.copy_(_added(residual, idx, y))


def _gemm_scatter_add_(residual, idx, x, weight, bias=None, check_idx=True):
    residual.copy_(_added(residual, idx, F.linear(x, weight, bias)))


def _rms_norm_scatter_add_(residual, idx, y, weight, eps, unit_offset=False, check_idx=True):
    residual.copy_(rms_norm_scatter_add(residual, idx.long(), y, weight, eps, unit_offset))


#: each inference op of torch.ops.dip_ext, by name, and its torch equivalent taking the op's own arguments.
#: Index sets are not checked in the exported graph (ONNX cannot raise): compaction validated them once.
TORCH_EQUIVALENTS: dict[str, Callable] = {
    "rms_norm_gather": _rms_norm_gather,
    "layer_norm_gather": _layer_norm_gather,
    "index_select_gemm": _index_select_gemm,
    "scatter_add_": _scatter_add_,
    "gemm_scatter_add_": _gemm_scatter_add_,
    "rms_norm_scatter_add_": _rms_norm_scatter_add_,
}


class TorchEquivalents(TorchFunctionMode):
    """While active, every call of a ``torch.ops.dip_ext`` op runs its torch equivalent instead (the op's
    overload packet or one of its overloads); any other dip_ext op (``calibration_stats_``, not part of
    inference) raises ``NotImplementedError``. Everything else runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # an op is called as its overload packet or as one overload: both name it "dip_ext.<op>"
        qualified = str(getattr(func, "overloadpacket", func))
        if not qualified.startswith("dip_ext."):
            return func(*args, **kwargs)
        name = qualified[len("dip_ext."):]
        if name not in TORCH_EQUIVALENTS:
            raise NotImplementedError(f"dip_ext.export_onnx: dip_ext.{name} has no ONNX form (it is not an "
                                      "inference op)")
        return TORCH_EQUIVALENTS[name](*args, **kwargs)


class _Logits(nn.Module):
    """The exported signature: ``input_ids`` (and ``attention_mask``) → ``logits``, no KV cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          return_dict=True).logits


def _example_ids(model: nn.Module, given: Optional[torch.Tensor]) -> torch.Tensor:
    """The ids to trace, int64 on the embedding's device."""
    if not (hasattr(model, "get_input_embeddings") and hasattr(getattr(model, "config", None), "vocab_size")):
        raise TypeError("dip_ext.export_onnx: model must be a Hugging Face causal LM (compacted or dense), got "
                        f"{type(model).__name__}")
    device = model.get_input_embeddings().weight.device
    if given is None:
        # batch 2, 8 tokens: neither dim is 0 or 1, which torch.export would specialise on
        return (torch.arange(16, device=device) % model.config.vocab_size).reshape(2, 8)
    if not isinstance(given, torch.Tensor) or given.dim() != 2 or given.dtype not in (torch.int32, torch.int64):
        shape = tuple(getattr(given, "shape", ()))
        raise ValueError("dip_ext.export_onnx: example_input_ids must be an int64 tensor [batch, seq], got "
                         f"{type(given).__name__} {getattr(given, 'dtype', '')} {shape}")
    return given.to(device=device, dtype=torch.int64)


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], *,
                example_input_ids: Optional[torch.Tensor] = None, attention_mask: bool = False,
                opset: Optional[int] = None, dynamic: bool = True) -> Path:
    """Exports ``model`` (a compacted model, or a dense Hugging Face causal LM) to the ONNX file ``path``.

    The graph's inputs: ``input_ids`` int64 ``[batch, sequence]`` and, with ``attention_mask=True``,
    ``attention_mask`` int64 ``[batch, sequence]`` (1 keeps a token, 0 masks it, e.g. left padding); its output:
    ``logits`` ``[batch, sequence, vocab]`` in the model's dtype. No KV cache: every call runs the whole
    sequence. With ``dynamic`` (the default) batch and sequence are symbolic dims named "batch" and "sequence"
    (any size from 1), else fixed to the shape of ``example_input_ids`` (default: 2 × 8 ids, only traced; with
    ``dynamic`` both of its dims must be at least 2, as torch.export fixes a dim of size 0 or 1).

    The model is traced in eval mode without grad (its mode is restored), on its device and in its dtype, each
    dip_ext op as the torch computation its docstring states (:data:`TORCH_EQUIVALENTS`; index sets are not
    re-checked); torch.onnx's dynamo exporter writes ``path`` and the weights in ``<path>.data`` beside it.
    Neither file may be one dip_ext did not write (FileExistsError before any work:
    :func:`dip_ext.outputs.own_files`). ``opset``: the ONNX opset (None: torch.onnx's default). Checked against
    onnxruntime in fp32; fp16 runs there too, bf16 exports but onnxruntime's CPU provider lacks bf16 kernels.
    Returns ``Path(path)``.

    Raises ImportError when ``onnxscript`` (which the exporter needs) is not installed, TypeError for a model
    that is not a Hugging Face causal LM, ValueError for bad ``example_input_ids``, RuntimeError if a dip_ext
    op is left in the traced graph, and what ``torch.export`` raises for a model it cannot trace (e.g. code
    that fixes a dim marked dynamic).
    """
    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError("dip_ext.export_onnx needs the onnx and onnxscript packages: "
                          "pip install onnx onnxscript")
    path = Path(path)
    files = [path.name, path.name + ".data"]
    check_own_files(path.parent, files)  # before the trace: refused at once
    ids = _example_ids(model, example_input_ids)
    args = (ids, torch.ones_like(ids)) if attention_mask else (ids,)
    shapes = None
    if dynamic:
        dims = {0: Dim("batch"), 1: Dim("sequence")}
        shapes = (dims, dims) if attention_mask else (dims,)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), TorchEquivalents():
            program = torch.export.export(_Logits(model), args, dynamic_shapes=shapes, strict=False)
    finally:
        model.train(training)
    # a dip_ext op reached by a path the mode does not see would export as nothing: refuse it here
    left = sorted({str(n.target) for n in program.graph.nodes if "dip_ext" in str(n.target)})
    if left:
        raise RuntimeError(f"dip_ext.export_onnx: the traced graph still calls {left}, which the ONNX exporter "
                           "cannot translate")
    names = ["input_ids", "attention_mask"][:len(args)]
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=names,
                                     output_names=["logits"], verbose=False)
    if dynamic:
        # the exporter names an exported program's dims after its symbols (s43 ...): name them as documented
        batch, sequence = onnx_program.model.graph.inputs[0].shape[:2]
        onnx_program.rename_axes({batch: "batch", sequence: "sequence"})
    with own_files(path.parent, files, command="export_onnx"):
        onnx_program.save(path, external_data=True)
    return path


__all__ = ["export_onnx", "TORCH_EQUIVALENTS", "TorchEquivalents"]
