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
kv_groups [0, G)    KV groups kept (optional): a group is one KV head with the query heads that share it
====== ============ ====================================================================

The five residual / MLP sets (:data:`STRUCTURES`) are in every layer. ``kv_groups`` (:data:`KV_GROUPS`) is in every
layer or in none: masks without it keep every head (the DISP paper's method prunes no heads). Keeping group ``g``
keeps KV head ``g``, the query heads ``g·n_rep … (g+1)·n_rep - 1`` that read it (``n_rep`` = query heads per KV
head, the order of transformers' ``repeat_kv``), their q/k/v rows and o_proj columns, and its KV-cache entry. A
layer that keeps no group keeps no attention: its ``attn_out`` is emptied when the masks are built (an attention
without heads would add nothing but its output bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .errors import MaskError

STRUCTURES = ("attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out")
#: The optional structure: whole KV groups of attention heads.
KV_GROUPS = "kv_groups"
#: Every structure a layer's masks may hold, in the order tables and files list them.
ALL_STRUCTURES = STRUCTURES + (KV_GROUPS,)
#: The dimension each structure indexes: the residual width ("hidden"), the MLP width ("ffn") or the KV heads.
STRUCTURE_SPACE = {"attn_in": "hidden", "attn_out": "hidden", "mlp_in": "hidden", "mlp_mid": "ffn",
                   "mlp_out": "hidden", KV_GROUPS: "kv_groups"}


@dataclass(frozen=True)
class ModelDims:
    """The widths masks are validated against: layer count, residual width d, MLP width ffn, and the number of
    KV groups per layer (the KV heads; 0 where the family cannot prune heads)."""

    num_layers: int
    hidden: int
    ffn: int
    kv_groups: int = 0

    def size(self, structure: str) -> int:
        return {"hidden": self.hidden, "ffn": self.ffn, "kv_groups": self.kv_groups}[STRUCTURE_SPACE[structure]]

    def structures(self, heads: bool = False) -> tuple[str, ...]:
        """The structures of a layer: :data:`STRUCTURES`, plus :data:`KV_GROUPS` when ``heads`` (ValueError when
        ``heads`` is asked of a model whose family declares no KV groups)."""
        if not heads:
            return STRUCTURES
        if not self.kv_groups:
            raise ValueError("this model's family declares no KV groups: its attention heads cannot be pruned")
        return ALL_STRUCTURES

    def as_list(self) -> list[int]:
        """``[num_layers, hidden, ffn, kv_groups]`` (JSON-safe; the inverse is ``ModelDims(*values)``)."""
        return [self.num_layers, self.hidden, self.ffn, self.kv_groups]


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
        heads = bool(layers) and KV_GROUPS in layers[0]
        keys = ALL_STRUCTURES if heads else STRUCTURES
        for i, layer in enumerate(layers):
            missing = [s for s in keys if s not in layer]
            extra = [k for k in layer if k not in keys]
            if missing or extra:
                also = f" (and {KV_GROUPS!r} in every layer or in none; layer 0 {'has' if heads else 'lacks'} it)"
                raise MaskError(f"layer {i}: masks need exactly the keys {list(keys)}{also}; "
                                f"missing {missing}, unknown {extra}")
            entry = {}
            for s in keys:
                idx = _as_index_set(layer[s], f"layer {i} {s}")
                if idx.numel() and bool((idx < 0).any()):
                    raise MaskError(f"layer {i} {s}: negative index {int(idx.min())}")
                uniq = torch.unique(idx)  # sorted
                if uniq.numel() != idx.numel():
                    dup = idx.sort().values
                    dup = int(dup[1:][dup[1:] == dup[:-1]][0])
                    raise MaskError(f"layer {i} {s}: duplicate index {dup}")
                entry[s] = uniq
            if heads and entry[KV_GROUPS].numel() == 0:
                entry["attn_out"] = entry["attn_out"][:0]  # no head left: the attention is removed
            checked.append(entry)
        self.layers: list[dict[str, torch.Tensor]] = checked

    @property
    def structures(self) -> tuple[str, ...]:
        """The structures every layer holds: :data:`STRUCTURES`, plus :data:`KV_GROUPS` when heads are pruned."""
        return ALL_STRUCTURES if self.prunes_heads else STRUCTURES

    @property
    def prunes_heads(self) -> bool:
        """True when the masks carry KV groups (:data:`KV_GROUPS`)."""
        return bool(self.layers) and KV_GROUPS in self.layers[0]

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
    def full(cls, dims: ModelDims, heads: bool = False) -> "DispMasks":
        """Keeps everything (the compacted model equals the dense one); with ``heads`` the masks carry every KV
        group."""
        return cls([{s: torch.arange(dims.size(s)) for s in dims.structures(heads)} for _ in range(dims.num_layers)])

    def to_dict(self) -> dict:
        """JSON-safe: ``{"layers": [{structure: [int, ...]}, ...]}``."""
        return {"layers": [{s: layer[s].tolist() for s in self.structures} for layer in self.layers]}

    def to_masks(self, dims: ModelDims, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
        """Dense 0/1 masks (``dtype``) of the model's widths."""
        self.validate(dims)
        out = []
        for layer in self.layers:
            entry = {}
            for s in self.structures:
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
            for s in self.structures:
                bits = torch.zeros(-(-dims.size(s) // 8) * 8, dtype=torch.bool)
                bits[layer[s]] = True
                packed = (bits.view(-1, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)).sum(1)
                entry[s] = bytes(packed.to(torch.uint8).tolist()).hex()
            layers.append(entry)
        out = {"format": "dip_ext.bitmask-hex.v1", "hidden": dims.hidden, "ffn": dims.ffn, "layers": layers}
        if self.prunes_heads:
            out[KV_GROUPS] = dims.kv_groups
        return out

    @classmethod
    def from_config(cls, data: Mapping) -> "DispMasks":
        """Inverse of :meth:`to_config` (also accepts the :meth:`to_dict` form)."""
        if not isinstance(data, Mapping):
            raise MaskError("disp_masks in config.json must be an object")
        if data.get("format") is None:
            return cls.from_dict(data)
        if data["format"] != "dip_ext.bitmask-hex.v1":
            raise MaskError(f"unknown disp_masks format {data['format']!r} (written by a newer dip_ext?)")
        dims = ModelDims(len(data["layers"]), int(data["hidden"]), int(data["ffn"]), int(data.get(KV_GROUPS, 0)))
        layers = []
        for i, entry in enumerate(data["layers"]):
            out = {}
            for s in dims.structures(heads=KV_GROUPS in data):
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
            a.keys() == b.keys() and torch.equal(a[s], b[s]) for a, b in zip(self.layers, other.layers) for s in a)

    def validate(self, dims: ModelDims) -> "DispMasks":
        """Raises :class:`MaskError` unless these masks fit a model of ``dims``; returns self."""
        if len(self.layers) != dims.num_layers:
            raise MaskError(f"masks have {len(self.layers)} layers but the model has {dims.num_layers}")
        if self.prunes_heads and not dims.kv_groups:
            raise MaskError(f"the masks prune {KV_GROUPS} but this model's family declares no KV groups")
        for i, layer in enumerate(self.layers):
            for s in self.structures:
                idx, size = layer[s], dims.size(s)
                if idx.numel() and int(idx.max()) >= size:
                    raise MaskError(f"layer {i} {s}: index {int(idx.max())} is out of range for width {size} "
                                    f"(masks made for another model?)")
        return self

    def widths(self) -> list[dict[str, int]]:
        """Kept width of every set, per layer."""
        return [{s: int(layer[s].numel()) for s in self.structures} for layer in self.layers]

    def summary(self, dims: ModelDims | None = None) -> str:
        """A table of kept widths per layer (with the full widths when ``dims`` is given)."""
        keys = self.structures
        head = "layer " + " ".join(f"{s:>9}" for s in keys)
        rows = [head]
        for i, w in enumerate(self.widths()):
            rows.append(f"{i:>5} " + " ".join(f"{w[s]:>9}" for s in keys))
        if dims is not None:
            rows.append(" full " + " ".join(f"{dims.size(s):>9}" for s in keys))
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"DispMasks({len(self.layers)} layers)"

