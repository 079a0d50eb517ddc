"""The paper's hypernetwork (Gao et al., NeurIPS 2024, DISP-LLM §3.2; its official code's defaults).

One small network emits the mask logits of every slot (:mod:`dip_ext.selection.slots`: layer-major over the
structures of each layer of a :class:`~dip_ext.space.PrunableSpace`) at once::

    fixed random inputs [n_slots, 32] -> bidirectional GRU (hidden 64) -> LayerNorm(128) -> GELU
        -> one linear head per slot -> logits of that slot's width

The space is the one of the structures pruned (``Budget.space``). The heads of the residual-stream structures
(axis ``"hidden"``) are stored stacked; every other structure has a head of its own, stacked over the layers and
as wide as its widest layer (a layer without the structure does not use its slice). For the built-in families
the network, its parameters and its random draws are the paper's (``w_hidden`` for the four hidden sets, ``w_ffn``
for ``mlp_mid``). An optional structure (``kv_groups``, beyond the paper) adds one fixed input per slot to the
GRU's sequence (in the slot order: a layer's ``kv_groups`` input after its five) and one head (``w_kv``), drawn
after everything else, so the other heads start as without it.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...masks import KV_GROUPS, DispMasks, ModelDims
from ...space import HIDDEN_AXIS, PrunableSpace
from ..slots import flatten

__all__ = ["HyperNetwork"]

_INPUT_DIM, _GRU_HIDDEN = 32, 64
#: parameter-name keys of the built-in structures' heads (``w_ffn``, ``w_kv``): the names earlier releases'
#: checkpoints hold, so that those resume; any other structure's head is named after the structure
_HEAD_KEYS = {"mlp_mid": "ffn", KV_GROUPS: "kv"}


def _as_space(space, heads: Optional[bool]) -> PrunableSpace:
    """The space of the structures pruned, from a PrunableSpace or from a ModelDims and ``heads``."""
    if heads is not None and not isinstance(heads, bool):
        raise ValueError(f"heads must be True, False or None, got {heads!r}")
    if isinstance(space, ModelDims):
        if min(space.num_layers, space.hidden, space.ffn) < 1:
            raise ValueError(f"dims must be a ModelDims with positive sizes, got {space!r}")
        if heads and space.kv_groups < 1:
            raise ValueError(f"heads=True needs dims with KV groups, got {space!r}")
        return space.space().select([KV_GROUPS] if heads else [])
    if not isinstance(space, PrunableSpace):
        raise ValueError(f"space must be a PrunableSpace (or a ModelDims), got {type(space).__name__}")
    if heads is not None and heads != space.has(KV_GROUPS):
        raise ValueError(f"heads={heads} contradicts the space, which {'holds' if space.has(KV_GROUPS) else 'has no'}"
                         f" {KV_GROUPS} (with a PrunableSpace leave heads unset)")
    return space


class HyperNetwork(nn.Module):
    """Emits per-slot mask logits for the structures of ``space`` (the space of the structures pruned, e.g.
    ``Budget.space``; a :class:`~dip_ext.masks.ModelDims` stands for its five DISP sets, plus ``kv_groups`` with
    ``heads=True``).

    The per-slot heads are stored stacked, so one einsum per kind evaluates them all: ``w_hidden [L, n_h, hidden,
    128]`` + ``b_hidden [L, n_h, hidden]`` for the ``n_h`` hidden-axis structures (in order of first appearance),
    and for each other structure ``w_<key> [L, n, 128]`` + ``b_<key> [L, n]`` with ``n`` its largest size over the
    layers (``key`` is ``ffn`` for ``mlp_mid``, ``kv`` for ``kv_groups``, else the structure's name).
    Mathematically one ``nn.Linear`` per slot, initialised like one. Parameters are float32; construction consumes
    no global RNG state (everything comes from ``seed``: the required slots' inputs, the GRU, the hidden heads, the
    other required heads, then per optional structure its inputs and head). ValueError for a bad ``space`` /
    ``seed`` / ``heads``, a structure declared over different axes (or optional in some layers only), or a
    structure name that cannot name a parameter.
    """

    def __init__(self, space: Union[PrunableSpace, ModelDims], seed: int = 0, heads: Optional[bool] = None):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        space = _as_space(space, heads)
        self.space = space
        names = space.all_names
        kinds = {}  # name -> (hidden-axis, optional), which must agree over the layers declaring it
        for layer in space.layers:
            for s in layer:
                kind = (s.axis == HIDDEN_AXIS, s.optional)
                if kinds.setdefault(s.name, kind) != kind:
                    raise ValueError(f"structure {s.name!r} is declared hidden-axis / optional in some layers and "
                                     f"not in others: the hypernetwork stacks one head per structure")
        optional = space.optional_names
        self._hidden = tuple(n for n in names if kinds[n] == (True, False))
        self._own = tuple(n for n in names if n not in self._hidden and n not in optional) + optional
        self._col = {n: k for k, n in enumerate(names)}
        self._key = {n: _HEAD_KEYS.get(n, n) for n in self._own}
        L, d, feat = space.num_layers, space.hidden, 2 * _GRU_HIDDEN
        slots = space.slots()
        required = [k for k, (i, s) in enumerate(slots) if not kinds[s][1]]

        gen = torch.Generator().manual_seed(int(seed))
        pools = [torch.randn(len(required), _INPUT_DIM, generator=gen)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 1)
            self.gru = nn.GRU(_INPUT_DIM, _GRU_HIDDEN, batch_first=True, bidirectional=True)
            self.norm = nn.LayerNorm(feat)
        bound = 1.0 / math.sqrt(feat)  # nn.Linear's default init

        def uniform(*shape):
            return nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1) * bound)

        if self._hidden:
            n_hid = len(self._hidden)
            self.w_hidden, self.b_hidden = uniform(L, n_hid, d, feat), uniform(L, n_hid, d)
        source = {slot: k for k, slot in enumerate(slots[k] for k in required)}  # slot -> row of the inputs
        for name in self._own:
            key = self._key[name]
            if not key.isidentifier() or hasattr(self, f"w_{key}"):
                raise ValueError(f"structure {name!r} cannot name a head parameter (w_{key}): rename it")
            if name in optional:
                having = [(i, s) for i, s in slots if s == name]
                source.update({slot: sum(map(len, pools)) + j for j, slot in enumerate(having)})
                pools.append(torch.randn(len(having), 1, _INPUT_DIM, generator=gen).view(-1, _INPUT_DIM))
            width = max(s.size for layer in space.layers for s in layer if s.name == name)
            setattr(self, f"w_{key}", uniform(L, width, feat))
            setattr(self, f"b_{key}", uniform(L, width))
        # The fixed inputs, in slot order, are a buffer (saved with the state) so a resumed run sees the very
        # same ones.
        self.register_buffer("inputs", torch.cat(pools)[[source[slot] for slot in slots]])
        # Where each layer's structures sit among the GRU's outputs; a row past the last slot (zeros) stands in
        # for a structure the layer lacks.
        pad = [[len(slots)] * len(names) for _ in range(L)]
        for k, (i, s) in enumerate(slots):
            pad[i][self._col[s]] = k
        self._uniform = pad == [list(range(i * len(names), (i + 1) * len(names))) for i in range(L)]
        self.register_buffer("_pad_index", torch.tensor(pad, dtype=torch.int64), persistent=False)

    @property
    def heads(self) -> bool:
        """True when the network learns KV groups (``kv_groups`` is one of its structures)."""
        return self.space.has(KV_GROUPS)

    @property
    def structures(self) -> tuple[str, ...]:
        """Every structure the network emits logits for, in order of first appearance."""
        return self.space.all_names

    def features(self) -> torch.Tensor:
        """``[L, n_structures, 128]`` float32: the GRU features of every layer's structures, columns in the order
        of :attr:`structures` (zeros where a layer lacks a structure)."""
        out, _ = self.gru(self.inputs.unsqueeze(0))
        feats = F.gelu(self.norm(out[0]))
        L = self.space.num_layers
        if self._uniform:  # every layer holds every structure in the same order (the built-in families): a view,
            # so their heads compute exactly what they always did
            return feats.view(L, len(self._col), -1)
        return torch.cat([feats, feats.new_zeros(1, feats.shape[1])])[self._pad_index]

    def forward(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, ``{structure: logits [width] float32}`` for that layer's structures (before the offset)."""
        return self._heads(self.features())

    def flat_logits(self) -> torch.Tensor:
        """All logits as one flat slot-order float32 vector (:func:`dip_ext.selection.slots.flatten` over
        :attr:`space`)."""
        return flatten(self(), self.space)

    def _head(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """The stacked weight and bias of a structure with a head of its own."""
        key = self._key[name]
        return getattr(self, f"w_{key}"), getattr(self, f"b_{key}")

    def _heads(self, feats: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        lh = None
        if self._hidden:
            hid = feats[:, [self._col[n] for n in self._hidden]]
            lh = torch.einsum("lsf,lsdf->lsd", hid, self.w_hidden) + self.b_hidden
        own = {}
        for name in self._own:
            w, b = self._head(name)
            own[name] = torch.einsum("lf,ldf->ld", feats[:, self._col[name]], w) + b
        out = []
        for i, layer in enumerate(self.space.layers):
            out.append({s.name: lh[i, self._hidden.index(s.name)] if s.name in self._hidden
                        else own[s.name][i, :s.size] for s in layer})
        return out

    @torch.no_grad()
    def warm_start(self, masks: DispMasks, offset: float = 3.0, margin: float = 3.0) -> None:
        """Sets the heads so ``logit + offset`` is ``+margin`` on kept and ``-margin`` on dropped dimensions.

        Every head is linear in its (fixed) feature vector f, so this is solved exactly rather than fitted:
        each output row moves by the minimum-norm change ``delta * [f, 1] / (|f|^2 + 1)`` of its weights and
        bias. Masks without one of the network's optional structures (``kv_groups``) keep every unit of it; masks
        holding a structure the network has no head for are refused. ValueError if ``masks`` do not fit this
        network's space or ``margin`` is not a positive number.
        """
        if not isinstance(masks, DispMasks):
            raise ValueError(f"masks must be DispMasks, got {type(masks).__name__}")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
            raise ValueError(f"margin must be a finite number > 0, got {margin!r}")
        if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
            raise ValueError(f"offset must be a finite number, got {offset!r}")
        extra = [s for s in masks.structures if not self.space.has(s)]
        if extra:
            what = "KV groups" if extra == [KV_GROUPS] else f"{extra}"
            raise ValueError(f"masks prune {what} but this hypernetwork has no head for them (its structures: "
                             f"{list(self.structures)})")
        masks.validate(self.space)
        feats = self.features()
        dense = masks.to_masks(self.space)
        current = self._heads(feats)
        denom = feats.pow(2).sum(-1) + 1.0  # [L, n_structures]
        for i, s in self.space.slots():
            k, size = self._col[s], self.space.size(i, s)
            kept = dense[i][s].to(feats.device) if s in dense[i] else torch.ones(size, device=feats.device)
            target = torch.where(kept > 0, margin - offset, -margin - offset)
            delta = (target - current[i][s]) / denom[i, k]
            if s in self._hidden:
                j = self._hidden.index(s)
                self.w_hidden[i, j] += delta[:, None] * feats[i, k][None, :]
                self.b_hidden[i, j] += delta
            else:
                w, b = self._head(s)
                w[i, :size] += delta[:, None] * feats[i, k][None, :]
                b[i, :size] += delta
