"""The checks every recovery entry point makes before any work: a compacted student, a dense teacher of the same
architecture and vocabulary, usable training and held-out windows that are not evaluation text, and options a
sharded (FSDP) teacher can run."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import data
from ..compaction import is_compacted
from ..distributed import is_sharded
from ..families import adapter_for, base_model_type
from ..mixtures import parse_mixture
from ..tokens import check_windows

__all__ = ["check_pair", "check_training_windows", "check_training_text", "check_sharded_teacher",
           "check_lockstep_batch", "check_reconstruction_teacher", "recovery_texts"]

#: config fields that must agree between student and teacher (the student is the teacher, pruned)
_SAME_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "ffn_dim")


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """ValueError unless ``student`` is a dip_ext-compacted model and ``teacher`` a dense model it was pruned from:
    the same family, widths, layer count, heads and vocabulary (UnsupportedModelError for an unsupported family)."""
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise ValueError("recovery needs the compacted student and the dense teacher as torch modules")
    if student is teacher:
        raise ValueError("the teacher must be a separate dense copy of the model, not the student itself")
    if not is_compacted(student):
        raise ValueError("the student is not a compacted model (no disp_masks in its config): prune and compact it "
                         "first (dip_ext.compact / dip-ext prune)")
    if is_compacted(teacher):
        raise ValueError("the teacher is a compacted model; pass the dense model the student was pruned from")
    adapter_for(teacher)
    s_type, t_type = base_model_type(student.config), base_model_type(teacher.config)
    if s_type != t_type:
        raise ValueError(f"the teacher is a {t_type} model but the student was pruned from a {s_type} model")
    for name in _SAME_FIELDS:
        a, b = getattr(student.config, name, None), getattr(teacher.config, name, None)
        if a != b:
            what = "vocabulary" if name == "vocab_size" else name
            raise ValueError(f"the teacher's {what} ({b}) differs from the student's ({a}): pass the dense model "
                             "the student was pruned from")


def check_reconstruction_teacher(teacher: nn.Module) -> None:
    """ValueError for an FSDP-sharded ``teacher``: reconstruction runs the teacher's decoder layers one by one
    and stops its forwards part-way, which FSDP's gathers of the whole model's units do not support."""
    if is_sharded(teacher):
        raise ValueError(_NO_SHARDED_RECONSTRUCTION)


def check_sharded_teacher(config, world_size: int) -> None:
    """ValueError unless the recovery ``config`` (a :class:`~dip_ext.recovery.RecoveryConfig`) can run with the
    teacher sharded over ``world_size`` ranks: distillation only (no reconstruction), the teacher kept in the
    dtype it was sharded in (FSDP2 does not cast a sharded module in place), recovery text (a sharded teacher does
    not generate), and a step's batch that gives every
    rank the same teacher forwards (:func:`check_lockstep_batch`). Nothing to check with ``recover="off"``."""
    if config.recover == "off":
        return
    if config.recover in ("reconstruct", "auto"):
        raise ValueError(_NO_SHARDED_RECONSTRUCTION)
    if config.recover_data not in ("text", "auto"):  # auto resolves to text for a sharded teacher
        raise ValueError(f"--recover-data {config.recover_data} has the teacher generate text, which a sharded "
                         "(--fsdp) teacher does not do: use --recover-data text with --fsdp")
    if config.recover_teacher_dtype not in ("same", "auto"):  # auto keeps a sharded teacher's dtype
        raise ValueError("--recover-teacher-dtype casts the teacher in place, which a sharded (--fsdp) teacher "
                         "does not support: load the models in that dtype with --dtype")
    check_lockstep_batch(config.recover_batch, config.recover_micro_batch, world_size)


def check_lockstep_batch(batch: int, micro_batch: int, world_size: int) -> None:
    """ValueError unless a distillation step's global ``batch`` splits evenly over ``world_size`` ranks and each
    rank's share into whole micro-batches of ``micro_batch`` windows (or one, when the share is smaller): a sharded
    teacher's forward is a collective, so every rank must run the same number of them, of the same size."""
    if not _splits_evenly(batch, micro_batch, world_size):
        fit = next(b for b in range(batch, batch * world_size * micro_batch + 1) if _splits_evenly(b, micro_batch,
                                                                                                    world_size))
        raise ValueError(f"with a sharded (--fsdp) teacher every rank must run the same teacher forwards per step: "
                         f"--recover-batch {batch} must split evenly over world size {world_size} ranks and each "
                         f"rank's share into micro-batches of --recover-micro-batch {micro_batch} (e.g. "
                         f"--recover-batch {fit})")


def _splits_evenly(batch: int, micro_batch: int, world_size: int) -> bool:
    share, rest = divmod(batch, world_size)
    return rest == 0 and share % min(micro_batch, share) == 0


_NO_SHARDED_RECONSTRUCTION = ("reconstruction (--recover reconstruct / auto) runs the dense teacher layer by layer, "
                              "which a sharded (--fsdp) teacher does not support: use --recover distill with --fsdp")


def check_training_windows(windows: torch.Tensor, name: str, config, *,
                           forbidden: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``windows`` checked as token windows ``[n >= 1, seq_len >= 2]`` of ``config``'s vocabulary
    (:func:`dip_ext.tokens.check_windows`); ValueError also when any window of ``forbidden`` (e.g. evaluation
    windows) occurs among them: a model must never train on text it is judged on."""
    windows = check_windows(windows, name, config=config)
    if forbidden is not None and forbidden.numel() and forbidden.shape[1] == windows.shape[1]:
        seen = {tuple(w.tolist()) for w in windows}
        if any(tuple(w.tolist()) in seen for w in forbidden):
            raise ValueError(f"{name} contain evaluation windows: training on the text a model is evaluated on "
                             "makes the evaluation meaningless; use the calibration text's training windows")
    return windows


def check_training_text(name: str, eval_texts, calibration: Optional[str] = None) -> None:
    """ValueError when the training text ``name`` (or a text of the mixture ``name``) is one of the evaluation texts
    ``eval_texts`` (other than the calibration text ``calibration``, whose held-out part the pipeline already
    evaluates). A named text trains on
    its calibration split only, but a second evaluation text must stay unseen by the training altogether: its
    calibration part is the same source and domain, so a gain there would be domain adaptation, not recovery."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"recover_text must be a text name or file:PATH, got {name!r}")
    evaluated = set(eval_texts or ())
    for entry, _ in parse_mixture(name):  # each text of a mixture, its training-split suffix dropped
        if entry != calibration and entry in evaluated:
            within = f" (in the mixture {name!r})" if entry != name else ""
            raise ValueError(f"recover_text {entry!r}{within} is also an evaluation text: train on the calibration "
                             "text (or another file:) and evaluate on text the training never saw")


def recovery_texts(config, eval_texts, calibration: Optional[str]) -> list[str]:
    """What the recovery ``config`` (a :class:`~dip_ext.recovery.RecoveryConfig`, its automatic choices made) reads
    that needs the tokenizer, named for a message (empty with ``recover="off"``). ValueError, before any work, for a
    ``recover_text`` that is an evaluation text (:func:`check_training_text`), unknown or missing."""
    if config.recover == "off":
        return []
    needs = []
    if config.recover_text is not None:
        check_training_text(config.recover_text, eval_texts, calibration)
        for name, _ in parse_mixture(config.recover_text):  # each text of a mixture is read later
            data.get_text(name, "calibration")
        needs.append(config.recover_text)
    if config.recover_data != "text":
        needs.append(f"--recover-data {config.recover_data} (the dense model's own text)")
    return needs
