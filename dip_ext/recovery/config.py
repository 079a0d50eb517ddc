"""Options of the recovery stage (:func:`dip_ext.recovery.recover`), declared once like every pipeline option.

Flag names: ``--recover {off,reconstruct,distill,auto}`` and ``--recover-*`` for the rest, so they never collide
with the pruning, refit or evaluation options they sit beside on ``dip-ext prune``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, Optional

import torch

from ..mixtures import parse_mixture
from ..options import Options, check_fields, option

__all__ = ["RecoveryConfig", "bf16_native", "RECOVER_MODES", "RECOVER_DATA", "RECONSTRUCT_ONLY", "DISTILL_ONLY",
           "SELF_TEXT_ONLY"]

#: off: nothing; reconstruct: block-wise reconstruction only; distill: distillation only; auto: reconstruction,
#: then distillation from whichever of (pruned, reconstructed) scores better on the held-out windows, keeping the
#: best state seen on them
RECOVER_MODES = ("off", "reconstruct", "distill", "auto")
#: text: the recovery text's windows; self: text the dense model writes itself, prompted from that text
#: (:mod:`dip_ext.recovery.self_text`); mix: half each; auto: mix where the teacher can write (its tokenizer at
#: hand, not sharded), else text (:meth:`RecoveryConfig.resolved`)
RECOVER_DATA = ("auto", "text", "self", "mix")
#: the options only self-generated recovery data reads (refused with recover_data="text")
SELF_TEXT_ONLY = ("recover_self_temperature", "recover_self_prompt_len", "recover_self_batch", "recover_self_chat",
                  "recover_self_dtype")
#: the options only one of the two methods reads (a mode without it refuses them rather than ignore them)
RECONSTRUCT_ONLY = ("recover_recon_windows", "recover_recon_epochs", "recover_recon_lr")
DISTILL_ONLY = ("recover_steps", "recover_lr", "recover_batch", "recover_micro_batch", "recover_warmup",
                "recover_weight_decay", "recover_temperature", "recover_lm_weight", "recover_hidden_weight",
                "recover_lora_rank", "recover_lora_alpha", "recover_teacher_topk", "recover_autocast",
                "recover_grad_checkpointing", "recover_val_every")


def bf16_native(device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA device that supports it, or a CPU whose flags list
    AVX-512 or AMX bf16 instructions (Linux' /proc/cpuinfo; False where it cannot be read). Elsewhere bf16 matrix
    products are emulated, slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device.type == "cpu" and _cpu_bf16()


@functools.lru_cache(maxsize=None)
def _cpu_bf16() -> bool:
    """Whether this machine's CPU flags list AVX-512 or AMX bf16 (read once: every automatic choice asks)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class RecoveryConfig(Options):
    """How the compacted model is trained back toward the dense one after pruning.

    Distillation (Hinton et al. 2015): KL(teacher ‖ student) of the next-token distributions at temperature
    ``recover_temperature`` (scaled by T²), plus ``recover_lm_weight`` × the LM loss, plus
    ``recover_hidden_weight`` × the relative squared error of each decoder layer's residual output. Block-wise
    reconstruction: each compacted layer fitted in order to the dense model's hidden state after that layer, fed
    the pruned model's own input (see :mod:`dip_ext.recovery.reconstruct`).
    """

    _argument_group_name = "recovery"

    recover: Literal["off", "reconstruct", "distill", "auto"] = option(
        "distill", "after compaction, train the pruned model back toward the dense one. reconstruct: fit each decoder "
        "layer in turn to the dense layer's output (cheap, no full backward); distill: train on the dense model's "
        "next-token distribution; auto: reconstruct, then distill, keeping the best state on the held-out windows")
    recover_steps: int = option(280, "distillation optimizer steps (each --recover-batch windows)", minimum=0)
    recover_lr: float = option(3e-4, "peak learning rate of the distillation (AdamW; linear warm-up, cosine decay "
                               "to 10 % of it)", above=0.0)
    recover_batch: int = option(2, "windows per distillation step (the global batch, summed over ranks)",
                                minimum=1)
    recover_micro_batch: int = option(1, "windows per forward/backward (gradient accumulation up to "
                                      "--recover-batch)", minimum=1)
    recover_warmup: int = option(10, "warm-up steps (linear from 0 to --recover-lr)", minimum=0)
    recover_weight_decay: float = option(0.0, "AdamW weight decay", minimum=0.0)
    recover_temperature: float = option(1.0, "distillation temperature (KL of softened distributions, times T²)",
                                        above=0.0)
    recover_lm_weight: float = option(0.0, "weight of the next-token LM loss added to the KL", minimum=0.0)
    recover_hidden_weight: float = option(0.0, "weight of the hidden-state loss: relative squared error of each "
                                          "layer's residual output against the dense model's", minimum=0.0)
    recover_lora_rank: int = option(0, "0: train every weight of the decoder layers; r > 0: LoRA adapters of rank r "
                                    "on every linear (peft), merged back before saving", minimum=0)
    recover_lora_alpha: Optional[float] = option(None, "LoRA alpha (default: 2 × rank)", above=0.0)
    recover_teacher_dtype: Literal["auto", "same", "float32", "bfloat16", "float16"] = option(
        "auto", "dtype of the frozen dense teacher (lower: less memory; its logits are upcast to float32). auto: "
        "bfloat16 for distillation on a device that computes in it natively (a whole teacher), else the teacher's own")
    recover_teacher_topk: int = option(
        0, "0: run the teacher beside the student at every step; k > 0: run it once per training window first, "
        "keep its top-k next-token logits on disk (reused by later runs on the same windows), train on the KL over "
        "those k tokens plus the rest, and move an accelerator teacher to the CPU while training", minimum=0)
    recover_autocast: Optional[bool] = option(
        None, "run the student's forward under bf16 autocast (its weights and optimizer stay in their dtype). "
        "Default: on where the device computes in bf16 natively")
    recover_grad_checkpointing: bool = option(False, "recompute each layer's activations in the backward "
                                              "(less memory, ~30 % more time)")
    recover_val_every: int = option(35, "score the held-out windows every N steps; the best step's weights are "
                                    "kept (0: only at the start and the end)", minimum=0)
    recover_checkpoint_every: int = option(25, "write a training checkpoint every N steps (0: never)", minimum=0)
    recover_text: Optional[str] = option(None, "training text: None uses the calibration text's training windows; "
                                         "file:PATH (its calibration part), another text name, or a mixture with "
                                         "weights as --calibration takes (wiki:0.5,file:notes.txt:0.5)")
    recover_data: Literal["auto", "text", "self", "mix"] = option(
        "auto", "what recovery trains on. text: the recovery text's windows; self: text the dense model samples "
        "itself, prompted with the start of those windows (cached under the work folder, reused by later runs on "
        "the same model, text and seed); mix: half of the windows each; auto: mix where the teacher can write (its "
        "tokenizer given, not sharded), else text")
    recover_self_temperature: float = option(1.0, "--recover-data self/mix: sampling temperature (plain sampling: "
                                             "no top-k or top-p)", above=0.0)
    recover_self_prompt_len: int = option(32, "--recover-data self/mix: tokens of text that prompt each sample",
                                          minimum=1)
    recover_self_batch: int = option(32, "--recover-data self/mix: samples generated at once (a KV-cached "
                                     "batch; part of the cache key)", minimum=1)
    recover_self_chat: float = option(0.25, "--recover-data self/mix: fraction of the prompts wrapped in the "
                                      "tokenizer's chat template as a request to continue the text (none when the "
                                      "tokenizer has no template)", minimum=0.0, maximum=1.0)
    recover_self_dtype: Literal["auto", "same", "float32", "bfloat16", "float16"] = option(
        "auto", "--recover-data self/mix: dtype the teacher samples in (a copy when it differs from the teacher's; "
        "the distillation targets stay the teacher's). auto: bfloat16 where the device computes in it natively, "
        "else the teacher's own")
    recover_windows: Optional[int] = option(None, "cap on the training windows (evenly spaced; None: all)",
                                            minimum=1)
    recover_recon_windows: int = option(64, "reconstruction: windows whose activations are cached per layer",
                                        minimum=1)
    recover_recon_epochs: int = option(2, "reconstruction: Adam epochs over the cached windows per layer",
                                       minimum=1)
    recover_recon_lr: float = option(1e-4, "reconstruction: Adam learning rate", above=0.0)
    recover_seed: int = option(0, "seed of the data order and LoRA initialisation")

    def __post_init__(self):
        check_fields(self)
        if self.recover_text is not None:
            parse_mixture(self.recover_text)  # malformed, or an evaluation split: refused before any work
        if self.recover_data == "text" and self.recover != "off":  # with recovery off every option is unused
            for f in fields(self):
                if f.name in SELF_TEXT_ONLY and getattr(self, f.name) != f.default:
                    raise ValueError(f"{f.name} has no effect with recover_data='text' (--recover-data text): it "
                                     "is an option of self-generated recovery data (--recover-data self or mix)")
        unused = {"distill": RECONSTRUCT_ONLY, "reconstruct": DISTILL_ONLY}.get(self.recover, ())
        for f in fields(self):
            if f.name in unused and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name} has no effect with recover={self.recover!r} (--recover "
                                 f"{self.recover}): it is an option of "
                                 f"{'block-wise reconstruction' if f.name in RECONSTRUCT_ONLY else 'distillation'}")

    def resolved(self, device, *, tokenizer: bool, sharded_teacher: bool = False) -> "RecoveryConfig":
        """These options with their automatic choices made for a run on ``device`` (a torch device or its name),
        ``tokenizer``: whether the teacher's tokenizer is at hand, ``sharded_teacher``: whether the teacher is
        FSDP-sharded. ``recover_data="auto"``: ``mix`` where the teacher can write (tokenizer, not sharded), else
        ``text`` (options of self-generated text that were given then warn and go back to their defaults);
        ``recover_autocast=None`` (distillation only): whether ``device`` computes in bf16 natively
        (:func:`bf16_native`); ``recover_teacher_dtype="auto"``: ``bfloat16`` for ``recover="distill"`` where the
        device is bf16-native and the teacher is whole, else ``same``. Explicit values are kept; resolving twice
        changes nothing."""
        changes: dict = {}
        native = None if self.recover == "off" else bf16_native(device)  # not read when nothing is trained
        if self.recover_data == "auto":
            writes = tokenizer and not sharded_teacher
            changes["recover_data"] = "mix" if writes else "text"
            if not writes:
                given = [f for f in fields(self) if f.name in SELF_TEXT_ONLY and getattr(self, f.name) != f.default]
                for f in given:
                    warnings.warn(f"{f.name} has no effect: recover_data 'auto' is text here (the teacher "
                                  f"{'is sharded' if sharded_teacher else 'has no tokenizer'})", stacklevel=2)
                changes.update({f.name: f.default for f in given})
        if self.recover_autocast is None and self.recover in ("distill", "auto"):
            changes["recover_autocast"] = native
        if self.recover_teacher_dtype == "auto":
            bf16 = self.recover == "distill" and native and not sharded_teacher
            changes["recover_teacher_dtype"] = "bfloat16" if bf16 else "same"
        return replace(self, **changes)

    def with_mode(self, recover: str) -> "RecoveryConfig":
        """These options for the mode ``recover``, the options that mode does not read back at their defaults."""
        unused = {"distill": RECONSTRUCT_ONLY, "reconstruct": DISTILL_ONLY}.get(recover, ())
        return replace(self, recover=recover, **{f.name: f.default for f in fields(self) if f.name in unused})

    @property
    def lora_alpha(self) -> float:
        """The LoRA alpha in use (``recover_lora_alpha`` or 2 × rank)."""
        return self.recover_lora_alpha if self.recover_lora_alpha is not None else 2.0 * self.recover_lora_rank
