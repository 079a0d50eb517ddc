"""DISP index sets: per decoder layer, which columns / rows every sub-block keeps.

Per layer five sorted, unique int64 index sets (DISP-LLM, Gao et al., NeurIPS 2024, arXiv 2410.11988):

====== ============ ====================================================================
set    over         meaning
====== ============ ====================================================================
attn_in  [0, d)     columns of q/k/v kept (the norm runs over all d, then these are gathered)
attn_out [0, d)     rows of the attention output projection; added into the residual there
mlp_in   [0, d)     columns of gate/up (fc1) kept
mlp_mid  [0, ffn)   intermediate channels kept
mlp_out  [0, d)     rows of down (fc2) kept; added into the residual there
====== ============ ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .errors import MaskError

STRUCTURES = ("attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out")
#: The dimension each structure indexes: the residual width ("hidden") or the MLP width ("ffn").
STRUCTURE_SPACE = {"attn_in": "hidden", "attn_out": "hidden", "mlp_in": "hidden", "mlp_mid": "ffn",
                   "mlp_out": "hidden"}


@dataclass(frozen=True)
class ModelDims:
    """The widths masks are validated against: layer count, residual width d, MLP width ffn."""

    num_layers: int
    hidden: int
    ffn: int

    def size(self, structure: str) -> int:
        return self.hidden if STRUCTURE_SPACE[structure] == "hidden" else self.ffn


def _as_index_set(values, name: str) -> torch.Tensor:
    """A 1-D int64 CPU tensor from a list / tensor of indices (boolean or 0/1 float tensors are masks)."""
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(list(values), dtype=torch.int64, device="cpu")
    if t.dtype == torch.bool:
        return t.reshape(-1).nonzero().reshape(-1).cpu()
    if t.is_floating_point():
        if not torch.all((t == 0) | (t == 1)):
            raise MaskError(f"{name}: a float mask must contain only 0 and 1")
        return (t.reshape(-1) != 0).nonzero().reshape(-1).cpu()
    if t.dim() != 1:
        raise MaskError(f"{name}: an index set must be 1-D, got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.int64)


class DispMasks:
    """Index sets for every decoder layer.

    ``masks.layers[i][s]`` is a sorted, unique, 1-D int64 CPU tensor for structure ``s`` of layer ``i``.
    Build with :meth:`from_dict` (JSON-like lists), :meth:`from_masks` (0/1 or boolean tensors) or :meth:`full`.
    """

    def __init__(self, layers: Sequence[Mapping[str, torch.Tensor]]):
        checked = []
        for i, layer in enumerate(layers):
            missing = [s for s in STRUCTURES if s not in layer]
            extra = [k for k in layer if k not in STRUCTURES]
            if missing or extra:
                raise MaskError(f"layer {i}: masks need exactly the keys {list(STRUCTURES)}; "
                                f"missing {missing}, unknown {extra}")
            entry = {}
            for s in STRUCTURES:
                idx = _as_index_set(layer[s], f"layer {i} {s}")
                if idx.numel() and bool((idx < 0).any()):
                    raise MaskError(f"layer {i} {s}: negative index {int(idx.min())}")
                uniq = torch.unique(idx)  # sorted
                if uniq.numel() != idx.numel():
                    dup = idx.sort().values
                    dup = int(dup[1:][dup[1:] == dup[:-1]][0])
                    raise MaskError(f"layer {i} {s}: duplicate index {dup}")
                entry[s] = uniq
            checked.append(entry)
        self.layers: list[dict[str, torch.Tensor]] = checked

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping) -> "DispMasks":
        """From ``{"layers": [{"attn_in": [...], "attn_out": [...], ...}, ...]}`` (the :meth:`to_dict` form)."""
        if not isinstance(data, Mapping) or "layers" not in data:
            raise MaskError('masks dict must look like {"layers": [{"attn_in": [...], ...}, ...]}')
        return cls(data["layers"])

    @classmethod
    def from_masks(cls, layers: Sequence[Mapping[str, torch.Tensor]]) -> "DispMasks":
        """From per-layer 0/1 or boolean mask tensors (``keep[j]`` true ⇔ index j is kept)."""
        for i, layer in enumerate(layers):
            for s, m in layer.items():
                if not isinstance(m, torch.Tensor) or m.dim() != 1:
                    raise MaskError(f"layer {i} {s}: expected a 1-D mask tensor")
        return cls(layers)

    @classmethod
    def full(cls, dims: ModelDims) -> "DispMasks":
        """Keeps everything (the compacted model equals the dense one)."""
        return cls([{s: torch.arange(dims.size(s)) for s in STRUCTURES} for _ in range(dims.num_layers)])

    def to_dict(self) -> dict:
        """JSON-safe: ``{"layers": [{structure: [int, ...]}, ...]}``."""
        return {"layers": [{s: layer[s].tolist() for s in STRUCTURES} for layer in self.layers]}

    def to_masks(self, dims: ModelDims, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
        """Dense 0/1 masks (``dtype``) of the model's widths."""
        self.validate(dims)
        out = []
        for layer in self.layers:
            entry = {}
            for s in STRUCTURES:
                m = torch.zeros(dims.size(s), dtype=dtype)
                m[layer[s]] = 1
                entry[s] = m
            out.append(entry)
        return out

    def to_config(self, dims: ModelDims) -> dict:
        """Compact JSON form for ``config.json``: one hex bitmask string per set (bit j set ⇔ j kept)."""
        self.validate(dims)
        layers = []
        for layer in self.layers:
            entry = {}
            for s in STRUCTURES:
                bits = torch.zeros(-(-dims.size(s) // 8) * 8, dtype=torch.bool)
                bits[layer[s]] = True
                packed = (bits.view(-1, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)).sum(1)
                entry[s] = bytes(packed.to(torch.uint8).tolist()).hex()
            layers.append(entry)
        return {"format": "dip_ext.bitmask-hex.v1", "hidden": dims.hidden, "ffn": dims.ffn, "layers": layers}

    @classmethod
    def from_config(cls, data: Mapping) -> "DispMasks":
        """Inverse of :meth:`to_config` (also accepts the :meth:`to_dict` form)."""
        if not isinstance(data, Mapping):
            raise MaskError("disp_masks in config.json must be an object")
        if data.get("format") is None:
            return cls.from_dict(data)
        if data["format"] != "dip_ext.bitmask-hex.v1":
            raise MaskError(f"unknown disp_masks format {data['format']!r} (written by a newer dip_ext?)")
        dims = ModelDims(len(data["layers"]), int(data["hidden"]), int(data["ffn"]))
        layers = []
        for i, entry in enumerate(data["layers"]):
            out = {}
            for s in STRUCTURES:
                try:
                    raw = torch.tensor(list(bytes.fromhex(entry[s])), dtype=torch.uint8)
                except (KeyError, ValueError, TypeError) as e:
                    raise MaskError(f"disp_masks layer {i} {s}: not a hex bitmask ({e})") from None
                bits = ((raw.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).bool()
                if bits.numel() != -(-dims.size(s) // 8) * 8 or bool(bits[dims.size(s):].any()):
                    raise MaskError(f"disp_masks layer {i} {s}: bitmask does not match width {dims.size(s)}")
                out[s] = bits.nonzero().reshape(-1)
            layers.append(out)
        return cls(layers).validate(dims)

    # ---- checks and summaries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.layers[i]

    def __eq__(self, other) -> bool:
        return isinstance(other, DispMasks) and len(self) == len(other) and all(
            torch.equal(a[s], b[s]) for a, b in zip(self.layers, other.layers) for s in STRUCTURES)

    def validate(self, dims: ModelDims) -> "DispMasks":
        """Raises :class:`MaskError` unless these masks fit a model of ``dims``; returns self."""
        if len(self.layers) != dims.num_layers:
            raise MaskError(f"masks have {len(self.layers)} layers but the model has {dims.num_layers}")
        for i, layer in enumerate(self.layers):
            for s in STRUCTURES:
                idx, size = layer[s], dims.size(s)
                if idx.numel() and int(idx.max()) >= size:
                    raise MaskError(f"layer {i} {s}: index {int(idx.max())} is out of range for width {size} "
                                    f"(masks made for another model?)")
        return self

    def widths(self) -> list[dict[str, int]]:
        """Kept width of every set, per layer."""
        return [{s: int(layer[s].numel()) for s in STRUCTURES} for layer in self.layers]

    def summary(self, dims: ModelDims | None = None) -> str:
        """A table of kept widths per layer (with the full widths when ``dims`` is given)."""
        head = "layer " + " ".join(f"{s:>9}" for s in STRUCTURES)
        rows = [head]
        for i, w in enumerate(self.widths()):
            rows.append(f"{i:>5} " + " ".join(f"{w[s]:>9}" for s in STRUCTURES))
        if dims is not None:
            rows.append(" full " + " ".join(f"{dims.size(s):>9}" for s in STRUCTURES))
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"DispMasks({len(self.layers)} layers)"

