"""Parameter accounting: what a (compacted) model stores, and what its dense original stored."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

from torch import nn

from .families import adapter_for, is_compacted
from .masks import KV_GROUPS, DispMasks


@dataclass
class ParamReport:
    """Counts of stored parameters (tied weights once). ``decoder_linear``: q/k/v/o + MLP linears, biases incl.

    ``widths``: per layer, the kept width of each structure; ``full_widths``: per layer, the dense model's width of
    the same structures (from the family's prunable space: a layer lists only the structures it has)."""

    total: int
    decoder_linear: int
    dense_total: int
    dense_decoder_linear: int
    widths: list[dict[str, int]]
    full_widths: list[dict[str, int]]

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
        """The report :meth:`to_dict` wrote (the derived fractions are recomputed, not read; one ``full_widths``
        dict for every layer, as earlier releases recorded it, is read as that dict in each layer)."""
        values = {f.name: data[f.name] for f in fields(cls)}
        if isinstance(values["full_widths"], dict):
            values["full_widths"] = [dict(values["full_widths"]) for _ in values["widths"]]
        return cls(**values)

    def table(self) -> str:
        """The counts, then a row of kept widths per layer (``-`` where a layer has no such structure) and a
        ``full`` row (:func:`full_row`)."""
        keys = self.structures
        row = lambda label, w: f"{label:>5} " + " ".join(f"{w.get(s, '-'):>9}" for s in keys)  # noqa: E731
        lines = [f"total parameters          {self.total:>14,} of {self.dense_total:>14,} "
                 f"({100 * self.removed_total:.2f} % removed)",
                 f"decoder-linear parameters {self.decoder_linear:>14,} of {self.dense_decoder_linear:>14,} "
                 f"({100 * self.removed_decoder_linear:.2f} % removed)",
                 "layer " + " ".join(f"{s:>9}" for s in keys)]
        lines += [row(i, w) for i, w in enumerate(self.widths)]
        lines.append(row("full", full_row(self.full_widths, keys)))
        return "\n".join(lines)

    @property
    def structures(self) -> tuple[str, ...]:
        """Every structure any layer's widths list, in the order of the family's space (``kv_groups`` only where
        heads were pruned)."""
        order = [s for f in self.full_widths for s in f] + [s for w in self.widths for s in w]
        return tuple(s for s in dict.fromkeys(order) if any(s in w for w in self.widths))


def full_row(full_widths: list[dict[str, int]], structures) -> dict[str, Union[int, str]]:
    """The ``full`` row of a widths table: per structure, its full width when every layer that has it has the same,
    else ``"varies"`` (the per-layer values are in ``full_widths``); absent when no layer has it."""
    row: dict[str, Union[int, str]] = {}
    for s in structures:
        sizes = {f[s] for f in full_widths if s in f}
        if sizes:
            row[s] = sizes.pop() if len(sizes) == 1 else "varies"
    return row


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_linear_params(model: nn.Module) -> int:
    """Parameters of every nn.Linear inside the decoder layers (as stored now)."""
    layers = adapter_for(model).decoder_layers(model)
    return sum(_count(m) for m in layers.modules() if isinstance(m, nn.Linear))


def dense_linear_params(config, widths: list[dict[str, int]]) -> int:
    """Decoder-linear parameters a model of ``config`` stores at the given per-layer kept widths (layer ``i``'s
    counted by the family's ``linear_params(config, widths[i], layer=i)``)."""
    adapter = adapter_for(config)
    return sum(sum(adapter.linear_params(config, w, layer=i).values()) for i, w in enumerate(widths))


def param_report(model: nn.Module) -> ParamReport:
    """Total and decoder-linear parameters, per-layer widths, and the same figures of the dense original.

    The full widths are the family's prunable space's, per layer: its required structures, and the optional ones
    (KV groups) only where the masks of a compacted model hold them."""
    adapter = adapter_for(model)
    space = adapter.space(model.config)
    total, linear = _count(model), decoder_linear_params(model)
    masks = DispMasks.from_config(model.config.disp_masks) if is_compacted(model) else None
    held = masks.structures if masks is not None else ()
    full = space.select([s for s in space.optional_names if s in held]).full_widths()
    if masks is not None:
        widths = masks.widths()
        dense_linear = dense_linear_params(model.config, full)
        recorded = getattr(model.config, "disp_dense_params", None) or {}
        # recorded at compaction (it also counts the norms of removed blocks); the formula is the fallback
        dense_total = int(recorded.get("total", total - linear + dense_linear))
    else:
        widths = [dict(f) for f in full]
        dense_linear, dense_total = linear, total
    return ParamReport(total, linear, dense_total, dense_linear, widths, full)


def kv_cache_bytes(config, widths: Optional[list[dict]] = None, itemsize: int = 2) -> int:
    """KV-cache bytes per token of context of a model of ``config`` (a dense config or a compacted model's) at
    these per-layer kept ``widths`` (default: the dense model's), ``itemsize`` bytes per cached value (2: bf16 /
    fp16): a key and a value of head_dim per kept KV group (every group where ``widths`` has no ``kv_groups``), none
    for a removed attention (empty ``attn_out``; a layer whose widths have no ``attn_out`` keeps its attention).

    Every layer is counted per token, sliding-window layers included (they cap what they hold at their window);
    the placeholder entries of a removed attention (one zero key and value per token) are not counted.
    """
    adapter = adapter_for(config)
    shapes, layers = adapter.shapes(config), adapter.space(config).num_layers
    if widths is None:
        return layers * shapes.kv_cache_bytes(shapes.kv_heads, itemsize)
    return sum(shapes.kv_cache_bytes(w.get(KV_GROUPS, shapes.kv_heads), itemsize)
               for w in widths if w.get("attn_out", 1) > 0)
