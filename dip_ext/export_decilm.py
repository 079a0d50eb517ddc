"""Export to a DeciLM (Nemotron-NAS) folder: the compacted model zero-padded to full-width inputs and outputs, with
its per-layer MLP widths, per-layer KV heads and removed blocks, as ``DeciLMForCausalLM``.

Stock vLLM runs such a folder with its own ``DeciLMForCausalLM`` (``vllm/model_executor/models/nemotron_nas.py``);
transformers runs it through the remote code the folder ships (``configuration_decilm.py`` and ``modeling_decilm.py``,
named by ``auto_map``; transformers itself has no class for this model type), so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it without dip_ext.

What the engines need, and how the export meets it losslessly:

- a removed attention or MLP is a ``no_op`` block; a kept MLP's width is ``intermediate_size`` (never ``ffn_mult``,
  which vLLM would turn into a width of its own);
- vLLM's implementation cannot start with a layer whose attention is ``no_op`` while its MLP is kept (nor end without
  any attention): the first layer that keeps a block (else the last layer) keeps its attention, as a zero attention
  (o_proj all zeros) when the compacted model removed it; the report's notes name the layer;
- Qwen2's q/k/v biases come with a zero o_proj bias (Llama-shaped attention has all four or none);
- pruned KV groups: a DeciLM layer has its own KV heads (``num_attention_heads // n_heads_in_group``) but always
  ``num_attention_heads`` query heads, and its KV heads must divide that count. A layer keeping ``g`` of the dense
  model's ``G`` groups (``n_rep`` query heads each) is written with the smallest ``k >= g`` KV heads that divides
  ``num_attention_heads`` (at most ``G``, which divides it, so every model exports): group ``j`` becomes KV head ``j``
  with its ``n_rep`` query heads first among the ``num_attention_heads / k`` of its new group, the other query heads
  zero (q rows zero, o_proj columns zero: they add nothing) and KV heads ``g … k-1`` zero (only zero query heads read
  them). The logits are the compacted model's; the report's notes name each layer written with padding heads.

What survives, against the compacted model: the per-layer MLP widths, the removed blocks and the per-layer KV heads
(rounded up to a divisor of the query-head count: the KV cache shrinks with the kept groups, exactly where ``g``
divides it); not the residual-subset savings (every block reads and writes the full width) and not the pruned query
heads (each kept attention computes all ``num_attention_heads`` heads, the pruned ones on zeros).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .files import atomic_write_text
from .outputs import OutputFolder
from .zero_pad import ExportReport, PaddedModel, export_report, load_source, pad_model, regroup_heads, zero_attention

__all__ = ["export_decilm", "REMOTE_CODE_FILES", "TOKENIZER_FILES"]

#: the remote-code files a DeciLM folder ships (copied from dip_ext/decilm_code/)
REMOTE_CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
#: the tokenizer files an export copies from the model's folder, where present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
_CODE_DIR = Path(__file__).resolve().parent / "decilm_code"
_WHAT = "a DeciLM folder"


def _attention_biases(padded: PaddedModel) -> tuple[bool, bool]:
    """(attention biases, MLP biases) of the export: Qwen2's q/k/v biases make it an attention with biases (its o_proj
    bias written as zeros)."""
    cfg = padded.config
    if padded.family == "qwen2":
        return True, False
    return bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))


def _kv_heads(kept: int, heads: int) -> int:
    """The fewest KV heads, at least ``kept``, that divide ``heads`` (the query heads every DeciLM layer has)."""
    return next(k for k in range(kept, heads + 1) if heads % k == 0)


def _full_query_heads(padded: PaddedModel, i: int, notes: list[str]) -> tuple[Optional[dict], int]:
    """Layer ``i``'s attention tensors with all ``num_attention_heads`` query heads (:func:`_kv_heads`,
    :func:`~dip_ext.zero_pad.regroup_heads`), and its KV heads; a note where padding heads were added."""
    layer, heads = padded.layers[i], padded.config.num_attention_heads
    if layer.attention is None or layer.num_heads == heads:
        return layer.attention, layer.num_kv_heads
    kept, n_rep = layer.num_kv_heads, layer.num_heads // layer.num_kv_heads
    kv = _kv_heads(kept, heads)
    notes.append(f"layer {i}: keeps {kept} of {padded.config.num_key_value_heads} KV groups; written as {kv} KV heads "
                 f"({kv - kept} zero) of {heads // kv} query heads each, {heads - layer.num_heads} of the {heads} "
                 "query heads zero (a DeciLM layer has every query head, and its KV heads divide their count)")
    return regroup_heads(layer.attention, kept, n_rep, padded.head_dim, kv, heads // kv), kv


def _layers(padded: PaddedModel, notes: list[str]) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """The tensors of every layer (names inside the layer) and its ``block_configs`` entry."""
    cfg = padded.config
    heads, d = cfg.num_attention_heads, cfg.hidden_size
    qkv_bias, mlp_bias = _attention_biases(padded)
    written = [_full_query_heads(padded, i, notes) for i in range(len(padded.layers))]
    kv_default = next((kv for attention, kv in written if attention is not None), cfg.num_key_value_heads)
    first = next((i for i, layer in enumerate(padded.layers) if layer.attention or layer.mlp), len(padded.layers) - 1)
    tensors, blocks = [], []
    for i, layer in enumerate(padded.layers):
        attention, kv = written[i]
        if attention is None and i == first:
            attention, kv = zero_attention(d, heads, kv_default, padded.head_dim, qkv_bias=qkv_bias, o_bias=qkv_bias,
                                           dtype=padded.embed.dtype), kv_default
            notes.append(f"layer {i}: its attention was removed; written as a zero attention (vLLM's DeciLM cannot "
                         "run a kept MLP, or the final norm, before the first attention)")
        attention = dict(attention or {})
        if attention and qkv_bias and "self_attn.o_proj.bias" not in attention:  # Qwen2: q/k/v biases, no o bias
            attention["self_attn.o_proj.bias"] = torch.zeros(d, dtype=padded.embed.dtype)
        tensors.append({**attention, **(layer.mlp or {})})
        blocks.append({"attention": {"no_op": not attention, "n_heads_in_group": heads // (kv or kv_default)},
                       "ffn": {"no_op": layer.mlp is None, "intermediate_size": layer.ffn_width}})
    return tensors, blocks


def _config(padded: PaddedModel, blocks: list[dict], dtype: torch.dtype) -> dict:
    cfg = padded.config
    qkv_bias, mlp_bias = _attention_biases(padded)
    kept = [b["attention"]["n_heads_in_group"] for b in blocks if not b["attention"]["no_op"]]
    kv = cfg.num_attention_heads // kept[0] if kept else cfg.num_key_value_heads
    return {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModel": "modeling_decilm.DeciLMModel",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": kv, "head_dim": padded.head_dim, "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": dict(cfg.rope_parameters or {}), "attention_bias": qkv_bias, "mlp_bias": mlp_bias,
        "attention_dropout": 0.0, "tie_word_embeddings": padded.lm_head is None, "use_cache": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "dtype": str(dtype).removeprefix("torch."), "block_configs": blocks,
    }


def _copy_tokenizer(source: Optional[Path], tokenizer, folder: Path, notes: list[str]) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        return
    copied = [name for name in TOKENIZER_FILES if source is not None and (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, folder / name)
    if not any(name.startswith(("tokenizer", "vocab")) for name in copied):
        notes.append("no tokenizer written (pass tokenizer=, or export from a folder that holds one)")


def export_decilm(model_or_dir: Union[nn.Module, str, os.PathLike], out_dir: Union[str, os.PathLike], *,
                  tokenizer=None, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> ExportReport:
    """Writes ``model_or_dir`` (a compacted model or its saved folder; a dense Llama-shaped model works too) as a
    DeciLM folder ``out_dir`` that stock vLLM and transformers (``trust_remote_code=True``) run, with logits equal to
    the compacted model's to float rounding. Returns what it keeps (:class:`~dip_ext.zero_pad.ExportReport`, also
    written as ``export.json``).

    ``tokenizer``: saved into the folder (default: the tokenizer files of the model's folder, copied); ``dtype``: the
    weights' dtype (default: the model's); ``overwrite``: replace a folder an earlier dip_ext command wrote (never any
    other). The folder is written beside ``out_dir`` and moved into place when complete.

    Raises UnsupportedModelError (one line naming the family) for a model that is not Llama-shaped (Qwen3, Gemma3,
    OPT, Phi), a sliding-window or non-SiLU model, or one whose family's prunable space is not the built-in layout
    (:func:`~dip_ext.zero_pad.check_exportable`); ValueError for an output folder that may not be written;
    FileNotFoundError for a folder without config.json.
    """
    out = OutputFolder(out_dir, command="export", replace=overwrite,
                       inputs={"--model": None if isinstance(model_or_dir, nn.Module) else model_or_dir})
    model, source = load_source(model_or_dir, _WHAT)
    padded = pad_model(model, _WHAT)
    dtype = dtype or padded.embed.dtype
    notes: list[str] = []
    layers, blocks = _layers(padded, notes)
    weights = {"model.embed_tokens.weight": padded.embed, "model.norm.weight": padded.norm}
    if padded.lm_head is not None:
        weights["lm_head.weight"] = padded.lm_head
    for i, layer in enumerate(layers):
        weights.update({f"model.layers.{i}.{name}": t for name, t in layer.items()})
    report = export_report(padded, "decilm", str(out_dir), layers, notes)
    with out.staging() as folder:
        save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        atomic_write_text(folder / "config.json", json.dumps(_config(padded, blocks, dtype), indent=2) + "\n")
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(_CODE_DIR / name, folder / name)
        _copy_tokenizer(source, tokenizer, folder, notes)
        if source is None and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        report.notes = list(notes)
        kept = {k: v for k, v in report.to_dict().items() if k != "path"}  # no local path in a published folder
        atomic_write_text(folder / "export.json", json.dumps(kept, indent=1) + "\n")
    return report
