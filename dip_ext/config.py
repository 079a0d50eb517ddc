"""The pipeline's options: one frozen dataclass per stage, the single place each option is declared.

The command line (``dip-ext prune --help``), :func:`dip_ext.prune_and_compact`'s keywords, checkpoint
fingerprints and the report all read these fields. A selection method with options of its own declares them
the same way in its own file (e.g. ``HypernetworkConfig``) and names the class in its registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .mixtures import parse_mixture
from .options import Options, check_fields, option

__all__ = ["PruneConfig", "RefitConfig", "EvalConfig", "DEFAULT_SEQ_LEN"]

#: tokens per window (calibration and evaluation) unless the model's position limit is shorter
DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class PruneConfig(Options):
    """What to remove and how to choose it: the selection method, the budget and the calibration text."""

    _argument_group_name = "pruning"

    method: str = option("oneshot", "how masks are chosen: oneshot (Fisher scores, no training: minutes on a "
                         "CPU; with the default recovery as good as learned masks), hypernetwork (the paper's "
                         "learned masks, warm-started from oneshot), dependent (one shared embedding subset: the "
                         "dimension-dependent baseline), or any registered method")
    ratio: float = option(0.3, "fraction of parameters removed, in (0, 1): of the decoder-linear parameters "
                          "(q/k/v/o and MLP linears, biases included) unless --ratio-of total", above=0.0, below=1.0)
    ratio_of: Literal["decoder_linear", "total"] = option(
        "decoder_linear", "what --ratio is a fraction of: the decoder linear layers, or all parameters (embeddings, "
        "norms and the LM head are kept, so the decoder linears pay for it)")
    prune_heads: Optional[bool] = option(
        None, "let whole KV groups (a KV head with the query heads that share it) compete for the parameter budget "
        "with the other dimensions, so attention and the KV cache shrink too (oneshot and hypernetwork). Default: "
        "on for the LLaMA-style families (Llama, Mistral, Qwen2, Qwen3) when every layer holds several groups, off "
        "otherwise (a method that cannot prune groups, multi-query attention, and the families whose vLLM route "
        "needs whole attentions: Gemma3, OPT, Phi)")
    kv_ratio: Optional[float] = option(None, "also remove at least this fraction of the KV-cache bytes per token, "
                                       "in (0, 1), by dropping the KV groups of lowest score (turns --prune-heads "
                                       "on)", above=0.0, below=1.0)
    calibration: str = option("wiki", "calibration text: wiki, ptb, wikitext2 (online) or file:PATH; or a mixture "
                              "of them with weights, e.g. wiki:0.5,ptb:0.3,file:notes.txt:0.2 (every part of the "
                              "calibration windows drawn from each text in proportion; evaluation splits such as "
                              "ptb-test are refused)")
    calibration_windows: int = option(64, "calibration-pass windows (Fisher scores, statistics), evenly spaced "
                                      "over the calibration text", minimum=1)
    calibration_self: float = option(0.0, "fraction of the calibration-pass windows the dense model writes itself "
                                     "instead (prompted from the calibration text and sampled as by --recover-data "
                                     "self, with the --recover-self-* options where the recovery writes text too, "
                                     "else their defaults; cached in the work folder, where that "
                                     "recovery reuses them), so the scores also see text beyond the calibration "
                                     "text's domain (self-calibration, Williams et al. 2025); needs the tokenizer",
                                     minimum=0.0, below=1.0)
    seq_len: Optional[int] = option(None, "tokens per calibration window (default: 256, or the model's position "
                                    "limit when that is shorter)", minimum=2)
    val_windows: int = option(16, "calibration windows held out from training and from the refit: the "
                              "hypernetwork keeps the export with the lowest LM loss on them (early stopping) and "
                              "--refit auto chooses on them (0: no early stopping; --refit auto then refits as "
                              "--refit on)", minimum=0)
    multiple_of: int = option(1, "round every kept width to a multiple of this (e.g. 8 or 64 for fast GEMMs); "
                              "see dip_ext.selection.budget for the rounding rule", minimum=1)
    heads_multiple_of: int = option(1, "with KV groups pruned: each layer keeps a multiple of this many KV groups "
                                    "or all of them (e.g. the tensor-parallel size the model will be served with, "
                                    "which must split every layer's heads)", minimum=1)
    seed: int = option(0, "random seed of every stage")

    def __post_init__(self):
        check_fields(self)
        if self.heads_multiple_of > 1 and self.prune_heads is False and self.kv_ratio is None:
            raise ValueError(f"heads_multiple_of {self.heads_multiple_of} rounds pruned KV groups, but prune_heads "
                             "is off (KV groups are kept whole): drop --heads-multiple-of or prune heads")
        parse_mixture(self.calibration)  # a malformed mixture or an evaluation split: refused before any work


@dataclass(frozen=True)
class RefitConfig(Options):
    """The least-squares refit between selection and compaction (:mod:`dip_ext.refit`)."""

    _argument_group_name = "refit"

    refit: Literal["auto", "on", "off"] = option(
        "off", "before compaction, refit the kept input columns of the weights whose input is pruned, by least "
        "squares on the calibration windows. auto: try a few settings and no refit, keep the best on the held-out "
        "windows; on: the MLP's last projection with --refit-damping; off: the paper's method (masks only)")
    refit_damping: float = option(1.0, "--refit on: ridge toward the original weights, relative to the mean input "
                                  "energy", above=0.0)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class EvalConfig(Options):
    """How the model is measured before and after pruning (perplexity windows and prefill speed)."""

    _argument_group_name = "evaluation"

    eval_text: list[str] = option(help="texts scored before/after, each on its held-out part: wiki, ptb, "
                                  "shakespeare (off-domain, never calibrated or trained on), wikitext2 (online) "
                                  "or file:PATH", default_factory=lambda: ["wiki", "ptb", "shakespeare"])
    eval_windows: Optional[int] = option(16, "perplexity windows per text (evenly spaced; 0 skips evaluation; "
                                         "None, from Python: every window)", minimum=0)
    eval_seq_len: Optional[int] = option(None, "tokens per perplexity window and per prefill-speed sequence "
                                         "(default: 256, or the model's position limit when that is shorter)",
                                         minimum=2)
    speed: bool = option(True, "time the compacted model's prefill against the dense model's, as interleaved "
                         "pairs (keeps a copy of the dense model until then: twice the model's memory)")

    def __post_init__(self):
        check_fields(self)

