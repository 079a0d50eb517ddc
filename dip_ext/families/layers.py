"""Mixins shared by every family's compacted decoder layer and by the placeholder of a removed attention.

A family declares ``class DipExt<Family>DecoderLayer(<its layer mixin>, <Family>DecoderLayer)`` and
``class DipExt<Family>SkippedAttention(SkippedAttention, <Family>Attention)``: subclassing the dense classes keeps
Hugging Face tooling working (output recording of ``output_hidden_states`` / ``output_attentions``,
``_no_split_modules``, FSDP wrap policies find modules by class), while the mixins, listed first, supply
``__init__`` and ``forward``; the dense classes' ``__init__`` never runs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..masks import KV_GROUPS
from ..modules import IndexSet, IndexSetsFollowDevice, compact_linear

#: The entry of transformers' attention interface that a removed attention dispatches to (:func:`removed_attention`).
REMOVED_ATTENTION = "dip_ext_removed_attention"


def keeps_attention(attn_out_width) -> bool:
    """A compacted attention is stored iff it writes somewhere (``attn_out`` non-empty)."""
    return attn_out_width > 0


def keeps_mlp(mlp_mid_width, mlp_out_width, out_bias: bool) -> bool:
    """A compacted MLP is stored iff it writes somewhere and has a channel or an output bias to write."""
    return mlp_out_width > 0 and (mlp_mid_width > 0 or out_bias)


def compact_attention(attn: nn.Module, idx: dict[str, torch.Tensor], inputs: tuple[str, ...], output: str) -> nn.Module:
    """Slices the attention module ``attn`` in place and returns it: its ``inputs`` linears (q, k, v) keep the
    columns ``attn_in``, its ``output`` linear the rows ``attn_out`` (with their biases). Heads stay whole; with a
    ``kv_groups`` set, q keeps the rows of the kept groups' query heads and k / v those of their KV heads (biases
    follow), the output linear the matching columns, and a ``num_heads`` attribute (read by OPT's forward) is set
    to the query heads kept. Groups are counted from the module: KV heads = k rows / ``attn.head_dim``."""
    rows = dict.fromkeys(inputs)
    out_cols = None
    groups = idx.get(KV_GROUPS)
    if groups is not None:
        q, k = (getattr(attn, name) for name in inputs[:2])
        head_dim = attn.head_dim
        per_q = q.out_features // (k.out_features // head_dim)
        rows = {inputs[0]: _group_rows(groups, per_q), inputs[1]: _group_rows(groups, head_dim),
                inputs[2]: _group_rows(groups, head_dim)}
        out_cols = rows[inputs[0]]
        if hasattr(attn, "num_heads"):
            attn.num_heads = groups.numel() * per_q // head_dim
    for name in inputs:
        setattr(attn, name, compact_linear(getattr(attn, name), rows=rows[name], cols=idx["attn_in"]))
    setattr(attn, output, compact_linear(getattr(attn, output), rows=idx["attn_out"], cols=out_cols))
    return attn


def _group_rows(groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """The rows ``g·per_group … (g+1)·per_group - 1`` of every kept group ``g`` (sorted int64)."""
    return (groups.unsqueeze(1) * per_group + torch.arange(per_group, device=groups.device)).reshape(-1)


def compact_mlp(owner: nn.Module, idx: dict[str, torch.Tensor], inputs: tuple[str, ...], output: str) -> None:
    """Slices an MLP's linears, attributes of ``owner``, in place: the ``inputs`` linears (gate/up, fc1) keep the
    rows ``mlp_mid`` and the columns ``mlp_in``, the ``output`` linear (down, fc2) the rows ``mlp_out`` and the
    columns ``mlp_mid``; biases follow their rows."""
    for name in inputs:
        setattr(owner, name, compact_linear(getattr(owner, name), rows=idx["mlp_mid"], cols=idx["mlp_in"]))
    setattr(owner, output, compact_linear(getattr(owner, output), rows=idx["mlp_out"], cols=idx["mlp_mid"]))


def cache_from(kwargs: dict):
    """The KV cache a decoder layer was handed (transformers renamed ``past_key_values`` to ``cache`` in 5.2x)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _placeholder_states(cache, layer_idx: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero keys and values, one per token of ``hidden_states``, for a removed attention to append to its entry in
    ``cache``: ``[batch, 1, seq, 1]``, or ``[batch, heads, seq, head_dim]`` where the entry already holds keys /
    values of that shape (a pre-filled prefix, a static cache allocated ahead)."""
    batch, q_len = hidden_states.shape[:2]
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if isinstance(layers, list) and layer_idx < len(layers) else None
    held = (getattr(layer, "keys", None), getattr(layer, "values", None))
    if not getattr(layer, "is_initialized", False):  # a lazily created entry takes the shape of its first update
        held = (None, None)
    return tuple(t.new_zeros(batch, t.shape[1], q_len, t.shape[3]) if isinstance(t, torch.Tensor) and t.dim() == 4
                 else hidden_states.new_zeros(batch, 1, q_len, 1) for t in held)


def removed_attention(module: nn.Module, hidden_states: torch.Tensor,
                      **kwargs) -> tuple[None, Optional[torch.Tensor]]:
    """What a removed attention (``module``, a :class:`SkippedAttention`) does: appends placeholder keys and values
    to its KV-cache entry when it is handed a cache, and returns ``(None, weights)``: no output, and under the eager
    attention implementation (the one that returns attention weights) a ``[batch, 0, q_len, kv_len]`` weights tensor,
    a layer with no heads."""
    batch, q_len = hidden_states.shape[:2]
    kv_len = q_len
    cache = cache_from(kwargs)
    if cache is not None and hasattr(cache, "update"):
        keys, _ = cache.update(*_placeholder_states(cache, module.layer_idx, hidden_states), module.layer_idx)
        kv_len = keys.shape[-2]
    if getattr(module.config, "_attn_implementation", None) != "eager":
        return None, None
    return None, hidden_states.new_zeros(batch, 0, q_len, kv_len)


ALL_ATTENTION_FUNCTIONS.register(REMOVED_ATTENTION, removed_attention)


class SkippedAttention(nn.Module):
    """Where a pruned-away attention was: keeps the layer's KV-cache entry and its ``output_attentions`` slot.

    Caches derive the sequence length from the layers' stored keys (``get_seq_length()`` reads layer 0, the
    attention masks each layer's own entry), so the placeholder appends a zero key and value per token, which
    nothing reads: ``[batch, 1, seq, 1]`` (a few bytes per token instead of a full KV entry), or zeros of the
    heads and head width the entry already holds (prefix tuning's pre-filled prefix, a static cache allocated
    ahead of time), which a concatenation or an in-place copy into it needs. Under the eager attention
    implementation (the one that returns attention weights) it returns a ``[batch, 0, q_len, kv_len]`` weights
    tensor, a layer with no heads, so ``outputs.attentions[i]`` stays layer i's. Its output is None: the layer adds
    nothing. Mixed in before the family's attention class, whose ``__init__`` is not run.

    Like every attention module of a layer, it dispatches through transformers' attention interface (to its own
    entry, :data:`REMOVED_ATTENTION`): engines that find each layer's attention by that dispatch, such as vLLM's
    Transformers backend, then see one attention per layer. vLLM gives it an attention (and a KV-cache entry) that
    is never called.
    """

    def __init__(self, dense_attention: nn.Module):
        nn.Module.__init__(self)
        self.layer_idx = dense_attention.layer_idx
        self.config = dense_attention.config

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[None, Optional[torch.Tensor]]:
        attention_interface = ALL_ATTENTION_FUNCTIONS[REMOVED_ATTENTION]
        return attention_interface(self, hidden_states, **kwargs)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, removed"


class CompactedLayer(IndexSetsFollowDevice):
    """Common state of a compacted decoder layer: the output index sets and the removed-attention placeholder.

    Subclasses call ``super().__init__(dense, idx, skipped_attention_class)`` and then build their blocks; a
    block whose output set is empty holds no weights (its attribute is None). ``attn_out_idx`` /
    ``mlp_out_idx``: the residual columns the attention / MLP output is added into; ``attn_placeholder``: the
    :class:`SkippedAttention` standing in for a removed attention (None while the attention is kept).
    """

    def __init__(self, dense: nn.Module, idx: dict[str, torch.Tensor], skipped_attention_class: type):
        nn.Module.__init__(self)  # not the dense layer's __init__
        self.layer_idx = dense.self_attn.layer_idx
        if hasattr(dense, "attention_type"):  # sliding / full attention, read by the model's forward
            self.attention_type = dense.attention_type
        self.attn_out_idx = IndexSet(idx["attn_out"])
        # a family's layer without an MLP has no mlp_out set: nothing is added there (on the CPU, also when
        # from_pretrained builds the model under a meta-device context)
        self.mlp_out_idx = IndexSet(idx["mlp_out"] if "mlp_out" in idx else torch.empty(0, dtype=torch.long,
                                                                                        device="cpu"))
        self.attn_placeholder = None
        if not keeps_attention(idx["attn_out"].numel()):
            self.attn_placeholder = skipped_attention_class(dense.self_attn)

    def skip_attention(self, hidden_states: torch.Tensor, kwargs: dict) -> None:
        """Runs the placeholder of the removed attention (cache entry, ``output_attentions`` slot)."""
        self.attn_placeholder(hidden_states=hidden_states, **kwargs)
