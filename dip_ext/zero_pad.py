"""A compacted model zero-padded back to full-width inputs and outputs: what the exports for engines that cannot run
index sets (DeciLM folders, GGUF files) write, and what such an export keeps.

Each kept block's input linears (q/k/v, gate/up) get zero columns outside its input set (``attn_in`` / ``mlp_in``),
its output linear (o_proj, down) zero rows outside its output set (``attn_out`` / ``mlp_out``), biases included. The
norm before a block runs over the full residual width in the compacted model too, so the padded layer computes the
same function (lossless, to float rounding); what survives is the per-layer MLP width (``|mlp_mid|``), the per-layer
heads and the removed blocks, not the residual-subset savings. Only LLaMA-shaped families pad into a LLaMA-shaped
engine model (RMSNorm, gated SiLU MLP, rotary attention, full attention in every layer), and only with the built-in
prunable layout (the five DISP sets in every layer, optional KV groups: :func:`dip_ext.masks.uniform_dims`);
:func:`check_exportable` refuses the others in one line.

Heads: a model compacted with KV groups (``kv_groups`` in its masks) keeps, per layer, whole groups: ``g`` KV heads and
``g · n_rep`` query heads (``n_rep`` = the dense model's query heads per KV head), the query heads of kept group ``j``
at ``j · n_rep …`` (transformers' ``repeat_kv`` order). :class:`PaddedLayer` carries both counts as the compacted
layer has them. An engine that takes per-layer query and KV heads (llama.cpp's ``deci``) writes them as they are; one
with a fixed number of query heads (vLLM's ``DeciLMForCausalLM``) re-lays them with :func:`regroup_heads`: zero query
heads (q rows and o_proj columns zero, so they add nothing) fill each group up, zero KV heads (read only by zero query
heads) fill the groups up to a count the engine can express.

A dense model of such a family pads to itself (every index set full).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .errors import UnsupportedModelError
from .families import adapter_for, base_model_type, is_compacted
from .masks import KV_GROUPS, DispMasks, uniform_dims
from .modeling import from_pretrained
from .params import param_report

__all__ = ["EXPORTABLE_FAMILIES", "PaddedLayer", "PaddedModel", "ExportReport", "check_exportable", "export_report",
           "load_source", "pad_model", "regroup_heads", "zero_attention", "zero_mlp"]

#: families whose layers are LLaMA-shaped (their biases: Qwen2's q/k/v only; Llama's optional q/k/v/o and MLP)
EXPORTABLE_FAMILIES = ("llama", "mistral", "qwen2")
#: why each other family cannot be padded into a LLaMA-shaped model
_NOT_LLAMA_SHAPED = {
    "qwen3": "its attention normalises q and k per head (q_norm / k_norm), which LLaMA-shaped engine models lack",
    "gemma3_text": "its sandwich norms, (1 + w) RMSNorm scale, GELU MLP and sliding-window layers are not LLaMA-shaped",
    "opt": "it uses LayerNorm with biases, learned positions and a ReLU MLP, not LLaMA's RMSNorm / rotary / SwiGLU",
    "phi": "its parallel block, LayerNorm with biases and partial rotary embedding are not LLaMA-shaped",
}


def check_exportable(config, what: str) -> None:
    """Raises UnsupportedModelError, one line naming the family and ``what`` (e.g. "a DeciLM folder"), unless a
    model of ``config`` pads into a LLaMA-shaped model: a Llama / Mistral / Qwen2 model with SiLU MLP and full
    attention in every layer, whose family's prunable space is the built-in layout (the padding knows only the
    five DISP sets and KV groups, in every layer)."""
    family = base_model_type(config)
    try:
        space = adapter_for(config).space(config)
    except UnsupportedModelError:
        space = None  # a family dip_ext does not know: refused below, naming it
    if space is not None and uniform_dims(space) is None:
        raise UnsupportedModelError(f"cannot export a {family.removesuffix('_text')} model as {what}: the export "
                                    "pads only the built-in prunable layout (attn_in, attn_out, mlp_in, mlp_mid, "
                                    "mlp_out of the same widths, and optional kv_groups, in every layer), and this "
                                    f"model's family declares {space}")
    if family not in EXPORTABLE_FAMILIES:
        reason = _NOT_LLAMA_SHAPED.get(family, "dip_ext does not know how to pad it into a LLaMA-shaped model")
        raise UnsupportedModelError(f"cannot export a {family.removesuffix('_text')} model as {what}: {reason}; "
                                    f"exportable families: {', '.join(EXPORTABLE_FAMILIES)}")
    act = getattr(config, "hidden_act", None)
    if act != "silu":
        raise UnsupportedModelError(f"cannot export a {family} model with hidden_act {act!r} as {what}: LLaMA-shaped "
                                    "engine models run a SiLU-gated MLP")
    layer_types = set(getattr(config, "layer_types", None) or [])
    sliding = (family == "mistral" and getattr(config, "sliding_window", None) is not None) or \
        (layer_types - {"full_attention"})
    if sliding:
        raise UnsupportedModelError(f"cannot export a {family} model with sliding-window attention as {what}: the "
                                    "exported model would attend to the whole context (set sliding_window=None only "
                                    "if the model never sees longer inputs than its window)")


def load_source(model_or_dir: Union[nn.Module, str, os.PathLike], what: str) -> tuple[nn.Module, Optional[Path]]:
    """The model an export reads, and its folder (None for a model object). A folder (compacted by dip_ext, or a dense
    model) is loaded in its saved dtype on the CPU, after its family is checked from config.json (so a model that
    cannot be exported is refused before it loads). FileNotFoundError without a config.json."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir, None
    folder = Path(model_or_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: name a folder holding a model saved by dip_ext (or a "
                                "dense Hugging Face model)")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    family = raw.get("disp_base_model_type") or raw.get("model_type")
    if family not in EXPORTABLE_FAMILIES:
        check_exportable(type("Config", (), {"model_type": family})(), what)
    if "disp_masks" in raw:
        return from_pretrained(folder, dtype="auto").eval(), folder
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval(), folder


@dataclass
class PaddedLayer:
    """One decoder layer at full residual width. ``attention`` / ``mlp``: Hugging Face names inside the layer
    (``self_attn.q_proj.weight``, ``input_layernorm.weight``, ``mlp.gate_proj.weight``, ...) to tensors, or None for a
    removed block; ``num_heads`` / ``num_kv_heads``: the layer's query / key-value heads as the compacted layer keeps
    them (fewer than the dense model's where KV groups were pruned; 0 when the attention is removed); ``ffn_width``:
    rows of gate/up (0 when removed)."""

    attention: Optional[dict[str, torch.Tensor]]
    mlp: Optional[dict[str, torch.Tensor]]
    num_kv_heads: int
    ffn_width: int
    num_heads: int = 0


@dataclass
class PaddedModel:
    """A zero-padded model: its dense config (family, widths, heads), the embedding, final norm and lm_head (None when
    tied to the embedding), and its layers. ``compacted``: the source was compacted (else it was dense)."""

    config: object
    family: str
    head_dim: int
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: Optional[torch.Tensor]
    layers: list[PaddedLayer]
    compacted: bool
    source_params: dict = field(default_factory=dict)


def _padded(weight: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor], shape) -> torch.Tensor:
    """``weight`` placed at ``rows`` x ``cols`` (None: all, in order) of a zero tensor of ``shape`` (a vector: rows
    only), on the CPU."""
    weight = weight.detach().cpu()
    out = weight.new_zeros(shape)
    rows = torch.arange(shape[0]) if rows is None else rows
    if weight.dim() == 1:
        out[rows] = weight
    else:
        out[rows[:, None], torch.arange(shape[1]) if cols is None else cols] = weight
    return out


