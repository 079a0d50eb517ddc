"""Export to a GGUF file for llama.cpp: the compacted model zero-padded to full-width inputs and outputs, written
directly with the ``gguf`` package as llama.cpp's ``deci`` architecture, which keeps per-layer MLP widths
(``feed_forward_length``) and per-layer query and KV head counts (``attention.head_count`` /
``attention.head_count_kv``, 0: attention removed). llama.cpp's own converter would round the widths up to multiples of
256.

What survives, against the compacted model: the per-layer MLP widths, the removed blocks, and, where KV groups were
pruned, each layer's query and KV heads exactly as the compacted model keeps them (``g`` groups: ``g`` KV heads and
``g · n_rep`` query heads, which llama.cpp's grouped attention pairs as transformers does: query head ``h`` reads KV
head ``h // n_rep``), so the attention's compute and llama.cpp's KV cache (sized per layer) shrink with the kept
groups; not the residual-subset savings (every block reads and writes the full width).

What llama.cpp's ``deci`` graph needs, and how the export meets it losslessly:

- a layer whose MLP width is 0 is skipped whole, its attention output dropped with it (wrong tokens, silently), and
  a last layer without MLP aborts llama.cpp (it keeps every token's row where the output rows are expected): a removed
  MLP is written as one zero channel (``feed_forward_length`` 1, all weights zero) in a layer that keeps its
  attention, and in the last layer;
- a model whose layer 0 has no heads does not load: a removed attention in layer 0 is written as a zero attention of
  one query and one key/value head (o_proj zeros);
- llama.cpp applies rotary embeddings to interleaved pairs: q/k rows (and q/k biases) are permuted as its converter
  does; ``rope_parameters`` of type default, linear and llama3 are written (llama3 as the ``rope_freqs`` factors).

``quantize``: F32 / F16 / BF16, or a block type the ``gguf`` package quantizes (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) for
every matrix whose rows split into whole blocks (the others are written F16, and the notes say how many; with a
block type every MLP width is first rounded up to a multiple of 32 with zero channels, losslessly, so that down_proj's
rows split too); norms and biases stay F32. Q4_K_M, Q5_K_M and Q6_K come from llama.cpp's own quantizer through llama-cpp-python (installed
separately), run on the F32 file; it picks other types for matrices whose rows do not split into its blocks.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .files import honour_umask
from .gguf_vocab import add_vocab
from .outputs import check_not_input
from .zero_pad import ExportReport, PaddedModel, export_report, load_source, pad_model, zero_attention, zero_mlp

__all__ = ["export_gguf", "QUANTIZE_TYPES", "LLAMA_CPP_TYPES", "MARKER_KEY"]

#: the block of the gguf package's quantization types (Q8_0 … Q5_1), and of llama.cpp's fallbacks for rows that do
#: not split into its 256-blocks: MLP widths are rounded up to it when quantizing
QUANT_BLOCK = 32
#: the values of ``quantize`` the gguf package writes (None: the model's own dtype, F32 / F16 / BF16)
QUANTIZE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
#: the values of ``quantize`` llama.cpp's own quantizer writes (needs llama-cpp-python)
LLAMA_CPP_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
#: the metadata key every GGUF dip_ext writes carries (what ``overwrite`` may replace)
MARKER_KEY = "dip_ext.export"
_WHAT = "a GGUF file"
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _rope_permute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (or a bias) reordered from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _layers(padded: PaddedModel, notes: list[str]) -> tuple[list[dict[str, torch.Tensor]], list[int], list[int]]:
    """Every layer's tensors (Hugging Face names inside the layer, q/k not yet permuted) and its query / KV heads."""
    cfg, d, dtype = padded.config, padded.config.hidden_size, padded.embed.dtype
    attn_bias = padded.family == "qwen2" or bool(getattr(cfg, "attention_bias", False))
    o_bias = padded.family != "qwen2" and attn_bias
    mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    last = len(padded.layers) - 1
    layers, heads, kv_heads = [], [], []
    for i, layer in enumerate(padded.layers):
        attention, n_head, n_kv = layer.attention, layer.num_heads, layer.num_kv_heads
        if attention is None and i == 0:
            attention = zero_attention(d, 1, 1, padded.head_dim, qkv_bias=attn_bias, o_bias=o_bias, dtype=dtype)
            n_head = n_kv = 1
            notes.append("layer 0: its attention was removed; written as a zero attention of one head (llama.cpp "
                         "cannot load a model whose layer 0 has no heads)")
        elif attention is None:
            n_head = n_kv = 0
        mlp = layer.mlp
        if mlp is None and (attention is not None or i == last):
            mlp = zero_mlp(d, 1, bias=mlp_bias, dtype=dtype)
            notes.append(f"layer {i}: its MLP was removed; written as one zero channel (llama.cpp skips a layer "
                         "without MLP channels whole)")
        layers.append({**(attention or {}), **(mlp or {})})
        heads.append(n_head)
        kv_heads.append(n_kv)
    return layers, heads, kv_heads


