"""Parameter accounting: what a (compacted) model stores, and what its dense original stored."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

from torch import nn

from .families import adapter_for, is_compacted
from .masks import ALL_STRUCTURES, KV_GROUPS, DispMasks


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
                 "layer " + " ".join(f"{s:>9}" for s in self.structures)]
        lines += [f"{i:>5} " + " ".join(f"{w[s]:>9}" for s in self.structures) for i, w in enumerate(self.widths)]
        lines.append(" full " + " ".join(f"{self.full_widths[s]:>9}" for s in self.structures))
        return "\n".join(lines)

    @property
    def structures(self) -> tuple[str, ...]:
        """The structures the widths list (``kv_groups`` only where heads were pruned)."""
        return tuple(s for s in ALL_STRUCTURES if all(s in w for w in self.widths))


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
    total, linear = _count(model), decoder_linear_params(model)
    masks = DispMasks.from_config(model.config.disp_masks) if is_compacted(model) else None
    full = {s: dims.size(s) for s in dims.structures(heads=masks is not None and masks.prunes_heads)}
    if masks is not None:
        widths = masks.widths()
        dense_linear = dense_linear_params(model.config, [full] * dims.num_layers)
        recorded = getattr(model.config, "disp_dense_params", None) or {}
        # recorded at compaction (it also counts the norms of removed blocks); the formula is the fallback
        dense_total = int(recorded.get("total", total - linear + dense_linear))
    else:
        widths = [dict(full) for _ in range(dims.num_layers)]
        dense_linear, dense_total = linear, total
    return ParamReport(total, linear, dense_total, dense_linear, widths, full)


def kv_cache_bytes(config, widths: Optional[list[dict]] = None, itemsize: int = 2) -> int:
    """KV-cache bytes per token of context of a model of ``config`` (a dense config or a compacted model's) at
    these per-layer kept ``widths`` (default: the dense model's), ``itemsize`` bytes per cached value (2: bf16 /
    fp16): a key and a value of head_dim per kept KV group (every group where ``widths`` has no ``kv_groups``), none
    for a removed attention (empty ``attn_out``).

    Every layer is counted per token, sliding-window layers included (they cap what they hold at their window);
    the placeholder entries of a removed attention (one zero key and value per token) are not counted.
    """
    adapter = adapter_for(config)
    shapes, dims = adapter.shapes(config), adapter.dims(config)
    if widths is None:
        return dims.num_layers * shapes.kv_cache_bytes(shapes.kv_heads, itemsize)
    return sum(shapes.kv_cache_bytes(w.get(KV_GROUPS, shapes.kv_heads), itemsize)
               for w in widths if w["attn_out"] > 0)
