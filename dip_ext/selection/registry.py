"""Selection methods by name: the one place the pipeline, the command line and the benchmarks look them up."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .base import SelectionMethod

__all__ = ["register_method", "unregister_method", "get_method", "method_names", "method_options",
           "method_for_options", "registered_options_classes"]

_METHODS: dict[str, type] = {}


def register_method(cls: type, *, replace: bool = False) -> type:
    """Registers the selection method class ``cls`` under ``cls.name``.

    ``cls`` implements :class:`~dip_ext.selection.base.SelectionMethod`; it is instantiated without arguments.
    A name already taken, or an options class another method already has (the options object picks its method),
    raises ValueError unless ``replace=True`` (then the earlier method under that name is replaced). Returns
    ``cls``, so it also works as a class decorator.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a selection method needs a class attribute `name` (an identifier), got {name!r}")
    for attr in ("select", "uses_validation"):
        if not callable(getattr(cls, attr, None)):
            raise TypeError(f"selection method {name!r} has no method {attr}()")
    if not hasattr(cls, "options_class"):
        raise TypeError(f"selection method {name!r} has no options_class (None when it has no options)")
    if name in _METHODS and _METHODS[name] is not cls and not replace:
        raise ValueError(f"a selection method is already registered as {name!r} ({_METHODS[name].__name__}); "
                         "pass replace=True to replace it, or choose another name")
    options = cls.options_class
    taken = [m for n, m in _METHODS.items() if n != name and options is not None and m.options_class is options]
    if taken:
        raise ValueError(f"{options.__name__} already picks the method {taken[0].name!r}: give {name!r} an options "
                         "class of its own")
    _METHODS[name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Removes the method registered as ``name``; ValueError listing the registered ones if there is none."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    del _METHODS[name]


def method_for_options(options: Any) -> str:
    """The name of the method whose options class ``options`` is an instance of; ValueError otherwise."""
    for name, cls in _METHODS.items():
        if cls.options_class is not None and type(options) is cls.options_class:
            return name
    raise ValueError(f"{type(options).__name__} is not the options class of a registered method (known: "
                     + ", ".join(c.options_class.__name__ for c in _METHODS.values() if c.options_class) + ")")


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> SelectionMethod:
    """A new instance of the method registered as ``name``; ValueError listing the registered ones otherwise."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]()


def method_options(name: str, options: Optional[Any] = None, **values) -> Optional[Any]:
    """The options instance of method ``name``: ``options`` as given (checked to be of its options class), or
    its options class built from ``values`` (ValueError for a keyword the class does not have)."""
    method = get_method(name)
    cls = method.options_class
    if options is not None:
        if cls is None or not isinstance(options, cls):
            want = cls.__name__ if cls is not None else "no options"
            raise ValueError(f"method {name!r} takes {want}, got {type(options).__name__}")
        if values:
            raise ValueError("pass method options either as an options object or as keywords, not both")
        return options
    if cls is None:
        if values:
            raise ValueError(f"method {name!r} has no options, got {', '.join(sorted(values))}")
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"method {name!r} has no option {', '.join(unknown)} (its options: {', '.join(sorted(known))})")
    return cls(**values)


def registered_options_classes() -> list[type]:
    """The options classes of the registered methods (each once, in registration order)."""
    out: list[type] = []
    for cls in _METHODS.values():
        if cls.options_class is not None and cls.options_class not in out:
            out.append(cls.options_class)
    return out
