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

These are the sets of the built-in families (:meth:`ModelDims.space`); a family declares its own per-layer
:class:`~dip_ext.space.PrunableSpace`, which may add structures (experts) or leave one out of a layer, and masks
are validated against it. ``kv_groups`` (:data:`KV_GROUPS`) is optional: in every layer or in none; masks without
it keep every head (the DISP paper's method prunes no heads). Keeping group ``g``
keeps KV head ``g``, the query heads ``g·n_rep … (g+1)·n_rep - 1`` that read it (``n_rep`` = query heads per KV
head, the order of transformers' ``repeat_kv``), their q/k/v rows and o_proj columns, and its KV-cache entry. A
layer that keeps no group keeps no attention: its ``attn_out`` is emptied when the masks are built (an attention
without heads would add nothing but its output bias).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence, Union

import torch

from .errors import MaskError
from .space import HIDDEN_AXIS, PrunableSpace, Structure

STRUCTURES = ("attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out")
#: The optional structure: whole KV groups of attention heads.
KV_GROUPS = "kv_groups"
#: Every structure a layer's masks may hold, in the order tables and files list them.
ALL_STRUCTURES = STRUCTURES + (KV_GROUPS,)
#: The dimension each structure indexes: the residual width ("hidden"), the MLP width ("ffn") or the KV heads.
STRUCTURE_SPACE = {"attn_in": HIDDEN_AXIS, "attn_out": HIDDEN_AXIS, "mlp_in": HIDDEN_AXIS, "mlp_mid": "ffn",
                   "mlp_out": HIDDEN_AXIS, KV_GROUPS: "kv_groups"}


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

    def space(self) -> PrunableSpace:
        """The prunable space of these widths: every layer has :data:`STRUCTURES` (``mlp_mid`` over the ``ffn``
        axis, the others over the residual) and, with KV groups, the optional whole-unit ``kv_groups``."""
        layer = tuple(Structure(s, self.size(s), STRUCTURE_SPACE[s]) for s in STRUCTURES)
        if self.kv_groups:
            layer += (Structure(KV_GROUPS, self.kv_groups, KV_GROUPS, optional=True, whole_units=True),)
        return PrunableSpace.uniform(self.num_layers, self.hidden, layer)


#: What the functions that read a prunable space take: the space, or the uniform widths of a built-in family.
SpaceLike = Union[PrunableSpace, ModelDims]


def as_space(space: SpaceLike) -> PrunableSpace:
    """``space`` as a :class:`~dip_ext.space.PrunableSpace` (a :class:`ModelDims` gives :meth:`ModelDims.space`);
    ValueError for anything else."""
    if isinstance(space, PrunableSpace):
        return space
    if isinstance(space, ModelDims):
        return space.space()
    raise ValueError(f"expected a dip_ext PrunableSpace or ModelDims, got {type(space).__name__}")


def uniform_dims(space: PrunableSpace):
    """The :class:`ModelDims` whose space ``space`` is (the built-in layout), or None."""
    first = {s.name: s.size for s in space.layers[0]}
    if not all(s in first for s in STRUCTURES):
        return None
    dims = ModelDims(space.num_layers, space.hidden, first["mlp_mid"], first.get(KV_GROUPS, 0))
    # how a family scores its units does not change the layout
    unscored = PrunableSpace(space.hidden, tuple(tuple(replace(s, column_scores=False) for s in layer)
                                                 for layer in space.layers))
    return dims if dims.space() == unscored else None


_FORMAT_UNIFORM = "dip_ext.bitmask-hex.v1"  # the built-in layout's widths: hidden, ffn (and kv_groups)
_FORMAT_SPACE = "dip_ext.bitmask-hex.v2"  # any family's space, stored whole


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
    Construction checks the index sets; :meth:`validate` checks them against a model's prunable space (every
    structure the layer declares, optional ones in every declaring layer or in none, indices in range), which
    every consumer (masking, compaction, saving) runs.
    """

    def __init__(self, layers: Sequence[Mapping[str, torch.Tensor]]):
        checked = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, Mapping) or not all(isinstance(k, str) for k in layer):
                raise MaskError(f"layer {i}: masks are a mapping of structure name -> index set, got "
                                f"{type(layer).__name__}")
            entry = {}
            for s in layer:
                idx = _as_index_set(layer[s], f"layer {i} {s}")
                if idx.numel() and bool((idx < 0).any()):
                    raise MaskError(f"layer {i} {s}: negative index {int(idx.min())}")
                uniq = torch.unique(idx)  # sorted
                if uniq.numel() != idx.numel():
                    dup = idx.sort().values
                    dup = int(dup[1:][dup[1:] == dup[:-1]][0])
                    raise MaskError(f"layer {i} {s}: duplicate index {dup}")
                entry[s] = uniq
            if KV_GROUPS in entry and "attn_out" in entry and entry[KV_GROUPS].numel() == 0:
                entry["attn_out"] = entry["attn_out"][:0]  # no head left: the attention is removed
            checked.append(entry)
        self.layers: list[dict[str, torch.Tensor]] = checked

    @property
    def structures(self) -> tuple[str, ...]:
        """Every structure any layer holds, in order of first appearance (:data:`STRUCTURES`, plus
        :data:`KV_GROUPS` when heads are pruned, for the built-in families)."""
        return tuple(dict.fromkeys(s for layer in self.layers for s in layer))

    @property
    def prunes_heads(self) -> bool:
        """True when the masks carry KV groups (:data:`KV_GROUPS`)."""
        return any(KV_GROUPS in layer for layer in self.layers)

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
    def full(cls, space: SpaceLike, heads: bool = False) -> "DispMasks":
        """Keeps everything (the compacted model equals the dense one): every required structure of ``space``,
        and with ``heads`` every KV group too."""
        space = as_space(space).select([KV_GROUPS] if heads else [])
        return cls([{s.name: torch.arange(s.size) for s in layer} for layer in space.layers])

    def to_dict(self) -> dict:
        """JSON-safe: ``{"layers": [{structure: [int, ...]}, ...]}``."""
        return {"layers": [{s: t.tolist() for s, t in layer.items()} for layer in self.layers]}

    def to_masks(self, space: SpaceLike, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
        """Dense 0/1 masks (``dtype``) of the model's widths, per layer for the structures the masks hold."""
        space = as_space(space)
        self.validate(space)
        out = []
        for i, layer in enumerate(self.layers):
            entry = {}
            for s, idx in layer.items():
                m = torch.zeros(space.size(i, s), dtype=dtype)
                m[idx] = 1
                entry[s] = m
            out.append(entry)
        return out

    def to_config(self, space: SpaceLike) -> dict:
        """Compact JSON form for ``config.json``: one hex bitmask string per set (bit j set ⇔ j kept), with the
        widths (``hidden`` / ``ffn`` / ``kv_groups`` for the built-in layout, the whole space otherwise)."""
        space = as_space(space)
        self.validate(space)
        layers = []
        for i, layer in enumerate(self.layers):
            entry = {}
            for s, idx in layer.items():
                bits = torch.zeros(-(-space.size(i, s) // 8) * 8, dtype=torch.bool)
                bits[idx] = True
                packed = (bits.view(-1, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)).sum(1)
                entry[s] = bytes(packed.to(torch.uint8).tolist()).hex()
            layers.append(entry)
        dims = uniform_dims(space)
        if dims is None:
            return {"format": _FORMAT_SPACE, "space": space.as_dict(), "layers": layers}
        out = {"format": _FORMAT_UNIFORM, "hidden": dims.hidden, "ffn": dims.ffn, "layers": layers}
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
        if data["format"] == _FORMAT_UNIFORM:
            dims = ModelDims(len(data["layers"]), int(data["hidden"]), int(data["ffn"]), int(data.get(KV_GROUPS, 0)))
            space = dims.space().select([KV_GROUPS] if KV_GROUPS in data else [])
        elif data["format"] == _FORMAT_SPACE:
            try:
                space = PrunableSpace.from_dict(data["space"])
            except (KeyError, ValueError) as e:
                raise MaskError(f"disp_masks: its space is not readable ({e})") from None
        else:
            raise MaskError(f"unknown disp_masks format {data['format']!r} (written by a newer dip_ext?)")
        if len(data["layers"]) != space.num_layers:
            raise MaskError(f"disp_masks has {len(data['layers'])} layers but its space {space.num_layers}")
        layers = []
        for i, entry in enumerate(data["layers"]):
            out = {}
            for s in (space.names(i) if data["format"] == _FORMAT_UNIFORM else entry):
                size = space.size(i, s) if s in space.names(i) else 0
                try:
                    raw = torch.tensor(list(bytes.fromhex(entry[s])), dtype=torch.uint8)
                except (KeyError, ValueError, TypeError) as e:
                    raise MaskError(f"disp_masks layer {i} {s}: not a hex bitmask ({e})") from None
                bits = ((raw.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).bool()
                if bits.numel() != -(-size // 8) * 8 or bool(bits[size:].any()):
                    raise MaskError(f"disp_masks layer {i} {s}: bitmask does not match width {size}")
                out[s] = bits.nonzero().reshape(-1)
            layers.append(out)
        return cls(layers).validate(space)

    # ---- checks and summaries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.layers[i]

    def __eq__(self, other) -> bool:
        return isinstance(other, DispMasks) and len(self) == len(other) and all(
            a.keys() == b.keys() and torch.equal(a[s], b[s]) for a, b in zip(self.layers, other.layers) for s in a)

    def validate(self, space: SpaceLike) -> "DispMasks":
        """Raises :class:`MaskError` unless these masks fit a model of prunable space ``space`` (or uniform widths
        ``ModelDims``): every layer holds each structure it declares, optional ones (``kv_groups``) in every
        declaring layer or in none, nothing else, every index in range. Returns self."""
        space = as_space(space)
        if len(self.layers) != space.num_layers:
            raise MaskError(f"masks have {len(self.layers)} layers but the model has {space.num_layers}")
        for name in space.optional_names:
            held = [i for i, layer in enumerate(self.layers) if name in layer]
            declaring = [i for i in range(space.num_layers) if name in space.names(i)]
            if held and held != declaring:
                raise MaskError(f"masks hold {name!r} in layers {held} but the model declares it in layers "
                                f"{declaring}: in every declaring layer or in none")
        for i, layer in enumerate(self.layers):
            names = space.names(i)
            required = [s.name for s in space.layers[i] if not s.optional]
            missing = [s for s in required if s not in layer]
            extra = [k for k in layer if k not in names]
            if missing or extra:
                if extra == [KV_GROUPS] and not missing and not space.has(KV_GROUPS):
                    raise MaskError(f"the masks prune {KV_GROUPS} but the space they are checked against has none "
                                    "(a family that declares no KV groups, or a run that does not prune heads)")
                raise MaskError(f"layer {i}: masks need the keys {required} (optional: "
                                f"{[n for n in names if n not in required]}); missing {missing}, unknown {extra}")
            for s, idx in layer.items():
                size = space.size(i, s)
                if idx.numel() and int(idx.max()) >= size:
                    raise MaskError(f"layer {i} {s}: index {int(idx.max())} is out of range for width {size} "
                                    f"(masks made for another model?)")
        return self

    def widths(self) -> list[dict[str, int]]:
        """Kept width of every set, per layer."""
        return [{s: int(t.numel()) for s, t in layer.items()} for layer in self.layers]

    def summary(self, space: SpaceLike | None = None) -> str:
        """A table of kept widths per layer (``-`` where a layer has no such set; with the full widths when
        ``space`` is given)."""
        keys = self.structures
        head = "layer " + " ".join(f"{s:>9}" for s in keys)
        rows = [head]
        for i, w in enumerate(self.widths()):
            rows.append(f"{i:>5} " + " ".join(f"{w.get(s, '-'):>9}" for s in keys))
        if space is not None:
            space = as_space(space)
            sizes = [{st.name: st.size for st in layer} for layer in space.layers]
            if all(f == sizes[0] for f in sizes):
                rows.append(" full " + " ".join(f"{sizes[0].get(s, '-'):>9}" for s in keys))
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"DispMasks({len(self.layers)} layers)"