def _round_mlp_widths(layers: list[dict[str, torch.Tensor]], block: int, notes: list[str]) -> None:
    """Appends zero channels (gate/up rows, down_proj columns) to every MLP whose width is not a multiple of
    ``block``, in place: lossless (SiLU(0) · 0 = 0), and down_proj's rows then split into quantization blocks
    instead of falling back to F16 (slower in llama.cpp, and larger)."""
    rounded = 0
    for layer in layers:
        gate = layer.get("mlp.gate_proj.weight")
        extra = -gate.shape[0] % block if gate is not None else 0
        if not extra:
            continue
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias"):
            if name in layer:
                layer[name] = torch.cat([layer[name], layer[name].new_zeros((extra, *layer[name].shape[1:]))])
        down = layer["mlp.down_proj.weight"]
        layer["mlp.down_proj.weight"] = torch.cat([down, down.new_zeros(down.shape[0], extra)], 1)
        rounded += 1
    if rounded:
        notes.append(f"{rounded} MLP widths rounded up to multiples of {block} with zero channels (lossless), so "
                     "every down_proj quantizes")


def _rope(writer, padded: PaddedModel, tensors: dict) -> None:
    params = dict(getattr(padded.config, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "llama3":  # as llama.cpp's converter: per-frequency factors in rope_freqs
        dim, base = padded.head_dim, float(params.get("rope_theta", 10000.0))
        factor, low, high = params.get("factor", 8.0), params.get("low_freq_factor", 1.0), params.get(
            "high_freq_factor", 4.0)
        old = params.get("original_max_position_embeddings", 8192)
        factors = []
        for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
            wavelen = 2 * math.pi / float(freq)
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1.0 if wavelen < old / high else factor if wavelen > old / low else
                           1 / ((1 - smooth) / factor + smooth))
        tensors["rope_freqs.weight"] = torch.tensor(factors, dtype=torch.float32)
    elif kind != "default":
        raise ValueError(f"cannot write rope_type {kind!r} to GGUF (default, linear and llama3 are written): "
                         "export as --to decilm")


def _qtype(quantize: Optional[str], dtype: torch.dtype):
    import gguf

    name = quantize or {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}.get(dtype, "f32")
    qtype = getattr(gguf.GGMLQuantizationType, name.upper())
    file_type = getattr(gguf.LlamaFileType, "ALL_F32" if name == "f32" else f"MOSTLY_{name.upper()}")
    return qtype, file_type


def _add_tensor(writer, name: str, t: torch.Tensor, qtype, fallbacks: list[str]) -> None:
    import gguf

    data = t.detach().to(torch.float32).numpy()
    if t.dim() == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
        return
    if qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16) or \
            data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        return
    fallbacks.append(name)
    writer.add_tensor(name, data.astype("float16"), raw_dtype=gguf.GGMLQuantizationType.F16)


def _check_target(path: Path, overwrite: bool, inputs: dict) -> None:
    """ValueError unless ``path`` may be written: not an input, not a folder; an existing file only with
    ``overwrite`` and only when it is a GGUF dip_ext wrote (its :data:`MARKER_KEY`)."""
    check_not_input(path, "output file", inputs)
    if path.is_dir():
        raise ValueError(f"output file {path} is a folder; name a .gguf file")
    if not path.exists():
        return
    if not overwrite:
        raise ValueError(f"output file {path} exists; pass --overwrite to replace a GGUF dip_ext wrote, or choose "
                         "another name")
    import gguf

    try:
        ours = MARKER_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 - not a GGUF at all
        ours = False
    if not ours:
        raise ValueError(f"output file {path} was not written by dip_ext; --overwrite replaces only dip_ext's own "
                         "GGUF files: choose another name")


