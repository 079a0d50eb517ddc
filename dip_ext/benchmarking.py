"""What a speed benchmark of compacted models needs besides the models: random weights of real shapes, random masks
of realistic per-layer widths that meet a parameter budget, and the "same-widths dense" floor.

- :func:`random_llama`: a ``LlamaForCausalLM`` of any shape with random weights, built directly on the device
  in the dtype (no checkpoint needed, e.g. Llama-2-7B shapes on a GPU).
- :func:`random_budget_widths` / :func:`random_masks`: speed does not depend on WHICH dimensions are kept, only
  on how many per block; learned DISP masks vary by layer and structure, so the widths are jittered
  (log-normal) around a common keep fraction and rounded by the project's one budget fitter
  (:func:`dip_ext.selection.budget.fit_layer_widths`), so they meet the budget exactly as a selection method's.
- :func:`same_widths`: runs a compacted Llama-family model with every index set replaced by the prefix
  ``[0, k)``: the same weights and GEMM shapes, no gather, no scatter. Its outputs are meaningless; its speed
  is that of a dense model with these per-block widths, the floor the compacted model is measured against.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from .families.llama_style import LlamaStyleLayer
from .masks import KV_GROUPS, DispMasks, SpaceLike, as_space
from .selection.budget import Budget, fit_layer_widths, unit_steps

__all__ = ["random_llama", "random_budget_widths", "random_masks", "same_widths"]


def random_llama(shape: dict, dtype: torch.dtype, device, seed: int) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM(LlamaConfig(**shape))`` in eval mode with sdpa attention, its random weights
    (``torch.manual_seed(seed)``, transformers' initialisation) created directly on ``device`` in ``dtype``."""
    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def random_budget_widths(model, ratio: float, multiple_of: int, spread: float, seed: int,
                         ratio_of: str = "decoder_linear", kv_ratio: Optional[float] = None) -> list[dict[str, int]]:
    """Per-layer kept widths of the dense ``model`` that remove ``ratio`` of its parameters (``ratio_of``, as in
    :class:`~dip_ext.selection.budget.Budget`), jittered per layer and structure of the budget's prunable space
    (``budget.space``: each layer's own structures).

    Set ``s`` of layer ``i`` (full size ``n``) gets ``floor(c * j[i, s] * n)``, clamped to
    ``[min(step, n), n]`` (``step``: ``multiple_of``, or 1 for a whole-unit structure such as experts), with
    ``j = exp(spread * N(0, 1))`` (``torch.Generator`` seeded with ``seed``, one draw per slot in the space's slot
    order) and the common scale ``c`` the largest (bisected) at which the budget is met. Those widths are then
    rounded by :func:`~dip_ext.selection.budget.fit_layer_widths` (down to multiples of ``multiple_of`` or ``n``,
    whole chunks added back, larger ``j`` first, while any fits), so the result never exceeds the budget and no
    single further chunk would fit. Every width is at least ``min(step, n)``. With ``kv_ratio`` the widths also
    hold ``kv_groups``: the most groups a KV-cache target of ``kv_ratio`` allows (:class:`Budget`), spread evenly
    over the layers that have KV groups (the layers that get one more chosen at random), fixed before the other
    widths are fitted.
    ValueError for a ratio outside (0, 1), a compacted model, or a budget the minimal widths already exceed.
    """
    budget = Budget.for_model(model, ratio, ratio_of, kv_ratio=kv_ratio)
    space = budget.space
    # the jittered slots: every structure but the KV groups, whose counts the KV-cache target fixes
    free = [(i, s) for i, s in space.slots() if s != KV_GROUPS]
    steps = unit_steps(space, multiple_of)
    sizes = {(i, s): space.size(i, s) for i, s in free}
    lowest = {(i, s): min(int(step), space.size(i, s)) for (i, s), step in zip(space.slots(), steps.tolist())
              if s != KV_GROUPS}
    groups: dict[int, int] = {}
    if kv_ratio is not None:
        holders = [i for i in range(space.num_layers) if KV_GROUPS in space.names(i)]
        kept, n = budget.kv_groups_kept, len(holders)
        extra = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))[:kept % n].tolist())
        groups = {i: kept // n + int(j in extra) for j, i in enumerate(holders)}
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.exp(spread * torch.randn(len(free), generator=gen, dtype=torch.float64))
    factor = {slot: float(jitter[k]) for k, slot in enumerate(free)}

    def widths_at(scale: float) -> list[dict[str, int]]:
        out: list[dict[str, int]] = [{} for _ in range(space.num_layers)]
        for i, s in space.slots():  # each layer's structures in the space's order
            slot = (i, s)
            out[i][s] = groups[i] if s == KV_GROUPS else \
                max(lowest[slot], min(sizes[slot], int(scale * factor[slot] * sizes[slot])))
        return out

    def meets(scale: float) -> bool:
        return budget.kept_linear(widths_at(scale)) <= budget.target_linear

    if not meets(0.0):
        raise ValueError(f"removing {100 * ratio:g} % leaves less than every set at its minimal width "
                         f"({multiple_of}); lower the ratio or multiple_of")
    lo, hi = 0.0, 1.0 / float(jitter.min())
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    priority: list[dict[str, float]] = [{} for _ in range(space.num_layers)]
    for (i, s), f in factor.items():
        priority[i][s] = f
    return fit_layer_widths(budget, widths_at(lo), multiple_of, priority)


def random_masks(widths: Sequence[dict[str, int]], space: SpaceLike, seed: int) -> DispMasks:
    """DispMasks whose set ``s`` of layer ``i`` is a uniformly random sorted subset of ``widths[i][s]`` of the
    set's full size in ``space`` (the model's prunable space, or the ``ModelDims`` of a built-in layout)
    (``torch.Generator`` seeded with ``seed + 1``, drawn layer by layer)."""
    space = as_space(space)
    gen = torch.Generator().manual_seed(seed + 1)
    return DispMasks([{s: torch.randperm(space.size(i, s), generator=gen)[:k].sort().values for s, k in w.items()}
                      for i, w in enumerate(widths)])


def _same_widths_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A compacted Llama layer with every index set replaced by ``[0, k)``: narrow views, no gather, no scatter."""
    x = hidden_states
    d = x.shape[-1]
    if self.self_attn is not None:
        norm = self.input_layernorm
        h = F.rms_norm(x, (d,), norm.weight, norm.variance_epsilon)[..., :norm.idx.numel()]
        a, _ = self.self_attn(hidden_states=h, **kwargs)
        x[..., :a.shape[-1]].add_(a)
    else:
        self.skip_attention(x, kwargs)
    if self.mlp is not None:
        norm = self.post_attention_layernorm
        h = F.rms_norm(x, (d,), norm.weight, norm.variance_epsilon)[..., :norm.idx.numel()]
        y = self.mlp(h)
        x[..., :y.shape[-1]].add_(y)
    return x


@contextlib.contextmanager
def same_widths(model) -> Iterator[torch.nn.Module]:
    """While open, ``model`` (a compacted Llama-family model) runs as its same-widths dense floor.

    Every compacted layer reads ``F.rms_norm(x)[..., :k]`` (a narrow view of the norm output: the GEMM reads it
    with a leading dimension of d, no gather kernel) and adds its output in place into ``x[..., :k]`` (no
    scatter, no copy of the layer input): exactly the compacted model's GEMMs and no index data movement. The
    outputs are meaningless (wrong columns); only the speed counts. On exit every layer's own forward is back.
    ValueError when ``model`` has no compacted Llama-family layer.
    """
    layers = [m for m in model.modules() if isinstance(m, LlamaStyleLayer)]
    if not layers:
        raise ValueError("same_widths needs a compacted Llama-family model (no LlamaStyleLayer found)")
    for layer in layers:
        layer.forward = types.MethodType(_same_widths_forward, layer)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward
