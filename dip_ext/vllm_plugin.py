"""dip_ext's vLLM plugin (the ``vllm.general_plugins`` entry point ``dip_ext``): vLLM calls :func:`register` in each
of its processes before it reads a model's config. Only vLLM imports this module.

It registers dip_ext's compacted config classes with transformers (importing dip_ext does: a saved folder's
``config.json`` then loads without ``trust_remote_code``) and the native model class of :mod:`dip_ext.vllm_model`
under the architectures saved LLaMA-style folders name. The class is registered itself, not by name: vLLM inspects a
class registered by name in a subprocess started in the current directory, where a dip_ext source checkout would
shadow the installed package (and importing dip_ext initialises no accelerator, which registering by name avoids).
A folder of another family has no native class: vLLM serves it through its Transformers backend
(``--trust-remote-code --model-impl transformers``), which ``model_impl="transformers"`` also selects for any folder.
"""

from __future__ import annotations

from vllm import ModelRegistry

from .vllm_model import ARCHITECTURES, DipExtVllmForCausalLM

__all__ = ["register"]


def register() -> None:
    """Registers the native model class with vLLM's ``ModelRegistry`` for every architecture of
    :data:`dip_ext.vllm_model.ARCHITECTURES` (idempotent: vLLM may call it several times per process)."""
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, DipExtVllmForCausalLM)
