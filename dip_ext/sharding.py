"""Sharding the frozen model across ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``) for mask learning
and as the teacher of the recovery.

For models whose weights do not fit one device. Only the calibration pass, the hypernetwork training and the
recovery's distillation (as the frozen teacher) see the sharded model; they just run forwards / backwards through
it (the masks are hooks on submodules, which FSDP2 keeps as they are), with every rank running the same number of
them (they are collectives).

The flow (``dip-ext prune --fsdp`` under torchrun)::

    rank 0: loads the model in full on the CPU (it keeps this copy: it is what gets compacted and saved)
    every rank: builds the model on the meta device -> fully_shard(each decoder layer), fully_shard(model)
        -> to_empty(device) -> set_model_state_dict(full, broadcast_from_rank0) -> buffers from rank 0
    every rank: calibration + hypernetwork on the sharded model (identical masks on all ranks)
    rank 0: compacts its full CPU copy with those masks, moves it to the device, evaluates and saves it
    with recovery (--recover distill): the compacted model is replicated to every rank (replicate_from_main);
        every rank distils its whole copy data-parallel, the sharded dense model is the teacher

Memory: each GPU holds ``1 / world_size`` of the weights plus one decoder layer gathered in full at a time
(``reshard_after_forward=True``), plus activations; rank 0's node also holds one full copy in CPU memory.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from . import distributed as dist
from . import zoo
from .compaction import require_dense
from .families import adapter_for

__all__ = ["shard_frozen_model", "load_sharded", "replicate_from_main"]


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.world_size(),))


def shard_frozen_model(full: Optional[nn.Module], config, device, dtype: torch.dtype) -> nn.Module:
    """An FSDP2-sharded copy of rank 0's ``full`` model, on ``device`` (every rank calls this).

    Args:
        full: on rank 0, the loaded model (any device; it is read, not changed); ignored on the other ranks
            (pass None there: they never need the whole model in memory).
        config: the model's Hugging Face config, the same on every rank (e.g. broadcast from rank 0).
        device: this rank's device (``cuda:LOCAL_RANK``, or ``cpu`` with gloo).
        dtype: the weights' dtype.

    Returns the sharded model in eval mode with ``requires_grad`` off: each decoder layer and the root are
    ``fully_shard``-ed (the root holds the embeddings, the final norm and the LM head). Weights come from
    rank 0 through ``set_model_state_dict(..., broadcast_from_rank0=True)``; buffers that no state dict holds
    (rotary ``inv_freq``) are broadcast from rank 0 as well.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    if not dist.is_distributed():
        raise RuntimeError("sharding the model (--fsdp) needs torch.distributed: launch with torchrun")
    device = torch.device(device)
    if dist.is_main() and full is None:
        raise ValueError("rank 0 must pass the loaded model to shard_frozen_model")
    with torch.device("meta"):  # a config of its own: rank 0 compacts its full model, config included, in place
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    adapter = adapter_for(model)  # unsupported families fail here, on every rank
    mesh = _mesh(device)
    for layer in adapter.decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    model.to_empty(device=device)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.state_dict().items()} \
        if dist.is_main() else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del state
    source = dict(full.named_buffers()) if dist.is_main() else {}
    for name, buf in model.named_buffers():
        if dist.is_main():
            if name not in source:
                raise RuntimeError(f"buffer {name} of the sharded model is not in the loaded model")
            buf.copy_(source[name].to(buf.device, buf.dtype))
        _broadcast_(buf)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _broadcast_(t: torch.Tensor) -> None:
    """Rank 0's ``t`` on every rank, in place (staged through the collective device)."""
    staged = t.detach().to(dist.collective_device())
    torch.distributed.broadcast(staged, src=0)
    t.detach().copy_(staged)


def load_sharded(name_or_path: Optional[str], device, dtype: str, *,
                 what: str = "--fsdp pruning") -> tuple[nn.Module, Optional[nn.Module], object]:
    """Rank 0 loads the dense model on the CPU; every rank gets an FSDP2-sharded copy on ``device``.

    ``name_or_path``: as :func:`dip_ext.zoo.resolve_model`; ``what``: the use named when the model is not dense.
    Returns ``(sharded model, rank 0's full model or None, tokenizer)``. A model rank 0 cannot use fails on every
    rank with rank 0's message (ValueError).
    """
    if dist.world_size() < 2:
        raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N (N >= 2)")
    loaded: list = [None]

    def load():
        full, tokenizer = zoo.resolve_model(name_or_path, dtype=dtype, device="cpu")
        require_dense(full, what)
        loaded[0] = full
        return full.config, tokenizer

    config, tokenizer = dist.read_on_main(load, errors=(ValueError, FileNotFoundError, ImportError, zoo.ZooError))
    model = shard_frozen_model(loaded[0], config, device, zoo.as_dtype(dtype))
    return model, loaded[0], tokenizer


def replicate_from_main(model: Optional[nn.Module], device) -> nn.Module:
    """Rank 0's whole (unsharded) ``model`` on every rank, on ``device``; every rank calls this.

    For the compacted student of a sharded run, which only rank 0 holds: the other ranks build the same
    architecture from rank 0's config (a compacted config carries ``disp_masks``, so
    ``AutoModelForCausalLM.from_config`` builds the dip_ext class) on the meta device, allocate it on ``device``
    (``to_empty``, tied weights tied again) and receive every parameter and buffer from rank 0, so all ranks hold
    bit-identical copies with rank 0's ``requires_grad`` flags and train / eval mode.

    Args:
        model: on rank 0, the model to replicate (moved to ``device`` and returned, not copied); ignored on the
            other ranks (pass None there).
        device: this rank's device (``cuda:LOCAL_RANK``, or ``cpu`` with gloo).

    Raises RuntimeError without a process group; on every rank, ValueError when rank 0 passes None and
    RuntimeError when a rank's build differs from rank 0's model (parameter or buffer names, shapes, dtypes).
    """
    if not dist.is_distributed():
        raise RuntimeError("replicating the model across ranks needs torch.distributed: launch with torchrun")
    device = torch.device(device)

    def describe():
        if model is None:
            raise ValueError("rank 0 must pass the model to replicate_from_main")
        model.to(device)
        return model.config, _signature(model), [p.requires_grad for p in model.parameters()], model.training

    config, signature, grads, training = dist.read_on_main(describe)
    if dist.is_main():
        replica = model
    else:
        with torch.device("meta"):
            replica = AutoModelForCausalLM.from_config(config, dtype=signature[0][2])
        replica.to_empty(device=device)
        replica.tie_weights()  # to_empty gives every tied parameter a tensor of its own
    dist.check_same(_signature(replica), "the replicated model's parameters and buffers")
    with torch.no_grad():
        for t in [*replica.parameters(), *replica.buffers()]:
            _broadcast_(t)
    for p, grad in zip(replica.parameters(), grads):
        p.requires_grad_(grad)
    return replica.train(training)


def _signature(model: nn.Module) -> list[tuple]:
    """``(name, shape, dtype)`` of every parameter, then of every buffer."""
    return [(n, tuple(t.shape), t.dtype) for n, t in [*model.named_parameters(), *model.named_buffers()]]
