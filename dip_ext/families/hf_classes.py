"""Mixins of the Hugging Face classes of compacted models, and the record that names one family's classes.

Each family declares ``DipExt<Family>Config(DipExtConfig, <Family>Config)``,
``DipExt<Family>Model(DipExtModel, <Family>Model)`` (the base model) and
``DipExt<Family>ForCausalLM(DipExtForCausalLM, <Family>ForCausalLM)``. A compacted checkpoint is an ordinary
Hugging Face folder: safetensors weights of the compacted matrices and a ``config.json`` whose ``model_type``
is ``dip_ext_<family>``, which carries the index sets (``disp_masks``) and an ``auto_map`` to a small
``modeling_dip_ext.py`` that imports these classes from :mod:`dip_ext.modeling`, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (and ``AutoModel``, which vLLM's
Transformers backend builds) loads it where dip_ext is installed.

The dense class of the family must never load such a folder as if it were dense (a removed block would be
initialised at random with only a warning): ``config.json`` stores a :data:`LOAD_GUARD` string as ``use_cache``,
which the dense config classes reject (they validate it as a bool), and the real value as ``disp_use_cache``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..files import atomic_write_text, honour_umask
from ..masks import KV_GROUPS, DispMasks
from ..space import PrunableSpace
from ..modules import place_index_sets
from .base import FamilyAdapter

#: what loading a saved folder without dip_ext says
MISSING_PACKAGE = ("this checkpoint was compacted by dip_ext, which is not installed here (or its compiled "
                   "extension does not load): build it from its source with `pip install --no-build-isolation "
                   "<dip_ext source folder>` after installing torch, then load the folder again")
REMOTE_CODE_FILE = "modeling_dip_ext.py"
#: What a compacted checkpoint's config.json holds as ``use_cache``: the dense classes refuse it, naming dip_ext.
LOAD_GUARD = ("dip_ext compacted checkpoint, not a dense model: load it with dip_ext.from_pretrained(dir), or "
              "AutoModelForCausalLM.from_pretrained(dir) after `import dip_ext`, or with trust_remote_code=True")


def is_compacted(model_or_config) -> bool:
    """True for a compacted model (or its config): its config carries the index sets."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "disp_masks", None) is not None


class DipExtConfig:
    """Config mixin: ``disp_masks`` (index sets), ``disp_base_model_type``, ``disp_dense_params`` (the dense
    original's parameter counts) on top of the family's config; writes :data:`LOAD_GUARD` into config.json."""

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """``PreTrainedConfig.from_dict`` of a config.json written by :meth:`to_json_file` (or before the guard)."""
        config_dict = dict(config_dict)
        real = config_dict.pop("disp_use_cache", True)
        if config_dict.get("use_cache") == LOAD_GUARD:
            config_dict["use_cache"] = real
        return super().from_dict(config_dict, **kwargs)

    def to_json_file(self, json_file_path: Union[str, os.PathLike], use_diff: bool = True) -> None:
        """Writes config.json with ``use_cache`` replaced by :data:`LOAD_GUARD` (the value goes to
        ``disp_use_cache``)."""
        data = json.loads(self.to_json_string(use_diff=use_diff))
        data["disp_use_cache"] = bool(self.use_cache)
        data["use_cache"] = LOAD_GUARD
        atomic_write_text(json_file_path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _refuse_partial_groups_in_vllm(masks: DispMasks, space: PrunableSpace) -> None:
    """ValueError (one line) when a layer keeps some but not all of its KV groups (their count: the layer's size of
    ``kv_groups`` in the family's prunable ``space``): vLLM's Transformers backend builds every layer's attention
    and KV-cache entry with the config's (dense) head counts."""
    if not masks.prunes_heads:
        return
    # a layer whose masks have no attn_out (its space prunes no attention output) keeps its attention
    partial = [i for i, layer in enumerate(masks.layers)
               if KV_GROUPS in layer and 0 < layer[KV_GROUPS].numel() < space.size(i, KV_GROUPS)
               and ("attn_out" not in layer or layer["attn_out"].numel())]
    if partial:
        counts = sorted({space.size(i, KV_GROUPS) for i in partial})
        groups = counts[0] if len(counts) == 1 else counts
        raise ValueError(f"layers {partial} of this compacted model keep fewer KV groups than its {groups}: vLLM's "
                         "Transformers backend gives every layer the config's heads and KV-cache size, so it cannot "
                         "run them; serve it without --model-impl transformers (dip_ext's native vLLM model runs "
                         "per-layer heads of Llama, Mistral, Qwen2 and Qwen3 folders) or serve its DeciLM export "
                         "(dip-ext export --to decilm)")


class DipExtCompacted:
    """Mixin of both compacted model classes (the ``*ForCausalLM`` and its base model): builds the compacted
    structure from ``config.disp_masks`` (:meth:`disp_compact`) so ``from_pretrained`` loads compacted weights,
    and puts index sets on their devices after loading.

    ``disp_adapter``: the family's adapter (set by each family's class). ``_no_split_modules`` (the decoder layer
    classes ``device_map="auto"`` keeps whole) lists, after the dense class's names, each one's compacted
    ``DipExt<name>`` too.
    """

    disp_adapter: FamilyAdapter

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if all(issubclass(base, DipExtCompacted) for base in cls.__bases__):
            return  # a mixin (DipExtModel, DipExtForCausalLM): the family's class reads its dense base's names
        dense = [n for n in getattr(cls, "_no_split_modules", None) or [] if not n.startswith("DipExt")]
        cls._no_split_modules = dense + [f"DipExt{n}" for n in dense]

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        space = self.disp_adapter.space(config)
        with torch.device("cpu"):  # from_pretrained builds models under a meta-device context
            # the masks must fit the family's space of this config, not only the widths they were saved with
            masks = DispMasks.from_config(config.disp_masks).validate(space)
        if getattr(config, "_attn_implementation", None) == "vllm":  # vLLM's Transformers backend builds us
            _refuse_partial_groups_in_vllm(masks, space)
        self.disp_compact(masks)
        place_index_sets(self)

    def disp_compact(self, masks: DispMasks) -> None:
        """Replaces the freshly built dense decoder layers by their compacted form (called by ``__init__``)."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then every index set copied to its module's device: loading with
        ``device_map`` places weights without ``Module.to``, and a lazy copy on the first forward would land
        inside a captured CUDA graph. Hub kernels are off unless asked for (``use_kernels=True``): the compacted
        layers run dip_ext's own kernels, and transformers >= 5.25 would otherwise try to swap them whenever the
        ``kernels`` package is installed, refusing ``device_map`` "meta" on the way."""
        kwargs.setdefault("use_kernels", False)
        loaded = super().from_pretrained(*args, **kwargs)
        place_index_sets(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    @property
    def disp_masks(self) -> DispMasks:
        """The index sets this model was compacted with."""
        return DispMasks.from_config(self.config.disp_masks)


class DipExtModel(DipExtCompacted):
    """Base-model mixin (``DipExt<Family>Model(DipExtModel, <Family>Model)``): the decoder stack of a compacted
    model without its LM head, as ``AutoModel`` loads it from a saved folder (``auto_map``'s ``AutoModel``
    entry, the class serving engines such as vLLM's Transformers backend build and wrap with their own head)."""

    def disp_compact(self, masks: DispMasks) -> None:
        self.disp_adapter.compact_base_model(self, masks)


class DipExtForCausalLM(DipExtCompacted):
    """CausalLM mixin: the compacted model with its LM head; saves the remote-code shim with the checkpoint.

    ``disp_base_model``: the family's compacted base-model class (a :class:`DipExtModel`), which the saved
    ``auto_map`` names for ``AutoModel``. The CausalLM's own ``model`` stays the dense family's base class with
    compacted layers.
    """

    disp_base_model: type

    def disp_compact(self, masks: DispMasks) -> None:
        self.disp_adapter.compact_layers(self, masks)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``save_pretrained`` plus the remote-code shim, so ``trust_remote_code=True`` loaders work: ``auto_map``
        names the config, the CausalLM and the base model (``AutoModel``)."""
        module = REMOTE_CODE_FILE[:-3]
        config_name, model_name = type(self.config).__name__, type(self).__name__
        base_name = self.disp_base_model.__name__
        self.config.auto_map = {"AutoConfig": f"{module}.{config_name}",
                                "AutoModel": f"{module}.{base_name}",
                                "AutoModelForCausalLM": f"{module}.{model_name}"}
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            # transformers writes the weight files owner-only (0600) whatever the umask; a server running as
            # another user must be able to read a saved model
            for weights in Path(save_directory).glob("model*.safetensors"):
                honour_umask(weights)
            # the import sits in a try block so that transformers' own check (which would advise "pip install
            # dip_ext", a name no registry serves) leaves the explanation to us
            # a family registered from outside the package: its classes are imported from its own module
            source = type(self).__module__
            builtin = source.startswith("dip_ext.")
            missing = MISSING_PACKAGE if builtin else (
                f"this checkpoint's dip_ext family is declared in the module {source!r}, which is not importable "
                "here (or dip_ext is not installed): put that module on the Python path and load the folder again")
            text = ('"""Written by dip_ext: lets AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) '
                    'load this\nDISP-compacted checkpoint. It needs the dip_ext package (its compiled kernels) '
                    'installed."""\n'
                    "try:\n"
                    f"    from {'dip_ext.modeling' if builtin else source} import {config_name}, {base_name}, "
                    f"{model_name}  # noqa: F401\n"
                    "except ImportError as error:\n"
                    f"    raise ImportError({missing!r}) from error\n")
            atomic_write_text(Path(save_directory) / REMOTE_CODE_FILE, text)


@dataclass(frozen=True)
class Family:
    """One family's adapter and classes: the dense config / CausalLM it compacts, and the compacted config,
    CausalLM and base model."""

    adapter: FamilyAdapter
    dense_config: type
    dense_model: type
    config: type
    model: type
    base_model: type

    @classmethod
    def of(cls, model: type) -> "Family":
        """The record of a ``DipExt<Family>ForCausalLM`` class (its adapter, config class, base-model class
        ``disp_base_model`` and dense bases). Raises TypeError when a class lists its dip_ext mixin after its dense
        class (the mixin must come first), lacks ``disp_base_model`` / ``disp_adapter``, or when the base-model class
        does not belong with it."""
        for cls_, mixin in ((model, DipExtForCausalLM), (getattr(model, "config_class", None), DipExtConfig),
                            (getattr(model, "disp_base_model", None), DipExtModel)):
            if not isinstance(cls_, type) or not issubclass(cls_, mixin) or cls_.__bases__[0] is not mixin:
                raise TypeError(f"{getattr(cls_, '__name__', cls_)!s}: a compacted family class is declared as "
                                f"class X({mixin.__name__}, <dense class>), the mixin first (and the CausalLM sets "
                                "config_class and disp_base_model)")
        if not isinstance(getattr(model, "disp_adapter", None), FamilyAdapter):
            raise TypeError(f"{model.__name__}.disp_adapter must be the family's FamilyAdapter instance")
        dense_model = next(b for b in model.__bases__ if not issubclass(b, DipExtForCausalLM))
        config = model.config_class
        dense_config = next(b for b in config.__bases__ if not issubclass(b, DipExtConfig))
        base = model.disp_base_model
        if not (issubclass(base, DipExtModel) and base.config_class is config
                and base.disp_adapter is model.disp_adapter):
            raise TypeError(f"{model.__name__}.disp_base_model must be a DipExtModel with its config class and "
                            f"adapter; got {base.__name__}")
        return cls(model.disp_adapter, dense_config, dense_model, config, model, base)

    @property
    def base_model_type(self) -> str:
        return self.dense_config.model_type

    def adopt(self, model: nn.Module, masks: DispMasks, dense_params: dict) -> None:
        """Turns a freshly compacted dense model into the compacted class (in place).

        The config records the index sets (against the family's prunable space of the model:
        :meth:`~dip_ext.masks.DispMasks.to_config`), the family and the dense original's parameter counts.
        """
        config = model.config
        config.disp_masks = masks.to_config(self.adapter.space(config))
        config.disp_base_model_type = self.base_model_type
        config.disp_dense_params = dict(dense_params)
        config.__class__ = self.config
        config.architectures = [self.model.__name__]
        model.__class__ = self.model
