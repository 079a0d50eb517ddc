"""``prune_and_compact(model, tokenizer, config)``: the whole pipeline in one call (a thin layer over
:class:`dip_ext.pipeline.Pruner`), shaped like torchao's ``quantize_(model, config)``: every option lives in its
config dataclass, once; keyword overrides are the configs' own field names, checked against them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from . import zoo
from .config import EvalConfig, PruneConfig, RefitConfig
from .pipeline import Pruner
from .recovery import RecoveryConfig
from .report import PruneReport
from .selection import get_method
from .selection import method_options as resolve_method_options
from .selection.registry import method_for_options, registered_options_classes

__all__ = ["prune_and_compact", "PruneReport"]

#: keywords of earlier releases, and the field each now is
_RENAMED = {"eval_texts": "eval_text", "measure_speed": "speed"}
_GONE = {"hypernetwork_options": "method=HypernetworkConfig(...)",
         "method_options": "method=<the method's options object>, e.g. method=HypernetworkConfig(steps=500)",
         "method_kwargs": "the options' own names, e.g. steps=500"}


def _owner(name: str, classes: list[type]) -> type:
    owners = [c for c in classes if name in {f.name for f in dataclasses.fields(c)}]
    if len(owners) > 1:
        raise TypeError(f"prune_and_compact(): {name} is a field of {' and '.join(c.__name__ for c in owners)}; "
                        "pass it inside the config object it is meant for")
    if not owners:
        elsewhere = [c.__name__ for c in registered_options_classes()
                     if name in {f.name for f in dataclasses.fields(c)}]
        if elsewhere:
            raise TypeError(f"prune_and_compact(): {name} is an option of {' / '.join(elsewhere)}, not of this "
                            "run's method; pass that method (e.g. method=HypernetworkConfig(...))")
        raise TypeError(f"prune_and_compact() got an unexpected keyword argument {name!r} (options are the fields "
                        f"of {', '.join(c.__name__ for c in classes)})")
    return owners[0]


def prune_and_compact(model: nn.Module, tokenizer=None, config: Optional[PruneConfig] = None, *,
                      method: Union[str, Any, None] = None, refit: Union[RefitConfig, str, None] = None,
                      recovery: Optional[RecoveryConfig] = None, evaluation: Optional[EvalConfig] = None,
                      work_dir: Optional[Union[str, os.PathLike]] = None, resume: bool = False,
                      progress: bool = True, model_name: Optional[str] = None, full_model: Optional[nn.Module] = None,
                      **overrides) -> tuple[nn.Module, PruneReport]:
    """Prunes ``model`` with DISP and compacts it in place; returns ``(model, PruneReport)``.

    ``config`` (:class:`PruneConfig`): what to remove and the calibration text. ``method``: the selection method,
    as its options object (``HypernetworkConfig(steps=500)``: the type picks the method) or a registered name
    (``"hypernetwork"``, ``"oneshot"``, ``"dependent"``; its options at their defaults). ``refit``
    (:class:`RefitConfig`), ``recovery`` (:class:`RecoveryConfig`: training after compaction) and ``evaluation``
    (:class:`EvalConfig`): None takes their defaults. ``overrides``: any field of these configs by its own name
    (``ratio=0.3``, ``steps=500``, ``recover="distill"``, ``eval_windows=0``), applied on top; a name no config
    has, or one a second config also has, raises TypeError. ``calibration`` may also be data instead of a text
    name: documents, chat conversations, tokenizer output or token ids (:func:`dip_ext.data.calibration_tokens`).
    ``eval_text=()`` skips evaluation. ``tokenizer``: None takes the tokenizer of the model's own folder (never
    downloads) and raises ValueError saying what to pass otherwise. ``work_dir`` / ``resume`` / ``progress`` /
    ``model_name`` / ``full_model``: see :class:`Pruner`. Each stage is also callable on its own through
    :class:`Pruner`.

    Raises ValueError (naming the option) for a bad option, before any work.
    """
    for old, new in _RENAMED.items():
        if old in overrides:
            overrides.setdefault(new, overrides.pop(old))
    for old, new in _GONE.items():
        if old in overrides:
            raise TypeError(f"prune_and_compact(): {old} is gone; pass {new}")
    if config is not None and not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__} (the ratio is ratio=..., the "
                        "calibration text calibration=...)")
    if refit is not None and not isinstance(refit, RefitConfig):  # the earlier spelling refit="off": the field
        overrides.setdefault("refit", refit)
        refit = None
    for given, cls in ((recovery, RecoveryConfig), (evaluation, EvalConfig)):
        if given is not None and not isinstance(given, cls):
            raise TypeError(f"prune_and_compact(): expected a {cls.__name__}, got {type(given).__name__}")
    config = config if config is not None else PruneConfig()
    if method is not None and not isinstance(method, str):
        options, name = method, method_for_options(method)
    else:
        name, options = (method if method is not None else config.method), None
    calibration = overrides.pop("calibration", config.calibration)
    data = None if isinstance(calibration, str) else calibration
    option_class = get_method(name).options_class
    classes = [PruneConfig, EvalConfig, RefitConfig, RecoveryConfig] + ([option_class] if option_class else [])
    groups: dict[type, dict] = {c: {} for c in classes}
    for key, value in overrides.items():
        groups[_owner(key, classes)][key] = value
    if option_class is not None and groups[option_class]:
        options = dataclasses.replace(options, **groups[option_class]) if options is not None else \
            resolve_method_options(name, None, **groups[option_class])
    config = dataclasses.replace(config, method=name, **groups[PruneConfig],
                                 **({"calibration": calibration} if data is None else {}))
    evaluation = dataclasses.replace(evaluation or EvalConfig(), **groups[EvalConfig])
    if not evaluation.eval_text:
        evaluation = dataclasses.replace(evaluation, eval_windows=0)
    refit = dataclasses.replace(refit or RefitConfig(), **groups[RefitConfig])
    recovery = dataclasses.replace(recovery or RecoveryConfig(), **groups[RecoveryConfig])
    ready = isinstance(data, torch.Tensor) or (isinstance(data, Mapping) and "input_ids" in data)
    if tokenizer is None and (not ready or evaluation.eval_windows != 0):
        tokenizer = zoo.tokenizer_for(model)  # the model's own folder (never downloads), or what to pass
    pruner = Pruner(model, tokenizer, config, method_options=resolve_method_options(name, options),
                    refit=refit, recovery=recovery, evaluation=evaluation, calibration_tokens=data,
                    work_dir=work_dir, resume=resume, progress=progress, model_name=model_name,
                    full_model=full_model)
    return pruner.run()
