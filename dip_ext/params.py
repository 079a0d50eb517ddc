"""Parameter accounting: what a (compacted) model stores, and what its dense original stored."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from torch import nn

from .families import adapter_for, is_compacted
from .masks import STRUCTURES, DispMasks


@dataclass
class ParamReport:
    """Counts of stored parameters (tied weights once). ``decoder_linear``: q/k/v/o + MLP linears, biases incl."""

    total: int
    decoder_linear: int
    dense_total: int
    dense_decoder_linear: int
    widths: list[dict[str, int]]
    full_widths: dict[str, int]

    @property
    def removed_decoder_linear(self) -> float:
        """Fraction of decoder-linear parameters removed relative to the dense original."""
        return 1 - self.decoder_linear / self.dense_decoder_linear if self.dense_decoder_linear else 0.0

    @property
    def removed_total(self) -> float:
        return 1 - self.total / self.dense_total if self.dense_total else 0.0

    def to_dict(self) -> dict:
        """The counts and widths, plus the two removed fractions (JSON-safe)."""
        d = asdict(self)
        d.update(removed_decoder_linear=self.removed_decoder_linear, removed_total=self.removed_total)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "ParamReport":
        """The report :meth:`to_dict` wrote (the derived fractions are recomputed, not read)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def table(self) -> str:
        lines = [f"total parameters          {self.total:>14,} of {self.dense_total:>14,} "
                 f"({100 * self.removed_total:.2f} % removed)",
                 f"decoder-linear parameters {self.decoder_linear:>14,} of {self.dense_decoder_linear:>14,} "
                 f"({100 * self.removed_decoder_linear:.2f} % removed)",
                 "layer " + " ".join(f"{s:>9}" for s in STRUCTURES)]
        lines += [f"{i:>5} " + " ".join(f"{w[s]:>9}" for s in STRUCTURES) for i, w in enumerate(self.widths)]
        lines.append(" full " + " ".join(f"{self.full_widths[s]:>9}" for s in STRUCTURES))
        return "\n".join(lines)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_linear_params(model: nn.Module) -> int:
    """Parameters of every nn.Linear inside the decoder layers (as stored now)."""
    layers = adapter_for(model).decoder_layers(model)
    return sum(_count(m) for m in layers.modules() if isinstance(m, nn.Linear))


def dense_linear_params(config, widths: list[dict[str, int]]) -> int:
    """Decoder-linear parameters a model of ``config`` stores at the given per-layer kept widths."""
    adapter = adapter_for(config)
    return sum(sum(adapter.linear_params(config, w).values()) for w in widths)


def param_report(model: nn.Module) -> ParamReport:
    """Total and decoder-linear parameters, per-layer widths, and the same figures of the dense original."""
    adapter = adapter_for(model)
    dims = adapter.dims(model.config)
    full = {s: dims.size(s) for s in STRUCTURES}
    total, linear = _count(model), decoder_linear_params(model)
    if is_compacted(model):
        widths = DispMasks.from_config(model.config.disp_masks).widths()
        dense_linear = dense_linear_params(model.config, [full] * dims.num_layers)
        recorded = getattr(model.config, "disp_dense_params", None) or {}
        # recorded at compaction (it also counts the norms of removed blocks); the formula is the fallback
        dense_total = int(recorded.get("total", total - linear + dense_linear))
    else:
        widths = [dict(full) for _ in range(dims.num_layers)]
        dense_linear, dense_total = linear, total
    return ParamReport(total, linear, dense_total, dense_linear, widths, full)
