"""The ``wiki`` text: prose of the Wikipedia extract that ships inside the gensim 4.4.0 wheel, markup stripped."""

from __future__ import annotations

import bz2
import io
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from ..files import atomic_write_bytes
from .cache import cache_dir, cached_wheels, package_folders, sha256_hex

__all__ = ["WIKI_MEMBER", "GENSIM_DOWNLOAD", "wiki_source", "wiki_text", "extract_wiki_prose"]

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_DOWNLOAD = "pip download --no-deps gensim==4.4.0 -d {dir}"
# Bump when the wiki cleaning changes, so stale cached text is not reused.
_WIKI_CLEANER_VERSION = 3

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
    # Malformed <ref> tags survive the parser as literal text: cut them with a regex first.
    wikitext = _REF_RE.sub("", _COMMENT_RE.sub("", wikitext))
    import mwparserfromhell as mw  # only the wiki text needs it: not paid by every `import dip_ext`
    from mwparserfromhell.nodes import Heading, Tag, Wikilink

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


def wiki_source() -> tuple[bytes, str]:
    """The raw (bz2 or plain XML) dump bytes and a description of where they came from."""
    env = os.environ.get("DIP_EXT_WIKI_BZ2")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"DIP_EXT_WIKI_BZ2={env} is not a file")
        return path.read_bytes(), str(path)
    for loc in package_folders("gensim"):
        path = loc.parent / WIKI_MEMBER
        if path.is_file():
            return path.read_bytes(), str(path)
    for wheel in cached_wheels("gensim", "4.4.0"):
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

    Built once from the dump and cached as ``<cache>/wiki-<hash>.txt``.
    """
    raw, where = wiki_source()
    key = sha256_hex(raw + f"/cleaner-v{_WIKI_CLEANER_VERSION}".encode())[:16]
    cached = cache_dir() / f"wiki-{key}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
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
