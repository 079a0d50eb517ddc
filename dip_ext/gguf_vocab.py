"""A Hugging Face tokenizer written into a GGUF file, as llama.cpp reads it (``tokenizer.ggml.*``).

Byte-level BPE tokenizers (GPT-2 style ``tokenizer.json``: SmolLM2, Llama-3, Qwen2, GPT-2) are written as llama.cpp's
``gpt2`` vocabulary: every token in id order (ids the tokenizer does not use, up to the model's vocabulary size, as
unused ``[PAD<id>]`` entries), the merges, the special token ids and the chat template. llama.cpp splits text before
BPE with a pre-tokenizer it knows by name; the name is read off the tokenizer's own pre-tokenizer (GPT-2's regex,
SmolLM2's digits + GPT-2, Llama-3's and Qwen2's regexes). Any other pre-tokenizer is written as ``default`` and the
caller's notes say so: llama.cpp then tokenizes text its own way, while token ids given to it directly are unaffected.
Other tokenizer kinds (SentencePiece, WordLevel, ...) are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["add_vocab", "pre_tokenizer_name"]

_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                 "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of ``tokenizer_json`` (a parsed tokenizer.json), or None when it has
    none that matches."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}.get(pattern)
    return None


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def add_vocab(writer, folder: Path, vocab_size: int, notes: list[str]) -> None:
    """Writes the tokenizer saved in ``folder`` (its tokenizer.json, tokenizer_config.json ...) into the GGUF
    ``writer`` for a model of ``vocab_size`` embedding rows; appends what the reader should know to ``notes``.

    Raises ValueError (one line) when ``folder`` holds no tokenizer.json or one that is not byte-level BPE, or when the
    tokenizer has more tokens than the model has embedding rows.
    """
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError("a GGUF file carries its tokenizer, and the model has none: export from a folder holding "
                         "tokenizer.json, or pass tokenizer=")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback", False) or decoder != "ByteLevel":
        kind = model.get("type", "?") + (" with byte fallback (SentencePiece-style)" if model.get("byte_fallback")
                                         else "")
        raise ValueError(f"the tokenizer is {kind}; dip_ext writes byte-level BPE tokenizers (GPT-2 style) to GGUF: "
                         "export as --to decilm, or convert the tokenizer with llama.cpp's tools")
    tokens: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[int(added["id"])] = (added["content"], kind)
    if tokens and max(tokens) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(tokens)}, beyond the model's {vocab_size} embedding rows")
    names, types = [], []
    for i in range(vocab_size):
        text, kind = tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        names.append(text)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    pre = pre_tokenizer_name(data)
    if pre is None:
        notes.append("llama.cpp does not know this tokenizer's pre-tokenizer: written as 'default', so llama.cpp may "
                     "split text differently (token ids given to it directly are unaffected)")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(names)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    special.merges = _merges(model)
    special.add_to_gguf(writer, quiet=True)
