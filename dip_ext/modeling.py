"""Hugging Face face of compacted models: the ``DipExt<Family>`` classes, their registration, and loading.

The classes are declared in the family modules (:mod:`dip_ext.families.llama` …) and re-exported here under
the names saved checkpoints' ``config.json`` (``architectures``, ``auto_map``) and ``modeling_dip_ext.py`` shims
use. :func:`register_classes` (called once by ``import dip_ext``) registers them with ``AutoConfig`` /
``AutoModelForCausalLM`` and, when peft is installed, gives their model types the LoRA (and other adapter)
target modules of the dense family. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .errors import UnsupportedModelError
from .families import FAMILIES
from .families.hf_classes import REMOTE_CODE_FILE
from .families.gemma3 import DipExtGemma3Config, DipExtGemma3ForCausalLM
from .families.llama import DipExtLlamaConfig, DipExtLlamaForCausalLM
from .families.mistral import DipExtMistralConfig, DipExtMistralForCausalLM
from .families.opt import DipExtOPTConfig, DipExtOPTForCausalLM
from .families.phi import DipExtPhiConfig, DipExtPhiForCausalLM
from .families.qwen2 import DipExtQwen2Config, DipExtQwen2ForCausalLM
from .families.qwen3 import DipExtQwen3Config, DipExtQwen3ForCausalLM

__all__ = ["REMOTE_CODE_FILE", "register_classes", "register_peft_target_modules", "from_pretrained",
           "DipExtLlamaConfig", "DipExtLlamaForCausalLM", "DipExtMistralConfig", "DipExtMistralForCausalLM",
           "DipExtQwen2Config", "DipExtQwen2ForCausalLM", "DipExtOPTConfig", "DipExtOPTForCausalLM",
           "DipExtPhiConfig", "DipExtPhiForCausalLM", "DipExtQwen3Config", "DipExtQwen3ForCausalLM",
           "DipExtGemma3Config", "DipExtGemma3ForCausalLM"]


def register_classes() -> None:
    """Registers every family's compacted config / CausalLM with transformers' Auto classes (idempotent), so
    ``AutoModelForCausalLM.from_pretrained(dir)`` loads a compacted checkpoint, and registers peft's target
    modules for them (:func:`register_peft_target_modules`)."""
    for family in FAMILIES:
        AutoConfig.register(family.config.model_type, family.config, exist_ok=True)
        AutoModelForCausalLM.register(family.config, family.model, exist_ok=True)
    register_peft_target_modules()


def register_peft_target_modules() -> bool:
    """Gives each ``dip_ext_<family>`` model type the target modules peft uses for ``<family>`` (LoRA and every
    other method peft keeps such a table for), so ``LoraConfig()`` without ``target_modules`` works on a
    compacted model. Returns False when peft is not installed (it is optional)."""
    try:
        from peft.utils import constants
    except ImportError:
        return False
    tables = [v for k, v in vars(constants).items() if k.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(v, dict)]
    for table in tables:
        for family in FAMILIES:
            if family.base_model_type in table:
                table.setdefault(family.config.model_type, table[family.base_model_type])
    return True


def from_pretrained(path: Union[str, os.PathLike], **kwargs) -> nn.Module:
    """Loads a compacted model saved by ``save_pretrained`` from the folder ``path``.

    ``kwargs`` go to ``from_pretrained`` (dtype, device_map…). Raises FileNotFoundError without a config.json,
    ValueError for a folder that is not a compacted model, UnsupportedModelError for an unknown family.
    """
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
    family = next((f for f in FAMILIES if f.base_model_type == base), None)
    if family is None:
        raise UnsupportedModelError(f"{folder}: unknown compacted family {base!r}")
    return family.model.from_pretrained(folder, **kwargs)
