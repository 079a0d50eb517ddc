"""Hugging Face face of compacted models: the ``DipExt<Family>`` classes, their registration, and loading.

The classes are declared in the family modules (:mod:`dip_ext.families.llama` …) and re-exported here under
the names saved checkpoints' ``config.json`` (``architectures``, ``auto_map``) and ``modeling_dip_ext.py`` shims
use. :func:`register_classes` (called once by ``import dip_ext``) registers them with ``AutoConfig`` /
``AutoModel`` / ``AutoModelForCausalLM`` and, when peft is installed, gives their model types the LoRA (and other
adapter) target modules of the dense family. No pickle anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .errors import UnsupportedModelError
from .families import FAMILIES
from .families.hf_classes import REMOTE_CODE_FILE
from .families.gemma3 import DipExtGemma3Config, DipExtGemma3ForCausalLM, DipExtGemma3Model
from .families.llama import DipExtLlamaConfig, DipExtLlamaForCausalLM, DipExtLlamaModel
from .families.mistral import DipExtMistralConfig, DipExtMistralForCausalLM, DipExtMistralModel
from .families.opt import DipExtOPTConfig, DipExtOPTForCausalLM, DipExtOPTModel
from .families.phi import DipExtPhiConfig, DipExtPhiForCausalLM, DipExtPhiModel
from .families.qwen2 import DipExtQwen2Config, DipExtQwen2ForCausalLM, DipExtQwen2Model
from .families.qwen3 import DipExtQwen3Config, DipExtQwen3ForCausalLM, DipExtQwen3Model
from .files import read_json

__all__ = ["REMOTE_CODE_FILE", "register_classes", "register_peft_target_modules", "from_pretrained",
           "DipExtLlamaConfig", "DipExtLlamaForCausalLM", "DipExtLlamaModel", "DipExtMistralConfig",
           "DipExtMistralForCausalLM", "DipExtMistralModel", "DipExtQwen2Config", "DipExtQwen2ForCausalLM",
           "DipExtQwen2Model", "DipExtOPTConfig", "DipExtOPTForCausalLM", "DipExtOPTModel", "DipExtPhiConfig",
           "DipExtPhiForCausalLM", "DipExtPhiModel", "DipExtQwen3Config", "DipExtQwen3ForCausalLM",
           "DipExtQwen3Model", "DipExtGemma3Config", "DipExtGemma3ForCausalLM", "DipExtGemma3Model"]


def register_classes() -> None:
    """Registers every family's compacted config / base model / CausalLM with transformers' Auto classes
    (idempotent), so ``AutoModelForCausalLM.from_pretrained(dir)`` (and ``AutoModel``) loads a compacted
    checkpoint, and registers peft's target modules for them (:func:`register_peft_target_modules`)."""
    for family in FAMILIES:
        AutoConfig.register(family.config.model_type, family.config, exist_ok=True)
        AutoModel.register(family.config, family.base_model, exist_ok=True)
        AutoModelForCausalLM.register(family.config, family.model, exist_ok=True)
    register_peft_target_modules()


#: Why peft's adaption prompt (LLaMA-Adapter) is refused on compacted models.
ADAPTION_PROMPT_REFUSAL = (
    "peft's adaption prompt cannot wrap a dip_ext compacted model: it feeds its learned prompt, hidden_size wide, "
    "through each attention's k_proj / v_proj, which in a compacted layer read only the layer's kept attn_in "
    "columns (and it infers the key/value heads from k_proj's input width); use prefix tuning, prompt tuning or "
    "LoRA instead")


class PeftRefusal:
    """A peft per-model-type table entry for a method that cannot work on compacted models: peft reads the entry's
    fields when it wraps the model (or runs the wrapped one), and every such read raises ValueError(reason)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy / pickle probe dunders: answer them as any object does
            raise AttributeError(name)
        raise ValueError(self.reason)


def register_peft_target_modules() -> bool:
    """Gives each ``dip_ext_<family>`` model type the target modules peft uses for ``<family>`` (LoRA and every
    other method peft keeps such a table for), so ``LoraConfig()`` without ``target_modules`` works on a
    compacted model, and refuses adaption prompt where peft offers it for the dense family
    (:data:`ADAPTION_PROMPT_REFUSAL`, raised when peft wraps or runs the model). Returns False when peft is not
    installed (it is optional)."""
    try:
        from peft.utils import constants
    except ImportError:
        return False
    tables = [v for k, v in vars(constants).items() if k.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(v, dict)]
    for table in tables:
        for family in FAMILIES:
            if family.base_model_type in table:
                table.setdefault(family.config.model_type, table[family.base_model_type])
    try:
        from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG as adaption_prompt_models
    except ImportError:  # a peft without adaption prompt (or that moved it): nothing to refuse
        return True
    for family in FAMILIES:
        if family.base_model_type in adaption_prompt_models:
            adaption_prompt_models.setdefault(family.config.model_type, PeftRefusal(ADAPTION_PROMPT_REFUSAL))
    return True


def from_pretrained(path: Union[str, os.PathLike], **kwargs) -> nn.Module:
    """Loads a compacted model saved by ``save_pretrained`` from the folder ``path``.

    ``kwargs`` go to ``from_pretrained`` (dtype, device_map…). Raises FileNotFoundError without a config.json,
    ValueError for a folder that is not a compacted model, UnsupportedModelError for an unknown family.
    """
    folder = Path(path)
    cfg = read_json(folder / "config.json", f"{folder} has no config.json (not a saved model folder)")
    if "disp_masks" not in cfg:
        raise ValueError(f"{folder} is not a dip_ext compacted model (config.json has no disp_masks); "
                         "load a dense model with transformers.AutoModelForCausalLM")
    base = cfg.get("disp_base_model_type")
    family = next((f for f in FAMILIES if f.base_model_type == base), None)
    if family is None:
        raise UnsupportedModelError(f"{folder}: unknown compacted family {base!r} (a family of your own: import its "
                                    "module and call dip_ext.families.register_family(FAMILY) before loading)")
    return family.model.from_pretrained(folder, **kwargs)
