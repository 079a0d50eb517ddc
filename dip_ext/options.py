"""Options declared once: frozen dataclasses whose fields carry their default, help, choices and range.

Every option of a pipeline stage is a field of a frozen dataclass (``PruneConfig``, ``RefitConfig``,
``EvalConfig``, a selection method's own options). The same declaration gives

- validation: :func:`check_fields`, called from the dataclass's ``__post_init__``, raises ValueError naming the
  option (type, range, choices) whether the value came from Python or from the command line;
- the command line: :class:`OptionParser` (transformers' ``HfArgumentParser``) turns each field into
  ``--field-name`` with the help text, choices and default, and every ``bool`` into a ``--flag`` /
  ``--no-flag`` pair;
- records: :func:`as_dict` for checkpoint fingerprints and reports, and back: :func:`from_dict` (a class that
  derives from :class:`Options` has both as methods, and a ``VERSION``, as torchao's ``AOBaseConfig``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import operator
import types
import typing
from typing import Any, ClassVar, Literal, Mapping, Optional, Union

from transformers import HfArgumentParser

__all__ = ["option", "check_fields", "as_dict", "from_dict", "Options", "from_namespace", "flag_dest", "field_default",
           "OptionParser", "EXIT_USAGE"]

#: exit status of a command-line usage error (argparse's)
EXIT_USAGE = 2


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, minimum=None, maximum=None,
           above=None, below=None, aliases=None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also a validated command-line option.

    ``minimum`` / ``maximum``: inclusive bounds; ``above`` / ``below``: exclusive bounds (numbers only).
    ``choices``: allowed values (``Literal[...]`` annotations give them too). ``aliases``: extra flag names.
    """
    metadata: dict[str, Any] = {"help": help}
    for key, value in (("choices", choices), ("minimum", minimum), ("maximum", maximum), ("above", above),
                       ("below", below), ("aliases", aliases)):
        if value is not None:
            metadata[key] = list(value) if key in ("choices", "aliases") else value
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


#: a numeric option's bounds (metadata key -> the test a value must pass against it)
_BOUND_TESTS = {"minimum": operator.ge, "maximum": operator.le, "above": operator.gt, "below": operator.lt}


def _bounds(meta) -> str:
    """The range of a numeric option in words: "in (0, 1)", "in [1, 8]", ">= 0" ..."""
    lo = ("(", meta["above"]) if "above" in meta else ("[", meta["minimum"]) if "minimum" in meta else None
    hi = (")", meta["below"]) if "below" in meta else ("]", meta["maximum"]) if "maximum" in meta else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {lo[1]:g}"
    if hi:
        return f"{'<' if hi[0] == ')' else '<='} {hi[1]:g}"
    return ""


def _describe(kind) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _check_value(name: str, value, hint, meta) -> Any:
    """``value`` checked against the annotation ``hint`` and the field's metadata (and coerced int -> float)."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint, origin = args[0], typing.get_origin(args[0])
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        ok = isinstance(value, int) or (hint is float and isinstance(value, float))
        if isinstance(value, bool) or not ok:
            raise ValueError(f"{name} must be {_describe(hint)}, got {value!r}")
        if hint is float:
            value = float(value)
        bounds = _bounds(meta)
        inside = all(test(value, meta[key]) for key, test in _BOUND_TESTS.items() if key in meta)
        if (hint is float and not math.isfinite(value)) or not inside:
            what = "a finite number" if hint is float else "an integer"
            raise ValueError(f"{name} must be {what}{' ' + bounds if bounds else ''}, got {value!r}")
        return value
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    return value


def check_fields(config) -> None:
    """Validates every field of the dataclass instance ``config`` against its annotation and metadata.

    Raises ValueError ``"<field> must be ..., got <value>"``. Integers given for float fields become floats
    (the frozen instance is updated in place), so equal options compare and fingerprint equal.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = _check_value(f.name, getattr(config, f.name), hints[f.name], f.metadata)
        object.__setattr__(config, f.name, value)


def as_dict(config) -> dict:
    """The fields of ``config`` as a JSON-safe dict (for fingerprints and reports)."""
    return {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


def from_dict(cls, data: Mapping, *, version: Optional[int] = None):
    """An instance of the options dataclass ``cls`` from ``data`` as :func:`as_dict` wrote it (fields left out
    take their defaults, as in a record of a release that did not have them yet).

    ``version``: the ``VERSION`` of ``cls`` the record was written with (None: not recorded). Raises ValueError
    for a record of another version, a key that is not a field of ``cls`` (named, with the fields it has) or a
    value the field refuses (:func:`check_fields`, when ``cls`` calls it).
    """
    current = getattr(cls, "VERSION", 1)
    if version is not None and version != current:
        raise ValueError(f"{cls.__name__}: the record has format version {version}; this dip_ext reads version "
                         f"{current}")
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}: expected a mapping of its options, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))} (its options: "
                         f"{', '.join(names)})")
    return cls(**copy.deepcopy(dict(data)))


