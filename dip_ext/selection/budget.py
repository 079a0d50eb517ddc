"""Parameter budgets: what "prune R %" means, and the kept-parameter count of a set of widths.

``ratio`` is the fraction of parameters removed, of the decoder linears by default (``ratio_of="decoder_linear"``)
or of all parameters (``ratio_of="total"``; embeddings, norms and lm_head are kept, so only the decoder linears
can pay for it). Widths may be ints or (differentiable) tensors: the count is a polynomial in the widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from ..families import adapter_for
from ..masks import STRUCTURES
from ..params import param_report

RATIO_OF = ("decoder_linear", "total")


def check_ratio(ratio: float) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}") from None
    if not 0.0 < r < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (the fraction of parameters removed), got {ratio}")
    return r


@dataclass
class Budget:
    """The kept decoder-linear parameter target for one model and one ratio."""

    config: object
    ratio: float
    ratio_of: str
    dense_linear: int
    dense_total: int
    target_linear: int  # decoder-linear parameters to keep

    @classmethod
    def for_model(cls, model: nn.Module, ratio: float, ratio_of: str = "decoder_linear") -> "Budget":
        ratio = check_ratio(ratio)
        if ratio_of not in RATIO_OF:
            raise ValueError(f"ratio_of must be one of {RATIO_OF}, got {ratio_of!r}")
        rep = param_report(model)
        if rep.decoder_linear != rep.dense_decoder_linear:
            raise ValueError("the model is already compacted; select masks on the dense model")
        removed = ratio * (rep.dense_decoder_linear if ratio_of == "decoder_linear" else rep.dense_total)
        if removed >= rep.dense_decoder_linear:
            raise ValueError(f"removing {100 * ratio:.1f} % of all parameters needs more than every decoder-linear "
                             f"parameter ({rep.dense_decoder_linear:,} of {rep.dense_total:,})")
        return cls(model.config, ratio, ratio_of, rep.dense_decoder_linear, rep.dense_total,
                   int(round(rep.dense_decoder_linear - removed)))

    def kept_linear(self, widths: Sequence[dict]):
        """Decoder-linear parameters stored at these per-layer widths (ints or tensors)."""
        adapter = adapter_for(self.config)
        total = 0
        for w in widths:
            total = total + sum(adapter.linear_params(self.config, w).values())
        return total

    def kept_ratio(self, widths: Sequence[dict]):
        """kept / dense decoder-linear parameters (the quantity the target ``1 - removed`` is met on)."""
        return self.kept_linear(widths) / self.dense_linear

    @property
    def target_ratio(self) -> float:
        return self.target_linear / self.dense_linear

    def describe(self, widths: Sequence[dict]) -> dict:
        kept = int(self.kept_linear(widths))
        removed = self.dense_linear - kept
        return {"kept_decoder_linear": kept, "removed_decoder_linear": removed,
                "removed_fraction_decoder_linear": removed / self.dense_linear,
                "removed_fraction_total": removed / self.dense_total}


def widths_of(masks) -> list[dict]:
    """Per-layer widths of a DispMasks or of per-layer dicts of (soft) mask tensors (sum of the mask)."""
    if hasattr(masks, "widths"):
        return masks.widths()
    return [{s: layer[s].sum() for s in STRUCTURES} for layer in masks]
