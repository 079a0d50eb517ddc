"""What a family adapter provides. Adapters are the only code that knows a family's module names."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..masks import ModelDims

#: Where the masked reference multiplies a mask: on a module's input or on its output.
MaskPoint = tuple[nn.Module, Literal["input", "output"]]


class FamilyAdapter:
    """Knows one model family: its widths, where its masks apply, and how a layer is compacted."""

    #: Short name, e.g. "llama".
    name: str = ""
    #: ``config.model_type`` values this adapter handles.
    model_types: tuple[str, ...] = ()
    #: Hugging Face class names, for messages.
    architectures: tuple[str, ...] = ()

    def check_supported(self, config) -> None:
        """Raises UnsupportedModelError for variants of the family this adapter cannot compact."""

    def dims(self, config) -> ModelDims:
        raise NotImplementedError

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a ``*ForCausalLM`` model."""
        raise NotImplementedError

    def mask_points(self, layer: nn.Module) -> dict[str, list[MaskPoint]]:
        """For each structure, the (module, "input"|"output") places its 0/1 mask multiplies in a dense layer."""
        raise NotImplementedError

    def compact_layer(self, layer: nn.Module, idx: dict[str, torch.Tensor]) -> nn.Module:
        """A compacted replacement for dense ``layer`` keeping the index sets ``idx`` (sorted int64)."""
        raise NotImplementedError

    def linear_params(self, config, widths: dict[str, int]) -> dict[str, int]:
        """Parameters (weights + biases) stored by one layer's attention and MLP linears at these kept widths."""
        raise NotImplementedError

    def calibration_points(self, layer: nn.Module) -> dict[str, MaskPoint]:
        """Activations to collect statistics on, keyed by the structure they score (dense layer)."""
        points = self.mask_points(layer)
        return {s: pts[0] for s, pts in points.items()}
