"""``prune_and_compact``: the whole pipeline in one call (a thin wrapper over :class:`dip_ext.pipeline.Pruner`)."""

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
from .report import PruneReport
from .selection import get_method
from .selection import method_options as resolve_method_options

__all__ = ["prune_and_compact", "PruneReport"]


def prune_and_compact(model: nn.Module, tokenizer=None, ratio: float = 0.3,
                      calibration: Any = "wiki", method: str = "hypernetwork", *,
                      ratio_of: str = "decoder_linear", seq_len: Optional[int] = None, calibration_windows: int = 64,
                      val_windows: int = 16, steps: Optional[int] = None, multiple_of: int = 1, seed: int = 0,
                      eval_texts=("wiki", "ptb"), eval_windows: Optional[int] = 16, eval_seq_len: Optional[int] = None,
                      measure_speed: bool = True, refit: str = "auto", refit_damping: float = 1.0,
                      work_dir: Optional[Union[str, os.PathLike]] = None, resume: bool = False,
                      progress: bool = True, model_name: Optional[str] = None,
                      full_model: Optional[nn.Module] = None, method_options=None,
                      hypernetwork_options: Optional[dict] = None, **method_kwargs):
    """Prunes ``model`` with DISP and compacts it in place; returns ``(model, PruneReport)``.

    ``ratio``: fraction of decoder-linear parameters removed (``ratio_of="total"``: of all parameters).
    ``tokenizer``: None takes the tokenizer of the model's own folder (``model.name_or_path``: a local folder or
    the embedded default model; nothing is downloaded) and raises ValueError saying what to pass otherwise.
    ``calibration``: a text name (``"wiki"``, ``"ptb"``, ``"wikitext2"``, ``"file:PATH"``), raw text
    (:class:`dip_ext.data.Text`), documents (strings), chat conversations (rendered with the tokenizer's chat
    template), tokenizer output (padding dropped by its attention mask) or token ids (a stream or windows
    ``[n, seq_len]``); see :func:`dip_ext.data.calibration_tokens`. ``method``: a registered selection method (``"hypernetwork"``, ``"oneshot"``,
    ``"dependent"``, ...); its options go in ``method_options`` (e.g. ``HypernetworkConfig(steps=500)``) or as
    keywords (``steps=500``; ``hypernetwork_options={...}`` is accepted too; ``steps`` is ignored by methods
    that do not train). The other keywords are the
    fields of :class:`PruneConfig`, :class:`RefitConfig` and :class:`EvalConfig` (``eval_texts`` →
    ``eval_text``, ``measure_speed`` → ``speed``; ``eval_windows=0`` or ``eval_texts=()`` skips evaluation,
    ``eval_windows=None`` scores every window). ``work_dir`` / ``resume`` / ``full_model``: see :class:`Pruner`.
    Each stage is also callable on its own through :class:`Pruner`.

    Raises ValueError (naming the option) for a bad option before any work.
    """
    ready = isinstance(calibration, torch.Tensor) or (isinstance(calibration, Mapping) and "input_ids" in calibration)
    if tokenizer is None and (not ready or (eval_texts and eval_windows != 0)):
        tokenizer = zoo.tokenizer_for(model)  # the model's own folder (never downloads), or what to pass
    values = dict(hypernetwork_options or {}, **method_kwargs)
    options_class = get_method(method).options_class
    fields = {f.name for f in dataclasses.fields(options_class)} if options_class is not None else set()
    if steps is not None and "steps" in fields:  # steps of a method that does not train are ignored
        values["steps"] = steps
    if hypernetwork_options and method != "hypernetwork":
        raise ValueError(f"hypernetwork_options are for method 'hypernetwork', not {method!r}")
    if values and options_class is None:
        raise TypeError(f"prune_and_compact() got unexpected keyword arguments {', '.join(sorted(values))} "
                        f"(method {method!r} has no options)")
    options = resolve_method_options(method, method_options, **values)
    texts = list(eval_texts) if eval_texts else []
    text = {"calibration": calibration} if isinstance(calibration, str) else {}  # else: calibration_tokens below
    config = PruneConfig(method=method, ratio=ratio, ratio_of=ratio_of, **text,
                         calibration_windows=calibration_windows, seq_len=seq_len, val_windows=val_windows,
                         multiple_of=multiple_of, seed=seed)
    evaluation = EvalConfig(eval_text=texts, eval_windows=eval_windows if texts else 0, eval_seq_len=eval_seq_len,
                            speed=measure_speed)
    pruner = Pruner(model, tokenizer, config, method_options=options,
                    refit=RefitConfig(refit=refit, refit_damping=refit_damping), evaluation=evaluation,
                    calibration_tokens=None if isinstance(calibration, str) else calibration,
                    work_dir=work_dir, resume=resume, progress=progress, model_name=model_name,
                    full_model=full_model)
    return pruner.run()
