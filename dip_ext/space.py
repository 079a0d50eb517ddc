"""The prunable space: per decoder layer, the sets a family lets DISP prune and their sizes.

A family adapter declares it (:meth:`dip_ext.families.base.FamilyAdapter.space`); masks, the masked reference,
calibration, slots, the budget, the selection methods and the hypernetwork read it, so a family whose layers differ
(a layer without an MLP, interleaved dense and expert layers) or that prunes a structure of its own (experts)
needs no edit outside its family file and the registry. What a kept element costs in parameters is the family's
:meth:`~dip_ext.families.base.FamilyAdapter.linear_params`, a function of the layer's kept widths.

Every structure indexes an axis: ``"hidden"`` for the residual-stream subsets DISP chooses independently per block
(the scores of all hidden-axis sets share one tied score for the dimension-dependent baseline, and the
hypernetwork stacks their heads), or an axis of its own (``"ffn"``, ``"kv_groups"``, ``"experts"``). An *optional*
structure is pruned only when a run asks for it (KV groups): masks hold it in every layer that declares it, or in
none. A *whole-unit* structure is counted in units that are never rounded to ``multiple_of`` (a KV group, an
expert). A structure whose unit covers several columns of its mask point may be *scored by column*: when a norm
after the mask point makes the block's output blind to a common scale of those columns (Gemma3's norm on the
attention output), the gradient of one mask on a whole unit vanishes, so the unit is scored by the Fisher scores of
its columns, summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["HIDDEN_AXIS", "Structure", "PrunableSpace"]

#: The axis of the residual-stream subsets.
HIDDEN_AXIS = "hidden"


@dataclass(frozen=True)
class Structure:
    """One prunable set of a layer: its ``name`` (the masks' key), ``size`` (the full width: indices lie in
    ``[0, size)``), the ``axis`` it indexes, whether it is ``optional`` / counted in ``whole_units``, and whether its
    units are scored by the columns they cover at the mask point (``column_scores``; see the module docstring)."""

    name: str
    size: int
    axis: str
    optional: bool = False
    whole_units: bool = False
    column_scores: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a structure's name must be a non-empty string, got {self.name!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"structure {self.name!r}: size must be an integer >= 1, got {self.size!r}")
        if not isinstance(self.axis, str) or not self.axis:
            raise ValueError(f"structure {self.name!r}: axis must be a non-empty string, got {self.axis!r}")

    def as_list(self) -> list:
        """``[name, size, axis, optional, whole_units, column_scores]`` (JSON-safe; the inverse is
        ``Structure(*values)``)."""
        return [self.name, self.size, self.axis, self.optional, self.whole_units, self.column_scores]


@dataclass(frozen=True)
class PrunableSpace:
    """The structures of every decoder layer, in the order slots, tables and files list them.

    ``hidden``: the residual width (the size of every ``"hidden"``-axis structure); ``layers[i]``: layer ``i``'s
    structures (a layer may lack one another layer has). Build with :meth:`uniform` or from a family's adapter.
    ValueError for no layers, a name declared twice in a layer, or a hidden-axis structure whose size is not
    ``hidden``.
    """

    hidden: int
    layers: tuple[tuple[Structure, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(tuple(layer) for layer in self.layers))
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {self.hidden!r}")
        if not self.layers:
            raise ValueError("a prunable space needs at least one layer")
        for i, layer in enumerate(self.layers):
            names = [s.name for s in layer]
            if len(set(names)) != len(names):
                raise ValueError(f"layer {i} declares a structure twice: {names}")
            for s in layer:
                if not isinstance(s, Structure):
                    raise ValueError(f"layer {i}: expected Structure entries, got {type(s).__name__}")
                if s.axis == HIDDEN_AXIS and s.size != self.hidden:
                    raise ValueError(f"layer {i} {s.name}: a hidden-axis structure has size hidden={self.hidden}, "
                                     f"got {s.size}")

    @classmethod
    def uniform(cls, num_layers: int, hidden: int, structures: Sequence[Structure]) -> "PrunableSpace":
        """``num_layers`` layers with the same ``structures``."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        return cls(hidden, tuple(tuple(structures) for _ in range(num_layers)))

    # ---- reading ---------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def names(self, i: int) -> tuple[str, ...]:
        """The structure names of layer ``i``, in order."""
        return tuple(s.name for s in self.layers[i])

    @property
    def all_names(self) -> tuple[str, ...]:
        """Every structure name of any layer, in order of first appearance."""
        return tuple(dict.fromkeys(s.name for layer in self.layers for s in layer))

    @property
    def optional_names(self) -> tuple[str, ...]:
        """The optional structures (pruned only when a run asks)."""
        return tuple(dict.fromkeys(s.name for layer in self.layers for s in layer if s.optional))

    def structure(self, i: int, name: str) -> Structure:
        """Layer ``i``'s structure ``name``; KeyError naming the layer's structures when it has none."""
        for s in self.layers[i]:
            if s.name == name:
                return s
        raise KeyError(f"layer {i} has no structure {name!r} (it has {list(self.names(i))})")

    def size(self, i: int, name: str) -> int:
        """The full width of layer ``i``'s structure ``name``."""
        return self.structure(i, name).size

    def has(self, name: str) -> bool:
        """True when some layer declares ``name``."""
        return name in self.all_names

    def axis_names(self, i: int, axis: str) -> tuple[str, ...]:
        """Layer ``i``'s structures over ``axis`` (e.g. :data:`HIDDEN_AXIS`)."""
        return tuple(s.name for s in self.layers[i] if s.axis == axis)

    def full_widths(self) -> list[dict[str, int]]:
        """Per layer, ``{structure: full width}``."""
        return [{s.name: s.size for s in layer} for layer in self.layers]

    # ---- the structures a run prunes -------------------------------------------------------------------------
    def select(self, optional: Iterable[str] = ()) -> "PrunableSpace":
        """This space with its required structures and the optional ``optional`` ones (the others dropped).
        ValueError naming an entry that is not an optional structure of this space."""
        chosen = set(optional)
        unknown = sorted(chosen - set(self.optional_names))
        if unknown:
            raise ValueError(f"{unknown} {'is' if len(unknown) == 1 else 'are'} not optional structures of this "
                             f"model's family (optional: {list(self.optional_names) or 'none'})")
        return PrunableSpace(self.hidden, tuple(tuple(s for s in layer if not s.optional or s.name in chosen)
                                                for layer in self.layers))

    def required(self) -> "PrunableSpace":
        """The structures every run prunes (no optional ones)."""
        return self.select(())

    # ---- slots: one (layer, structure) pair per set, layer-major ---------------------------------------------
    def slots(self) -> list[tuple[int, str]]:
        """``[(layer, structure), ...]`` layer-major, each layer's structures in order."""
        return [(i, s.name) for i, layer in enumerate(self.layers) for s in layer]

    def slot_sizes(self) -> torch.Tensor:
        """``[num_slots]`` int64: the full width of every slot."""
        return torch.tensor([s.size for layer in self.layers for s in layer], dtype=torch.int64)

    # ---- persistence ---------------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        """JSON-safe; the inverse is :meth:`from_dict`."""
        return {"hidden": self.hidden, "layers": [[s.as_list() for s in layer] for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "PrunableSpace":
        """Inverse of :meth:`as_dict`; ValueError for a malformed entry."""
        try:
            return cls(int(data["hidden"]), tuple(tuple(Structure(*s) for s in layer) for layer in data["layers"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a prunable space: {e}") from None

    def __repr__(self) -> str:
        kinds = dict.fromkeys(self.names(i) for i in range(self.num_layers))
        desc = "; ".join(", ".join(k) for k in kinds)
        return f"PrunableSpace({self.num_layers} layers, hidden={self.hidden}: {desc})"
