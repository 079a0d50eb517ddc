"""Text mixtures as options spell them: ``"wiki:0.5,ptb:0.3,file:notes.txt:0.2"`` (parsing only; the windows are
drawn by :func:`dip_ext.data.mixture_blocks`).

An entry is a text name (``wiki``, ``ptb``, ``wikitext2``, ``file:PATH``) with an optional ``:WEIGHT`` (a number
> 0; weights are normalised to sum to 1, an entry without one weighs 1). A name may carry its training split
(``ptb-train``, ``wiki-calibration``); an evaluation split (``ptb-test``, ``wiki-heldout``...) is refused:
calibration and recovery never read the text the perplexities are measured on. So is an evaluation-only text
(``shakespeare``, with any split or none). One entry without a weight is the plain text name (no mixture).
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_mixture", "mixture_files", "is_mixture"]

#: suffixes naming the part of a text calibration reads (dropped), and the parts it never reads (refused)
_TRAIN_SPLITS = ("train", "calibration", "calib")
_EVAL_SPLITS = ("test", "heldout", "valid", "validation", "eval")
#: dip_ext.data.EVAL_ONLY: texts evaluation reads and nothing else does (spelled out here: this layer sits below
#: dip_ext.data and cannot import it; tests/test_shakespeare_text.py checks that each of those is refused here)
_EVAL_ONLY_TEXTS = ("shakespeare",)
_WEIGHT = re.compile(r"^(?P<name>.+):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def _entry(text: str, spec: str) -> tuple[str, float]:
    text = text.strip()
    weight = 1.0
    m = _WEIGHT.match(text)
    if m and m.group("name") not in ("file",):
        text, weight = m.group("name"), float(m.group("weight"))
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"text mixture {spec!r}: the weight of {text!r} must be a number > 0, got {weight:g}")
    if not text:
        raise ValueError(f"text mixture {spec!r} has an empty entry")
    base = text.rsplit("-", 1)[0] if not text.startswith("file:") else text
    if text.lower() in _EVAL_ONLY_TEXTS or base.lower() in _EVAL_ONLY_TEXTS:
        where = "" if text == spec.strip() else f"text mixture {spec!r}: "
        raise ValueError(f"{where}{text!r} is an evaluation-only text: dip_ext never calibrates or trains on it "
                         "(calibration and recovery read another text; evaluate on it with --eval-text)")
    if not text.startswith("file:") and "-" in text:
        base, split = text.rsplit("-", 1)
        if split.lower() in _EVAL_SPLITS:
            raise ValueError(f"text mixture {spec!r}: {text!r} is an evaluation split; calibration and recovery "
                             f"never draw from it (use {base!r} or {base + '-train'!r})")
        if split.lower() in _TRAIN_SPLITS:
            text = base
    return text, weight


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``[(text name, weight), ...]`` of ``spec``, weights summing to 1 (one entry: ``[(name, 1.0)]``).

    Entries are separated by commas. Raises ValueError naming the entry for an empty entry, a weight that is not
    > 0, an evaluation split, or a text named twice. Text names themselves are checked where a text is read.
    """
    if not isinstance(spec, str):
        raise ValueError(f"a text mixture must be a string, got {type(spec).__name__}")
    entries = [_entry(part, spec) for part in spec.split(",")]
    names = [n for n, _ in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"text mixture {spec!r} names {', '.join(map(repr, twice))} more than once")
    total = sum(w for _, w in entries)
    return [(n, w / total) for n, w in entries]


def is_mixture(spec) -> bool:
    """Whether ``spec`` is more than one plain text name (several entries, a weight or a split suffix); raises
    ValueError as :func:`parse_mixture` does."""
    if not isinstance(spec, str):
        return False
    entries = parse_mixture(spec)
    return len(entries) > 1 or entries[0][0] != spec


def mixture_files(spec) -> list[str]:
    """The ``file:PATH`` entries of a text option (a plain name or a mixture), as written; [] for none or for a
    spec that does not parse (it is refused where it is read)."""
    if not isinstance(spec, str):
        return []
    try:
        entries = parse_mixture(spec)
    except ValueError:
        return [spec] if spec.startswith("file:") else []
    return [name for name, _ in entries if name.startswith("file:")]
