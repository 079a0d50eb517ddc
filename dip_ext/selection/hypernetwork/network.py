"""The paper's hypernetwork (Gao et al., NeurIPS 2024, DISP-LLM §3.2; its official code's defaults).

One small network emits the mask logits of every slot (:mod:`dip_ext.selection.slots`: layer-major over
``STRUCTURES``) at once::

    fixed random inputs [5L, 32] -> bidirectional GRU (hidden 64) -> LayerNorm(128) -> GELU
        -> one linear head per slot -> logits of that slot's width

Widths come from :class:`~dip_ext.masks.ModelDims` (residual width ``hidden`` for the four hidden sets, ``ffn``
for ``mlp_mid``). With ``heads=True`` (KV-group pruning, beyond the paper) every layer has a sixth slot,
``kv_groups`` (last in the layer, as in :mod:`~dip_ext.selection.slots` with ``ALL_STRUCTURES``): one more fixed
input per layer in the GRU's sequence ([6L, 32]) and one more per-layer head emitting the layer's ``kv_groups``
logits (one per KV group). Without it the network, its parameters and its random draws are the paper's alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...masks import ALL_STRUCTURES, KV_GROUPS, STRUCTURES, DispMasks, ModelDims
from ..slots import flatten

__all__ = ["HyperNetwork", "HIDDEN_STRUCTURES"]

#: the four sets over the residual width (their heads are stored stacked)
HIDDEN_STRUCTURES = tuple(s for s in STRUCTURES if s != "mlp_mid")
_INPUT_DIM, _GRU_HIDDEN = 32, 64


class HyperNetwork(nn.Module):
    """Emits per-slot mask logits for a model of ``dims``.

    The per-slot heads are stored stacked (``w_hidden [L, 4, hidden, 128]`` + ``b_hidden [L, 4, hidden]`` for the
    hidden sets, ``w_ffn [L, ffn, 128]`` + ``b_ffn [L, ffn]`` for ``mlp_mid``, and with ``heads``
    ``w_kv [L, G, 128]`` + ``b_kv [L, G]`` for ``kv_groups``), so one einsum per kind evaluates them all:
    mathematically one ``nn.Linear`` per slot, initialised like one. Parameters are float32; construction
    consumes no global RNG state (everything comes from ``seed``; the KV slots' inputs and head are drawn after
    everything else, so the other heads start as without ``heads``). ValueError for bad ``dims`` / ``seed``, or
    ``heads`` on dims without KV groups.
    """

    def __init__(self, dims: ModelDims, seed: int = 0, heads: bool = False):
        super().__init__()
        if not isinstance(dims, ModelDims) or min(dims.num_layers, dims.hidden, dims.ffn) < 1:
            raise ValueError(f"dims must be a ModelDims with positive sizes, got {dims!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not isinstance(heads, bool):
            raise ValueError(f"heads must be True or False, got {heads!r}")
        if heads and dims.kv_groups < 1:
            raise ValueError(f"heads=True needs dims with KV groups, got {dims!r}")
        self.dims = dims
        self.heads = heads
        self.structures = ALL_STRUCTURES if heads else STRUCTURES
        n_seq = dims.num_layers * len(STRUCTURES)
        feat = 2 * _GRU_HIDDEN
        gen = torch.Generator().manual_seed(int(seed))
        # The fixed inputs are a buffer (saved with the state) so a resumed run sees the very same ones.
        self.register_buffer("inputs", torch.randn(n_seq, _INPUT_DIM, generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 1)
            self.gru = nn.GRU(_INPUT_DIM, _GRU_HIDDEN, batch_first=True, bidirectional=True)
            self.norm = nn.LayerNorm(feat)
        bound = 1.0 / math.sqrt(feat)  # nn.Linear's default init
        L, d, ffn = dims.num_layers, dims.hidden, dims.ffn

        def uniform(*shape):
            return nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1) * bound)

        n_hid = len(HIDDEN_STRUCTURES)
        self.w_hidden, self.b_hidden = uniform(L, n_hid, d, feat), uniform(L, n_hid, d)
        self.w_ffn, self.b_ffn = uniform(L, ffn, feat), uniform(L, ffn)
        if heads:
            kv_inputs = torch.randn(L, 1, _INPUT_DIM, generator=gen)
            # slot order: each layer's five inputs, then its kv_groups input
            inputs = torch.cat([self.inputs.view(L, len(STRUCTURES), _INPUT_DIM), kv_inputs], 1)
            self.inputs = inputs.view(-1, _INPUT_DIM)
            self.w_kv, self.b_kv = uniform(L, dims.kv_groups, feat), uniform(L, dims.kv_groups)

    def features(self) -> torch.Tensor:
        """``[L, 5, 128]`` (``[L, 6, 128]`` with ``heads``) float32: the GRU features of every slot."""
        out, _ = self.gru(self.inputs.unsqueeze(0))
        return F.gelu(self.norm(out[0])).view(self.dims.num_layers, len(self.structures), -1)

    def forward(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, ``{structure: logits [width] float32}`` (before the offset)."""
        return self._heads(self.features())

    def flat_logits(self) -> torch.Tensor:
        """All logits as one flat slot-order float32 vector (:func:`dip_ext.selection.slots.flatten` over
        :attr:`structures`)."""
        return flatten(self(), self.structures)

    def _heads(self, feats: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        hid = feats[:, [STRUCTURES.index(s) for s in HIDDEN_STRUCTURES]]
        lh = torch.einsum("lsf,lsdf->lsd", hid, self.w_hidden) + self.b_hidden
        lf = torch.einsum("lf,ldf->ld", feats[:, STRUCTURES.index("mlp_mid")], self.w_ffn) + self.b_ffn
        lk = torch.einsum("lf,lgf->lg", feats[:, ALL_STRUCTURES.index(KV_GROUPS)], self.w_kv) + self.b_kv \
            if self.heads else None
        out = []
        for i in range(self.dims.num_layers):
            entry = {s: lh[i, k] for k, s in enumerate(HIDDEN_STRUCTURES)}
            entry["mlp_mid"] = lf[i]
            if lk is not None:
                entry[KV_GROUPS] = lk[i]
            out.append({s: entry[s] for s in self.structures})
        return out

    @torch.no_grad()
    def warm_start(self, masks: DispMasks, offset: float = 3.0, margin: float = 3.0) -> None:
        """Sets the heads so ``logit + offset`` is ``+margin`` on kept and ``-margin`` on dropped dimensions.

        Every head is linear in its (fixed) feature vector f, so this is solved exactly rather than fitted:
        each output row moves by the minimum-norm change ``delta * [f, 1] / (|f|^2 + 1)`` of its weights and
        bias. With ``heads``, masks without ``kv_groups`` keep every group; masks with ``kv_groups`` need a network
        with ``heads``. ValueError if ``masks`` do not fit this network's dims or ``margin`` is not a positive
        number.
        """
        if not isinstance(masks, DispMasks):
            raise ValueError(f"masks must be DispMasks, got {type(masks).__name__}")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
            raise ValueError(f"margin must be a finite number > 0, got {margin!r}")
        if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
            raise ValueError(f"offset must be a finite number, got {offset!r}")
        masks.validate(self.dims)
        if masks.prunes_heads and not self.heads:
            raise ValueError("masks prune KV groups but this hypernetwork has no kv_groups head (heads=False)")
        feats = self.features()
        dense = masks.to_masks(self.dims)
        if self.heads and not masks.prunes_heads:  # every group kept
            dense = [{**m, KV_GROUPS: torch.ones(self.dims.kv_groups)} for m in dense]
        target = [{s: torch.where(m[s].to(feats.device) > 0, margin - offset, -margin - offset)
                   for s in self.structures} for m in dense]
        current = self._heads(feats)
        denom = feats.pow(2).sum(-1) + 1.0  # [L, 5] ([L, 6] with heads)
        for i in range(self.dims.num_layers):
            for k, s in enumerate(self.structures):
                delta = (target[i][s] - current[i][s]) / denom[i, k]
                if s == "mlp_mid":
                    self.w_ffn[i] += delta[:, None] * feats[i, k][None, :]
                    self.b_ffn[i] += delta
                elif s == KV_GROUPS:
                    self.w_kv[i] += delta[:, None] * feats[i, k][None, :]
                    self.b_kv[i] += delta
                else:
                    j = HIDDEN_STRUCTURES.index(s)
                    self.w_hidden[i, j] += delta[:, None] * feats[i, k][None, :]
                    self.b_hidden[i, j] += delta
