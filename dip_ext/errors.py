"""Exceptions raised by dip_ext (all subclasses of the builtin a caller would expect)."""

import torch


class UnsupportedModelError(ValueError):
    """The model's architecture (or a variant of it) is not supported by any family adapter."""


class MaskError(ValueError):
    """Masks do not fit the model: wrong layer count, out-of-range or duplicate indices, wrong keys."""


class LegacyOnnxExportError(RuntimeError):
    """``torch.onnx.export(..., dynamo=False)`` traced a dip_ext in-place op, which it would silently drop."""


def refuse_legacy_onnx_export(op: str) -> None:
    """Raises :class:`LegacyOnnxExportError` while the legacy (TorchScript) ONNX exporter traces ``op``.

    That exporter records an op that returns nothing (the in-place ops) as nothing, so the file it wrote would
    hold no residual update: every decoder layer of a compacted model gone. ``torch.jit.trace`` alone (which
    keeps them) and the dynamo exporter are unaffected.
    """
    if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
        raise LegacyOnnxExportError(
            f"dip_ext.{op}: torch.onnx.export(..., dynamo=False) would drop this in-place op, and with it every "
            "residual update of the model; export with dip_ext.export_onnx(model, path) instead")