def _linear(module: nn.Linear, prefix: str, rows, cols, out_features: int, in_features: int) -> dict:
    tensors = {f"{prefix}.weight": _padded(module.weight, rows, cols, (out_features, in_features))}
    if module.bias is not None:
        tensors[f"{prefix}.bias"] = _padded(module.bias, rows, None, (out_features,))
    return tensors


def zero_attention(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool, o_bias: bool,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An attention block whose output is exactly zero (o_proj all zeros; q/k/v zeros too), with a unit norm weight:
    what an export puts where an engine cannot run a layer without attention."""
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    out = {"input_layernorm.weight": torch.ones(hidden, dtype=dtype)}
    for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        out[f"self_attn.{name}.weight"] = torch.zeros(rows, hidden, dtype=dtype)
        if qkv_bias:
            out[f"self_attn.{name}.bias"] = torch.zeros(rows, dtype=dtype)
    out["self_attn.o_proj.weight"] = torch.zeros(hidden, q, dtype=dtype)
    if o_bias:
        out["self_attn.o_proj.bias"] = torch.zeros(hidden, dtype=dtype)
    return out


def zero_mlp(hidden: int, width: int, *, bias: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A gated MLP of ``width`` channels whose output is exactly zero (every weight zero), with a unit norm weight."""
    out = {"post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
           "mlp.gate_proj.weight": torch.zeros(width, hidden, dtype=dtype),
           "mlp.up_proj.weight": torch.zeros(width, hidden, dtype=dtype),
           "mlp.down_proj.weight": torch.zeros(hidden, width, dtype=dtype)}
    if bias:
        out.update({"mlp.gate_proj.bias": torch.zeros(width, dtype=dtype),
                    "mlp.up_proj.bias": torch.zeros(width, dtype=dtype),
                    "mlp.down_proj.bias": torch.zeros(hidden, dtype=dtype)})
    return out


def _heads_of(attn: nn.Module, i: int, idx: dict[str, torch.Tensor], head_dim: int, n_rep: int) -> tuple[int, int]:
    """(query heads, KV heads) of a compacted (or dense) attention: whole KV groups, ``n_rep`` query heads each, as
    many as its masks keep (all without ``kv_groups``). ValueError, one line, for any other shape (an attention
    whose heads no engine could run as the compacted model does)."""
    q_rows, kv_rows = attn.q_proj.out_features, attn.k_proj.out_features
    kv = kv_rows // head_dim
    expected = idx[KV_GROUPS].numel() if KV_GROUPS in idx else None
    if kv_rows % head_dim or q_rows != kv * n_rep * head_dim or attn.v_proj.out_features != kv_rows or \
            attn.o_proj.in_features != q_rows or (expected is not None and kv != expected):
        raise ValueError(f"cannot export layer {i}: its attention keeps {q_rows} query rows and {kv_rows} key rows, "
                         f"not whole KV groups of {n_rep} query heads and one KV head of {head_dim} "
                         f"(its masks keep {'every group' if expected is None else f'{expected} groups'})")
    return kv * n_rep, kv


def _pad_layer(layer: nn.Module, i: int, idx: dict[str, torch.Tensor], config, head_dim: int,
               n_rep: int) -> PaddedLayer:
    """A compacted (or dense) layer padded; a removed block (its module None in a compacted layer) stays None. A kept
    MLP without channels (its output bias alone) gets one zero channel: engines need a width. The attention keeps the
    compacted layer's heads (:func:`_heads_of`)."""
    d = config.hidden_size
    attention = mlp = None
    num_heads = num_kv = 0
    attn = getattr(layer, "self_attn", None)
    if attn is not None:
        num_heads, num_kv = _heads_of(attn, i, idx, head_dim, n_rep)
        q, kv = num_heads * head_dim, num_kv * head_dim
        a_in, a_out = idx["attn_in"], idx["attn_out"]
        attention = {"input_layernorm.weight": layer.input_layernorm.weight.detach().cpu().clone()}
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            attention.update(_linear(getattr(attn, name), f"self_attn.{name}", None, a_in, rows, d))
        attention.update(_linear(attn.o_proj, "self_attn.o_proj", a_out, None, d, q))
    block = getattr(layer, "mlp", None)
    width = 0
    if block is not None:
        m_in, m_out = idx["mlp_in"], idx["mlp_out"]
        kept = torch.arange(idx["mlp_mid"].numel())
        width = max(kept.numel(), 1)
        mlp = {"post_attention_layernorm.weight": layer.post_attention_layernorm.weight.detach().cpu().clone()}
        for name in ("gate_proj", "up_proj"):
            mlp.update(_linear(getattr(block, name), f"mlp.{name}", kept, m_in, width, d))
        mlp.update(_linear(block.down_proj, "mlp.down_proj", m_out, kept, d, width))
    return PaddedLayer(attention, mlp, num_kv, width, num_heads)


def regroup_heads(attention: dict[str, torch.Tensor], num_kv_heads: int, n_rep: int, head_dim: int,
                  new_kv_heads: int, new_n_rep: int) -> dict[str, torch.Tensor]:
    """A padded attention's tensors (:class:`PaddedLayer`) re-laid for ``new_kv_heads`` KV heads of ``new_n_rep``
    query heads each, losslessly: KV head ``j`` keeps its place, its ``n_rep`` query heads move to the first places
    of its new group (``j · new_n_rep …``); the other query heads get zero q rows (and biases) and zero o_proj
    columns, the KV heads from ``num_kv_heads`` on zero k / v rows. A zero o_proj column adds nothing, and only those
    heads read the zero KV heads, so the attention's output is unchanged. Needs ``new_kv_heads >= num_kv_heads`` and
    ``new_n_rep >= n_rep``; other tensors (norm weight, o_proj bias) are passed on."""
    if new_kv_heads < num_kv_heads or new_n_rep < n_rep:
        raise ValueError(f"cannot re-lay {num_kv_heads} KV heads of {n_rep} query heads as {new_kv_heads} of "
                         f"{new_n_rep}: every head must keep a place")
    heads = torch.arange(num_kv_heads * n_rep)
    q_heads = heads // n_rep * new_n_rep + heads % n_rep  # the new place of every query head
    q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    kv_rows = torch.arange(num_kv_heads * head_dim)
    q_out, kv_out = new_kv_heads * new_n_rep * head_dim, new_kv_heads * head_dim
    out = dict(attention)
    for name, t in attention.items():
        module, _, kind = name.rpartition(".")
        rows = {"self_attn.q_proj": (q_rows, q_out), "self_attn.k_proj": (kv_rows, kv_out),
                "self_attn.v_proj": (kv_rows, kv_out)}.get(module)
        if rows is not None:
            out[name] = _padded(t, rows[0], None, (rows[1], *t.shape[1:]))
        elif module == "self_attn.o_proj" and kind == "weight":
            out[name] = _padded(t.T, q_rows, None, (q_out, t.shape[0])).T.contiguous()
    return out


def pad_model(model: nn.Module, what: str) -> PaddedModel:
    """The zero-padded form of ``model`` (compacted, or dense) of an exportable family, its tensors copies in the
    model's dtype on the CPU. Raises UnsupportedModelError (see :func:`check_exportable`; ``what`` names the export
    in the message)."""
    config = model.config
    check_exportable(config, what)
    adapter = adapter_for(model)
    masks = DispMasks.from_config(config.disp_masks) if is_compacted(model) else \
        DispMasks.full(adapter.space(config))
    shapes = adapter.shapes(config)
    head_dim = shapes.q_out // config.num_attention_heads
    n_rep = config.num_attention_heads // shapes.kv_heads
    layers = [_pad_layer(layer, i, masks[i], config, head_dim, n_rep)
              for i, layer in enumerate(adapter.decoder_layers(model))]
    base = model.model
    tied = bool(getattr(config, "tie_word_embeddings", False))
    lm_head = None if tied else model.lm_head.weight.detach().cpu().clone()
    report = param_report(model)
    source = {"total": report.total, "decoder_linear": report.decoder_linear, "dense_total": report.dense_total,
              "dense_decoder_linear": report.dense_decoder_linear}
    return PaddedModel(config, base_model_type(config), head_dim, base.embed_tokens.weight.detach().cpu().clone(),
                       base.norm.weight.detach().cpu().clone(), lm_head, layers, is_compacted(model), source)


@dataclass
class ExportReport:
    """What an export keeps, against the compacted model it was made from and the dense original.

    ``params`` / ``decoder_linear`` / ``linear_flops``: ``{"export": n, "compacted": n, "dense": n}`` of stored
    parameters (tied weights once), decoder-linear parameters (q/k/v/o and MLP weights and biases) and linear FLOPs per
    token (2 per weight of the decoder linears and the lm_head); ``kv_cache``: key and value entries cached per token
    of context (2 · KV heads · head_dim, summed over the layers that keep an attention). The export counts what its
    file stores and its engine caches, zeros included: padding, and any zero block an engine needs (``notes`` say
    where). ``ffn_widths`` / ``query_heads`` / ``kv_heads``: per layer, as written (0: block removed).
    """

    format: str
    path: str
    params: dict[str, int]
    decoder_linear: dict[str, int]
    linear_flops: dict[str, int]
    ffn_widths: list[int]
    kv_heads: list[int]
    notes: list[str] = field(default_factory=list)
    query_heads: list[int] = field(default_factory=list)
    kv_cache: dict[str, int] = field(default_factory=dict)

    def kept(self, what: str, of: str = "dense") -> float:
        """The fraction of ``of``'s (dense or compacted) ``what`` (params, decoder_linear, linear_flops, kv_cache) the
        export keeps."""
        counts = getattr(self, what)
        return counts["export"] / counts[of] if counts[of] else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A few lines for people: each count of the export against the compacted and the dense model."""
        rows = [f"exported {self.format} to {self.path}",
                f"{'':28}{'export':>14}{'compacted':>14}{'dense':>14}  export/dense  export/compacted"]
        for key, label in (("params", "parameters"), ("decoder_linear", "decoder-linear parameters"),
                           ("linear_flops", "linear FLOPs per token"), ("kv_cache", "KV-cache values per token")):
            c = getattr(self, key)
            if not c:
                continue
            rows.append(f"{label:28}{c['export']:>14,}{c['compacted']:>14,}{c['dense']:>14,}"
                        f"  {100 * self.kept(key):>11.1f} %  {100 * self.kept(key, 'compacted'):>15.1f} %")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def export_report(padded: PaddedModel, fmt: str, path: str, layers: list[dict[str, torch.Tensor]],
                  notes: list[str]) -> ExportReport:
    """The :class:`ExportReport` of an export of ``padded`` that writes the layer tensors ``layers`` (one dict per
    layer, Hugging Face names inside the layer, zero blocks included) besides the embedding, the final norm and the
    lm_head (when untied)."""
    vocab, d = padded.embed.shape
    linear = sum(t.numel() for layer in layers for name, t in layer.items() if "_proj." in name)
    stored = padded.embed.numel() + padded.norm.numel() + (padded.lm_head.numel() if padded.lm_head is not None else 0)
    stored += sum(t.numel() for layer in layers for t in layer.values())
    src = padded.source_params
    head = 2 * vocab * d
    cfg = padded.config
    rows = [int(layer["self_attn.k_proj.weight"].shape[0]) if "self_attn.k_proj.weight" in layer else 0
            for layer in layers]
    return ExportReport(
        format=fmt, path=str(path),
        params={"export": stored, "compacted": src["total"], "dense": src["dense_total"]},
        decoder_linear={"export": linear, "compacted": src["decoder_linear"], "dense": src["dense_decoder_linear"]},
        linear_flops={"export": 2 * linear + head, "compacted": 2 * src["decoder_linear"] + head,
                      "dense": 2 * src["dense_decoder_linear"] + head},
        ffn_widths=[int(layer["mlp.gate_proj.weight"].shape[0]) if "mlp.gate_proj.weight" in layer else 0
                    for layer in layers],
        kv_heads=[r // padded.head_dim for r in rows],
        query_heads=[int(layer["self_attn.q_proj.weight"].shape[0]) // padded.head_dim
                     if "self_attn.q_proj.weight" in layer else 0 for layer in layers],
        kv_cache={"export": 2 * sum(rows),
                  "compacted": 2 * padded.head_dim * sum(layer.num_kv_heads for layer in padded.layers),
                  "dense": 2 * padded.head_dim * cfg.num_key_value_heads * cfg.num_hidden_layers},
        notes=list(notes))
