"""What a family adapter provides: widths, decoder layers, mask points, layer compaction, parameter counts.

Adapters are the only code that knows a family's module names. The parameter count of a layer at given kept
widths is one formula for every family (:meth:`FamilyAdapter.linear_params`), fed by the family's
:class:`LayerShapes`, which state the widths and biases its dense modules are built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..masks import KV_GROUPS, DispMasks, ModelDims
from ..space import PrunableSpace, Structure
from .layers import CompactedLayer, keeps_attention, keeps_mlp

#: Where the masked reference multiplies a mask: on a module's input or on its output.
MaskPoint = tuple[nn.Module, Literal["input", "output"]]


@dataclass(frozen=True)
class LayerShapes:
    """The widths and biases of one dense decoder layer's linears, as the family's modules build them.

    ``q_out``: output width of the query projection (heads × head_dim, which need not equal the hidden size) and
    input width of the attention output projection; ``kv_out``: output width of the key and of the value
    projection (``kv_heads × head_dim``); ``kv_heads``: the KV heads, one KV group each (the query heads divide
    evenly among them); ``qkv_bias`` / ``o_bias``: whether q, k, v / the attention output
    projection have biases; ``mlp_in_linears``: linears reading the MLP input (2 for gate + up, 1 for fc1);
    ``mlp_in_bias`` / ``mlp_out_bias``: biases of those / of the MLP's output projection.
    """

    q_out: int
    kv_out: int
    kv_heads: int
    qkv_bias: bool
    o_bias: bool
    mlp_in_linears: int
    mlp_in_bias: bool
    mlp_out_bias: bool

    @property
    def group_q(self) -> int:
        """Query-projection rows (= o_proj input columns) of one KV group: its query heads × head_dim."""
        return self.q_out // self.kv_heads

    @property
    def group_kv(self) -> int:
        """Key (and value) projection rows of one KV group: head_dim."""
        return self.kv_out // self.kv_heads

    def kv_cache_bytes(self, kept_groups: int, itemsize: int) -> int:
        """KV-cache bytes per token of one layer keeping ``kept_groups`` groups, at ``itemsize`` bytes per value
        (a key and a value of head_dim each per group)."""
        return 2 * kept_groups * self.group_kv * itemsize


def block_points(attn_inputs: tuple[nn.Module, ...], attn_output: nn.Module, mlp_inputs: tuple[nn.Module, ...],
                 mlp_output: nn.Module) -> dict[str, list[MaskPoint]]:
    """The mask points of a layer with these linears: ``attn_in`` on the inputs of q/k/v, ``attn_out`` on the
    attention output projection's output, ``mlp_in`` on the MLP input linears' inputs, ``mlp_mid`` on the MLP
    output linear's input and ``mlp_out`` on its output; ``kv_groups`` on the attention output projection's input
    (a group's mask covers its query heads' columns there, so a dropped group's heads contribute nothing)."""
    return {"attn_in": [(m, "input") for m in attn_inputs], "attn_out": [(attn_output, "output")],
            "mlp_in": [(m, "input") for m in mlp_inputs], "mlp_mid": [(mlp_output, "input")],
            "mlp_out": [(mlp_output, "output")], KV_GROUPS: [(attn_output, "input")]}


class FamilyAdapter:
    """Knows one model family: its widths, where its masks apply, and how a layer is compacted.

    Subclasses set ``dense_model`` (the family's Hugging Face CausalLM class) and ``layer_class`` (its compacted
    decoder layer, built as ``layer_class(dense_layer, idx)``) and implement :meth:`shapes` and
    :meth:`dense_mask_points`; :meth:`dims` and :meth:`base_layers` default to the common
    ``num_hidden_layers`` / ``hidden_size`` / ``intermediate_size`` and ``base_model.layers``.
    """

    #: The dense Hugging Face ``*ForCausalLM`` class of the family.
    dense_model: type
    #: The family's compacted decoder layer class.
    layer_class: type
    #: Whether KV groups compete for the parameter budget when the caller leaves it to the defaults
    #: (``PruneConfig.prune_heads=None``): only where every serving route of the family runs per-layer head counts
    #: (the native vLLM model, the exports) and dropping a group does not remove a whole attention (see
    #: :func:`dip_ext.selection.budget.heads_by_default`).
    heads_by_default: bool = False

    @property
    def name(self) -> str:
        """The family's ``model_type``, e.g. "llama"."""
        return self.dense_model.config_class.model_type

    @property
    def model_types(self) -> tuple[str, ...]:
        """``config.model_type`` values this adapter handles."""
        return (self.name,)

    @property
    def architectures(self) -> tuple[str, ...]:
        """Hugging Face class names, for messages."""
        return (self.dense_model.__name__,)

    def check_supported(self, config) -> None:
        """Raises UnsupportedModelError for variants of the family this adapter cannot compact."""

    def dims(self, config) -> ModelDims:
        """Layer count, residual width, MLP width and KV groups of a model of ``config``."""
        return ModelDims(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                         self.shapes(config).kv_heads)

    def space(self, config) -> PrunableSpace:
        """What can be pruned in a model of ``config``: per decoder layer, the structures and their sizes
        (:class:`~dip_ext.space.PrunableSpace`). Default: :meth:`dims`' uniform space (the five DISP sets in every
        layer, and optional KV groups). A family whose layers differ, or that prunes a structure of its own,
        overrides this together with :meth:`dense_mask_points`, :meth:`linear_params` and its compacted layer."""
        return self.dims(config).space()

    def shapes(self, config) -> LayerShapes:
        """The linears' widths and biases of one dense decoder layer of ``config`` (as the family's modules read
        the config: e.g. ``head_dim`` when the family's attention reads it)."""
        raise NotImplementedError

    def base_layers(self, base_model: nn.Module) -> nn.ModuleList:
        """The decoder layers of the family's base model (``LlamaModel``…, the ``model`` of a ``*ForCausalLM``)."""
        return base_model.layers

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a ``*ForCausalLM`` model."""
        return self.base_layers(model.model)

    def dense_mask_points(self, layer: nn.Module) -> dict[str, list[MaskPoint]]:
        """:meth:`mask_points` of a layer known to be dense."""
        raise NotImplementedError

    def compact_layer(self, layer: nn.Module, idx: dict[str, torch.Tensor]) -> nn.Module:
        """A compacted replacement for dense ``layer`` keeping the index sets ``idx`` (sorted int64)."""
        return self.layer_class(layer, idx)

    def mask_points(self, layer: nn.Module) -> dict[str, list[MaskPoint]]:
        """For each structure, the (module, "input"|"output") places its 0/1 mask multiplies in a dense layer.

        Raises ValueError for a compacted layer (its pruned modules are gone).
        """
        if isinstance(layer, CompactedLayer):
            raise ValueError(f"mask points need a dense decoder layer; {type(layer).__name__} is already compacted: "
                             "use the dense original model")
        return self.dense_mask_points(layer)

    def score_mask_width(self, layer: nn.Module, structure: Structure) -> int:
        """The width of the mask the calibration scores ``structure`` of the dense ``layer`` with: one entry per
        unit, or, for a structure scored by column (``structure.column_scores``), one per column of its (linear)
        mask point, which its units divide evenly. ValueError otherwise."""
        if not structure.column_scores:
            return structure.size
        module, where = self.mask_points(layer)[structure.name][0]
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{structure.name} is scored by column but its mask point is a "
                             f"{type(module).__name__}, not a linear layer")
        width = module.in_features if where == "input" else module.out_features
        if width % structure.size:
            raise ValueError(f"{structure.name}: {structure.size} units do not divide the {width} columns of its "
                             "mask point")
        return width

    def calibration_points(self, layer: nn.Module) -> dict[str, MaskPoint]:
        """Activations to collect statistics on, keyed by the structure they score (dense layer)."""
        return {s: pts[0] for s, pts in self.mask_points(layer).items()}

    def compact_layers(self, model: nn.Module, masks: DispMasks) -> None:
        """Replaces every decoder layer of the ``*ForCausalLM`` ``model`` by its compacted form (weights sliced,
        dense ones dropped): :meth:`compact_base_model` of its base model.

        Raises :class:`~dip_ext.errors.MaskError` when ``masks`` do not fit the model.
        """
        self.compact_base_model(model.model, masks)

    def compact_base_model(self, base_model: nn.Module, masks: DispMasks) -> None:
        """Replaces every decoder layer of the family's base model ``base_model`` by its compacted form.

        Raises :class:`~dip_ext.errors.MaskError` when ``masks`` do not fit the model.
        """
        masks.validate(self.space(base_model.config))
        layers = self.base_layers(base_model)
        for i in range(len(layers)):
            layers[i] = self.compact_layer(layers[i], masks[i])

    def linear_params(self, config, widths: dict, layer: int = 0) -> dict:
        """Parameters (weights + biases) stored by decoder layer ``layer``'s attention and MLP linears at these kept
        widths: what each kept element of the layer's structures costs (a family with a space of its own overrides
        this; the built-in families' layers are alike, so ``layer`` is not read here).

        ``widths`` maps each structure to its kept width (ints, or tensors for a differentiable count);
        ``kv_groups`` may be absent (every group kept). Attention, with ``g`` groups kept of ``G``:
        ``|attn_in|·(q_out + 2·kv_out)·g/G + q_out·|attn_out|·g/G`` plus biases, stored only when ``attn_out`` is
        non-empty and ``g > 0``; MLP: ``n·|mlp_in|·|mlp_mid| + |mlp_mid|·|mlp_out|`` plus biases (n = 1 or 2 input
        linears), stored when ``mlp_out`` is non-empty and it has a channel or an output bias (the DISP paper's
        count, Gao et al., NeurIPS 2024, with biases).
        """
        s = self.shapes(config)
        a_in, a_out = widths["attn_in"], widths["attn_out"]
        m_in, mid, m_out = widths["mlp_in"], widths["mlp_mid"], widths["mlp_out"]
        groups = widths.get(KV_GROUPS, s.kv_heads)
        qkv_out = groups * (s.group_q + 2 * s.group_kv)
        q_out = groups * s.group_q
        attn = mlp = 0
        if keeps_attention(a_out) and groups > 0:
            attn = a_in * qkv_out + q_out * a_out + qkv_out * s.qkv_bias + a_out * s.o_bias
        if keeps_mlp(mid, m_out, s.mlp_out_bias):
            n = s.mlp_in_linears
            mlp = n * m_in * mid + mid * m_out + n * mid * s.mlp_in_bias + m_out * s.mlp_out_bias
        return {"attn": attn, "mlp": mlp}
