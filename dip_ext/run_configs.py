"""The configs of one pruning run as one typed record: what ``report.json`` stores and reloads.

A report reloaded with :meth:`dip_ext.PruneReport.load` gives back the :class:`RunConfigs` that made it, and
``prune_and_compact(model, tokenizer, **configs.kwargs())`` runs with them again (same options, so the same
checkpoint fingerprints: a ``resume`` of that run accepts its checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .config import EvalConfig, PruneConfig, RefitConfig
from .options import as_dict, from_dict
from .recovery import RecoveryConfig
from .selection import get_method

__all__ = ["RunConfigs"]


def _record(options) -> Optional[dict]:
    """``{"version": V, "fields": {...}}`` of an options object (None for None)."""
    if options is None:
        return None
    return {"version": getattr(type(options), "VERSION", 1), "fields": as_dict(options)}


def _read(cls, record: Any, what: str):
    if not isinstance(record, Mapping) or not isinstance(record.get("fields"), Mapping):
        raise ValueError(f"report configs: {what} must be a record {{'version': ..., 'fields': {{...}}}}, "
                         f"got {record!r}")
    return from_dict(cls, record["fields"], version=record.get("version"))


@dataclass(frozen=True)
class RunConfigs:
    """Every option of one run: ``prune`` (the method's name among them), ``refit``, ``evaluation``, ``recovery``
    and ``method_options`` (the selection method's options object; None for a method without options)."""

    prune: PruneConfig
    refit: RefitConfig
    evaluation: EvalConfig
    recovery: RecoveryConfig
    method_options: Any = None

    def kwargs(self) -> dict:
        """The keywords of :func:`dip_ext.prune_and_compact` that run with these configs."""
        return {"config": self.prune, "refit": self.refit, "evaluation": self.evaluation, "recovery": self.recovery,
                "method": self.method_options if self.method_options is not None else self.prune.method}

    def to_dict(self) -> dict:
        """JSON-safe: one ``{"version", "fields"}`` record per config (:func:`dip_ext.options.as_dict`, the
        serialization checkpoint fingerprints use too)."""
        return {"prune": _record(self.prune), "refit": _record(self.refit), "evaluation": _record(self.evaluation),
                "recovery": _record(self.recovery), "method_options": _record(self.method_options)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "RunConfigs":
        """The configs :meth:`to_dict` recorded. The method's options class is the registered method's (named in
        ``prune``). Raises ValueError naming the config, key or version that cannot be read."""
        if not isinstance(data, Mapping):
            raise ValueError(f"report configs must be a mapping, got {type(data).__name__}")
        prune = _read(PruneConfig, data.get("prune"), "prune")
        options_class = get_method(prune.method).options_class
        record = data.get("method_options")
        if (record is None) != (options_class is None):
            raise ValueError(f"report configs: method {prune.method!r} takes "
                             f"{options_class.__name__ if options_class else 'no options'}, but the record has "
                             f"{'none' if record is None else 'options'}")
        return cls(prune=prune, refit=_read(RefitConfig, data.get("refit"), "refit"),
                   evaluation=_read(EvalConfig, data.get("evaluation"), "evaluation"),
                   recovery=_read(RecoveryConfig, data.get("recovery"), "recovery"),
                   method_options=None if record is None else _read(options_class, record, "method_options"))
