"""LoRA adapters on a compacted model through ``peft``, merged back so the result is an ordinary dip_ext model.

The compacted layers hold plain ``nn.Linear`` modules under the dense model's names (``q_proj``, ``down_proj``,
``fc1`` ...), so peft's LoRA wraps them as it would in the dense model. ``target_modules`` are passed explicitly:
the names of every ``nn.Linear`` inside the decoder layers (never the LM head).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..families import adapter_for

__all__ = ["linear_names", "lora_wrapped"]


def linear_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of the ``nn.Linear`` modules inside ``model``'s decoder layers (peft target_modules)."""
    names = set()
    for layer in adapter_for(model).decoder_layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


@contextmanager
def lora_wrapped(model: nn.Module, rank: int, alpha: float, seed: int) -> Iterator[nn.Module]:
    """``model`` with LoRA adapters of ``rank`` / ``alpha`` on every decoder linear (peft, dropout 0, A initialised
    from ``seed`` without touching the global RNG); only the adapters require grad. On exit the adapters are merged
    into the linears (W ← W + alpha/rank · B A) and removed, also when the body raises, so ``model`` is again a plain
    compacted model (same classes, same state-dict keys) holding the trained weights.

    ImportError naming the package when peft is not installed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # optional dependency
        raise ImportError("LoRA recovery (recover_lora_rank > 0) needs peft: pip install peft") from e
    targets = linear_names(model)
    if not targets:
        raise ValueError("the model's decoder layers hold no nn.Linear to put LoRA adapters on")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing`` alias: nothing a caller can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, config)
    try:
        yield wrapped
    finally:
        wrapped.merge_and_unload()