class Options:
    """Base of the option dataclasses: a record format ``VERSION`` (bump it when a field changes meaning or is
    removed; an added field with a default needs none), :meth:`to_dict` and :meth:`from_dict`."""

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict:
        """The fields as a JSON-safe dict (:func:`as_dict`): what reports and checkpoint fingerprints record."""
        return as_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping, *, version: Optional[int] = None):
        """The options :meth:`to_dict` recorded (see :func:`from_dict`)."""
        return from_dict(cls, data, version=version)


def field_default(f: dataclasses.Field) -> Any:
    """The default of a dataclass field (its factory called), or ``dataclasses.MISSING``."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flag_dest(name: str, prefix: Optional[str] = None) -> str:
    """Where the parser keeps the field ``name`` of an options class whose flags carry ``prefix``."""
    return f"{prefix}_{name}" if prefix else name


def from_namespace(cls, namespace: argparse.Namespace, prefix: Optional[str] = None):
    """An instance of the options dataclass ``cls`` from parsed arguments (its fields by name; ``prefix``: the
    one its flags were given, see :class:`OptionParser`)."""
    return cls(**{f.name: getattr(namespace, flag_dest(f.name, prefix)) for f in dataclasses.fields(cls) if f.init})


class _ReplaceThenExtend(argparse.Action):
    """A list option: the first use replaces the default, later uses add to it (``--x a --x b`` or ``--x a b``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, f"_{self.dest}_given", False)
        current = list(getattr(namespace, self.dest) or []) if seen else []
        setattr(namespace, self.dest, current + list(values))
        setattr(namespace, f"_{self.dest}_given", True)


class OptionParser(HfArgumentParser):
    """``HfArgumentParser`` whose usage errors are one line on stderr with exit status 2.

    Fields declared with :func:`option` become flags (range metadata stays with :func:`check_fields`); a
    ``bool`` field gets ``--flag`` and ``--no-flag``; a list field accepts ``--x a b`` and ``--x a --x b``.
    ``flag_choices``: ``{field name: choices}`` known only when the parser is built. ``flag_prefixes``:
    ``{options class: prefix}``: that class's fields become ``--PREFIX-FIELD`` (kept under
    :func:`flag_dest`), so two classes may have fields of the same name (a selection method's options carry its
    name); a class with ``_unprefixed_flags = True`` also keeps ``--FIELD`` as an alias (flags of earlier releases).
    """

    def __init__(self, *args, flag_prefixes: Optional[Mapping[type, str]] = None,
                 flag_choices: Optional[Mapping[str, list]] = None, **kwargs):
        # read while the base class adds the dataclasses' flags
        self._flag_prefixes, self._flag_choices = dict(flag_prefixes or {}), dict(flag_choices or {})
        super().__init__(*args, **kwargs)

    def error(self, message):  # noqa: D401
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def _add_dataclass_arguments(self, dtype):
        group = self.add_argument_group(dtype._argument_group_name) if hasattr(dtype, "_argument_group_name") \
            else self
        hints = typing.get_type_hints(dtype)
        prefix = getattr(self, "_flag_prefixes", {}).get(dtype)
        choices = getattr(self, "_flag_choices", {})
        for f in dataclasses.fields(dtype):
            if f.init:
                self._add_option(group, f, hints[f.name], prefix, getattr(dtype, "_unprefixed_flags", False),
                                 choices.get(f.name))

    @staticmethod
    def _add_option(group, f: dataclasses.Field, hint, prefix: Optional[str] = None, unprefixed: bool = True,
                    choices: Optional[list] = None) -> None:
        flag = f"--{f.name.replace('_', '-')}"
        names = ([f"--{prefix.replace('_', '-')}-{flag[2:]}"] + ([flag] if unprefixed else [])) if prefix else [flag]
        names += f.metadata.get("aliases", [])
        # argparse formats help with %: a literal percent sign must be doubled
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", "").replace("%", "%%"),
                                  "dest": flag_dest(f.name, prefix)}
        default = field_default(f)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) in (Union, types.UnionType) else hint
        if base is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            return
        if typing.get_origin(base) is Literal:
            kwargs["choices"] = list(typing.get_args(base))
        elif typing.get_origin(base) in (list, tuple):
            kwargs.update(nargs="+", action=_ReplaceThenExtend, metavar=f.name.upper().rstrip("S"))
        else:
            kwargs["type"] = base
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        if choices is not None:  # known only when the parser is built (e.g. the registered methods)
            kwargs["choices"] = list(choices)
        group.add_argument(*names, **kwargs)

