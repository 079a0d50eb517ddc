"""Hugging Face classes of compacted models: one config + CausalLM class per family, save and load.

A compacted checkpoint is an ordinary Hugging Face folder: safetensors weights of the compacted matrices and
a ``config.json`` whose ``model_type`` is ``dip_ext_<family>`` and which carries the index sets
(``disp_masks``) and an ``auto_map`` to a two-line ``modeling_dip_ext.py`` that imports these classes. So
``dip_ext.from_pretrained(dir)``, ``AutoModelForCausalLM.from_pretrained(dir)`` after ``import dip_ext``, and
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (e.g. lm-eval's ``--model hf``) all load
it. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from .compaction import compact_layers
from .errors import UnsupportedModelError
from .families import adapter_for, base_model_type
from .masks import DispMasks

REMOTE_CODE_FILE = "modeling_dip_ext.py"


class DispModelMixin:
    """Builds the compacted structure from ``config.disp_masks`` so from_pretrained loads compact weights."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        with torch.device("cpu"):  # from_pretrained builds models under a meta-device context
            masks = DispMasks.from_config(config.disp_masks)
        compact_layers(self, masks)

    @property
    def disp_masks(self) -> DispMasks:
        return DispMasks.from_config(self.config.disp_masks)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``save_pretrained`` plus the remote-code shim, so ``trust_remote_code=True`` loaders work."""
        self.config.auto_map = {"AutoConfig": f"{REMOTE_CODE_FILE[:-3]}.{type(self.config).__name__}",
                                "AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.{type(self).__name__}"}
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            _write_remote_code(Path(save_directory))


# base model_type -> (dense config class, dense CausalLM class, class-name stem)
_FAMILY_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM, "Llama"),
    "mistral": (MistralConfig, MistralForCausalLM, "Mistral"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, "Qwen2"),
    "opt": (OPTConfig, OPTForCausalLM, "OPT"),
    "phi": (PhiConfig, PhiForCausalLM, "Phi"),
}
#: base model_type -> (compacted config class, compacted CausalLM class)
DISP_CLASSES: dict[str, tuple[type, type]] = {}

for _base, (_cfg, _model, _stem) in _FAMILY_CLASSES.items():
    _disp_cfg = type(f"DipExt{_stem}Config", (_cfg,), {"model_type": f"dip_ext_{_base}", "__module__": __name__})
    _no_split = list(getattr(_model, "_no_split_modules", None) or [])
    _disp_model = type(f"DipExt{_stem}ForCausalLM", (DispModelMixin, _model),
                       {"config_class": _disp_cfg, "__module__": __name__,
                        # compacted layers are named Disp<DenseLayer> (modules.family_layer_class)
                        "_no_split_modules": _no_split + [f"Disp{n}" for n in _no_split]})
    globals()[_disp_cfg.__name__] = _disp_cfg
    globals()[_disp_model.__name__] = _disp_model
    DISP_CLASSES[_base] = (_disp_cfg, _disp_model)
    AutoConfig.register(_disp_cfg.model_type, _disp_cfg, exist_ok=True)
    AutoModelForCausalLM.register(_disp_cfg, _disp_model, exist_ok=True)


def adopt_disp_class(model: nn.Module, masks: DispMasks, dense_params: dict) -> None:
    """Turns a freshly compacted dense model into its dip_ext class.

    The config records the index sets and the dense original's parameter counts (for honest reports).
    """
    base = base_model_type(model.config)
    if base not in DISP_CLASSES:
        raise UnsupportedModelError(f"no compacted model class for model_type {base!r}")
    dense_cls = _FAMILY_CLASSES[base][1]
    if type(model) is not dense_cls:
        raise UnsupportedModelError(f"compact() needs a {dense_cls.__name__}, got {type(model).__name__}")
    disp_cfg, disp_model = DISP_CLASSES[base]
    config = model.config
    config.disp_masks = masks.to_config(adapter_for(model).dims(config))
    config.disp_base_model_type = base
    config.disp_dense_params = dict(dense_params)
    config.__class__ = disp_cfg
    config.architectures = [disp_model.__name__]
    model.__class__ = disp_model


def _write_remote_code(folder: Path) -> None:
    names = ", ".join(n for cfg, mdl in DISP_CLASSES.values() for n in (cfg.__name__, mdl.__name__))
    text = ('"""Written by dip_ext: lets AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) load this\n'
            'DISP-compacted checkpoint. It needs the dip_ext package (its compiled kernels) installed."""\n'
            f"from dip_ext.modeling import {names}  # noqa: F401\n")
    (folder / REMOTE_CODE_FILE).write_text(text)


def from_pretrained(path: Union[str, os.PathLike], **kwargs) -> nn.Module:
    """Loads a compacted model saved by ``save_pretrained``; ``kwargs`` go to ``from_pretrained`` (dtype, device_map…)."""
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (not a saved model folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if "disp_masks" not in cfg:
        raise ValueError(f"{folder} is not a dip_ext compacted model (config.json has no disp_masks); "
                         "load a dense model with transformers.AutoModelForCausalLM")
    base = cfg.get("disp_base_model_type")
    if base not in DISP_CLASSES:
        raise UnsupportedModelError(f"{folder}: unknown compacted family {base!r}")
    return DISP_CLASSES[base][1].from_pretrained(folder, **kwargs)


__all__ = ["DispModelMixin", "DISP_CLASSES", "adopt_disp_class", "from_pretrained"] + [
    c.__name__ for pair in DISP_CLASSES.values() for c in pair]