def _write(path: str, padded: PaddedModel, layers: list[dict], heads: list[int], kv_heads: list[int], qtype,
           file_type, vocab_folder: Path, notes: list[str]) -> None:
    """Writes the GGUF file ``path``: metadata, tokenizer (from ``vocab_folder``), tensors in llama.cpp's names."""
    import gguf

    cfg = padded.config
    writer = gguf.GGUFWriter(path, arch="deci")
    writer.add_name(Path(str(getattr(cfg, "_name_or_path", "") or "")).name or "dip_ext export")
    writer.add_string(MARKER_KEY, f"zero-padded export of a dip_ext {'compacted' if padded.compacted else 'dense'} "
                                  f"{padded.family} model")
    writer.add_file_type(file_type)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length([layer["mlp.gate_proj.weight"].shape[0] if "mlp.gate_proj.weight" in layer else 0
                                    for layer in layers])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(padded.head_dim)
    writer.add_value_length(padded.head_dim)
    writer.add_rope_dimension_count(padded.head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    tensors: dict[str, torch.Tensor] = {"token_embd.weight": padded.embed}
    _rope(writer, padded, tensors)
    add_vocab(writer, vocab_folder, cfg.vocab_size, notes)
    for i, (layer, n_head, n_kv) in enumerate(zip(layers, heads, kv_heads)):
        for name, t in layer.items():
            module, kind = name.rsplit(".", 1)
            if module == "self_attn.q_proj":
                t = _rope_permute(t, n_head)
            elif module == "self_attn.k_proj":
                t = _rope_permute(t, n_kv)
            tensors[f"blk.{i}.{_NAMES[module]}.{kind}"] = t
    tensors["output_norm.weight"] = padded.norm
    if padded.lm_head is not None:
        tensors["output.weight"] = padded.lm_head
    fallbacks: list[str] = []
    for name, t in tensors.items():
        _add_tensor(writer, name, t, qtype, fallbacks)
    if fallbacks:
        notes.append(f"{len(fallbacks)} matrices written F16: their rows do not split into {qtype.name} blocks "
                     f"(e.g. {fallbacks[0]})")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_quantize(source: str, target: str, quantize: str, notes: list[str]) -> None:
    """llama.cpp's own quantizer (through llama-cpp-python) from the F32 file ``source`` into ``target``."""
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(f"--quantize {quantize} runs llama.cpp's quantizer, which needs llama-cpp-python "
                          "(make llama-cpp, or pip install llama-cpp-python)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantize.upper()}")
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)) != 0:
        raise ValueError(f"llama.cpp's quantizer failed to write {quantize} (its log above says why)")
    notes.append(f"quantized to {quantize} by llama.cpp's quantizer, which writes other types for matrices whose rows "
                 "do not split into its blocks (its log lists them)")


def export_gguf(model_or_dir: Union[nn.Module, str, os.PathLike], out_file: Union[str, os.PathLike], *,
                tokenizer=None, quantize: Optional[str] = None, overwrite: bool = False) -> ExportReport:
    """Writes ``model_or_dir`` (a compacted model or its saved folder; a dense Llama-shaped model works too) as the
    GGUF file ``out_file`` (llama.cpp's ``deci`` architecture, with the tokenizer), whose logits in llama.cpp equal the
    compacted model's to the rounding of ``quantize`` (see the module docstring; default: the model's dtype). Returns
    what it keeps (:class:`~dip_ext.zero_pad.ExportReport`). The file is written beside ``out_file`` and moved into
    place when complete; ``overwrite`` replaces only a GGUF dip_ext wrote.

    ``tokenizer``: a Hugging Face fast tokenizer (default: the one saved in the model's folder); byte-level BPE only
    (:mod:`dip_ext.gguf_vocab`). Raises UnsupportedModelError (one line naming the family) for a model that is not
    Llama-shaped, or whose family's prunable space is not the built-in layout
    (:func:`~dip_ext.zero_pad.check_exportable`); ValueError for an output that may not be written, a tokenizer or
    RoPE type GGUF cannot carry; ImportError without the ``gguf`` package (or, for llama.cpp's quantization types,
    without llama-cpp-python).
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("export to GGUF needs the gguf package: pip install 'gguf>=0.10'")
    if quantize is not None and quantize not in QUANTIZE_TYPES + LLAMA_CPP_TYPES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_TYPES + LLAMA_CPP_TYPES)}, got {quantize!r}")
    out = Path(out_file)
    _check_target(out, overwrite, {"--model": None if isinstance(model_or_dir, nn.Module) else model_or_dir})
    model, source = load_source(model_or_dir, _WHAT)
    if tokenizer is None and source is None:
        raise ValueError("a GGUF file carries its tokenizer: pass tokenizer= with a model object")
    padded = pad_model(model, _WHAT)
    by_llama_cpp = quantize in LLAMA_CPP_TYPES
    qtype, file_type = _qtype("f32" if by_llama_cpp else quantize, padded.embed.dtype)
    notes: list[str] = []
    layers, heads, kv_heads = _layers(padded, notes)
    if quantize is not None and quantize not in ("f32", "f16", "bf16"):  # block types: rows in whole blocks
        _round_mlp_widths(layers, QUANT_BLOCK, notes)
    report = export_report(padded, "gguf", str(out), layers, notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = [tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.dip_ext-staging-") for _ in range(2)]
    for fd, _ in staged:
        os.close(fd)
    (_, first), (_, second) = staged
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            vocab = Path(tmp) if tokenizer is not None else source
            _write(first, padded, layers, heads, kv_heads, qtype, file_type, vocab, notes)
        if by_llama_cpp:
            _llama_cpp_quantize(first, second, quantize, notes)
            first = second
        honour_umask(Path(first))
        os.replace(first, out)
    finally:
        for _, path in staged:
            if os.path.exists(path):
                os.unlink(path)
    report.notes = list(notes)
    return report
