"""The ``dip-ext`` command line (also ``python -m dip_ext``).

    dip-ext prune                     # prune the embedded default model (SmolLM2-135M) into ./dip-out
    dip-ext prune --model DIR --method oneshot --ratio 0.2 --out pruned/
    dip-ext eval --model pruned/ --text ptb
    dip-ext info
    torchrun --nproc_per_node=4 -m dip_ext prune --device cuda ...   # data-parallel (docs/distributed.md)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from . import distributed as dist

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are ONE line on stderr and exit code 2."""

    def error(self, message):  # noqa: D401
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _ratio(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < r < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1) (fraction of parameters removed), got {text}")
    return r


def _int_at_least(low: int):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _float_check(ok, what: str):
    """An argparse type: a finite float satisfying ``ok``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text}")
        return v

    return parse


_positive_float = _float_check(lambda v: v > 0, "> 0")
_non_negative_float = _float_check(lambda v: v >= 0, ">= 0")


def build_parser() -> argparse.ArgumentParser:
    from .prune import METHODS

    p = _Parser(prog="dip-ext", description="DISP-LLM structural pruning for Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser("prune", help="learn DISP masks, compact the model, save it with a report",
                        description="Prune a model with DISP and save the compacted model, report.json, report.md "
                                    "and widths.png into --out.")
    pr.add_argument("--model", default=None,
                    help="model: a local Hugging Face folder, a hub id (downloads), or 'smollm2-135m' "
                         "(default: the embedded SmolLM2-135M-Instruct, offline)")
    pr.add_argument("--method", choices=METHODS, default="hypernetwork",
                    help="hypernetwork: the paper's learned masks, warm-started from oneshot (default); "
                         "oneshot: Fisher scores, no training (minutes on a CPU); dependent: one shared embedding "
                         "subset (the dimension-dependent baseline)")
    pr.add_argument("--ratio", type=_ratio, default=0.3,
                    help="fraction of parameters removed, in (0, 1) (default 0.3)")
    pr.add_argument("--ratio-of", choices=("decoder_linear", "total"), default="decoder_linear",
                    help="what --ratio is a fraction of: the decoder linear layers (default) or all parameters "
                         "(embeddings and norms are kept)")
    pr.add_argument("--calibration", default="wiki",
                    help="calibration text: wiki (default), ptb, wikitext2 (online) or file:PATH")
    pr.add_argument("--calibration-windows", type=_positive, default=64, help="calibration windows (default 64)")
    pr.add_argument("--seq-len", type=_positive, default=256, help="tokens per calibration window (default 256)")
    pr.add_argument("--steps", type=_non_negative, default=200,
                    help="hypernetwork training steps (default 200; 0 exports the warm start)")
    pr.add_argument("--val-windows", type=_non_negative, default=16,
                    help="calibration windows held out from hypernetwork training and from the refit; the export "
                         "with the lowest LM loss on them is kept (early stopping) and --refit auto chooses on them "
                         "(default 16; 0: the last step's masks, and --refit auto refits as --refit on)")
    pr.add_argument("--val-every", type=_positive, default=50,
                    help="score the exported masks on the held-out windows every N steps (default 50)")
    pr.add_argument("--batch-size", type=_positive, default=1,
                    help="calibration windows per hypernetwork step and process (default 1; under torchrun the "
                         "global batch is this times the number of processes)")
    pr.add_argument("--lr", type=_positive_float, default=1e-3, help="hypernetwork AdamW learning rate (default 1e-3)")
    pr.add_argument("--lr-schedule", choices=("constant", "cosine", "cosine-tail"), default="constant",
                    help="hypernetwork learning rate: constant (default, the paper's); cosine, decaying to 0 at "
                         "--steps; or cosine-tail, constant and then decaying to 0 over the last --decay-steps. "
                         "--resume continues a checkpoint under any schedule with the same learning rates so far: "
                         "a constant run can be extended and annealed with cosine-tail")
    pr.add_argument("--decay-steps", type=_positive, default=None,
                    help="length of the cosine-tail decay (needed with --lr-schedule cosine-tail)")
    pr.add_argument("--lam", type=_non_negative_float, default=16.0,
                    help="weight of the budget term lam*|log r - log p| (default 16)")
    pr.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False,
                    help="train the hypernetwork on the KL divergence from the dense model's next-token "
                         "distribution instead of the LM loss (one extra forward per step; default off)")
    pr.add_argument("--margin", type=_positive_float, default=3.0,
                    help="warm start: the one-shot masks' logits sit this far from the keep threshold (default 3)")
    pr.add_argument("--refit", choices=("auto", "on", "off"), default="auto",
                    help="before compaction, refit the kept input columns of the weights whose input is pruned, by "
                         "least squares on the calibration windows. auto (default): try a few settings and no "
                         "refit, keep the best on the held-out windows; on: the MLP's last projection with "
                         "--refit-damping; off")
    pr.add_argument("--refit-damping", type=_positive_float, default=1.0,
                    help="--refit on: ridge toward the original weights, relative to the mean input energy "
                         "(default 1)")
    pr.add_argument("--multiple-of", type=_positive, default=1,
                    help="round every kept width to a multiple of this (e.g. 8 or 64 for fast GEMMs)")
    pr.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pr.add_argument("--out", default="dip-out", help="output folder (default ./dip-out)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    pr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from the checkpoints in OUT/work")
    pr.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 ...")
    pr.add_argument("--fsdp", action="store_true",
                    help="under torchrun: shard the frozen model across the processes with FSDP2 (for models that "
                         "do not fit one device); rank 0 loads it on the CPU and compacts and saves it")
    pr.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="weights dtype while pruning (default float32)")
    pr.add_argument("--eval-windows", type=_non_negative, default=16,
                    help="perplexity windows per text before/after (default 16; 0 skips evaluation)")
    pr.add_argument("--eval-text", action="append", default=None, metavar="NAME",
                    help="text scored before/after on its held-out part; repeat for several (default: wiki and "
                         "ptb): wiki, ptb, wikitext2 (online) or file:PATH")
    pr.add_argument("--no-speed", action="store_true", help="skip the prefill speed measurement")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")

    ev = sub.add_parser("eval", help="perplexity of a (pruned or dense) model on a text",
                        description="Print the perplexity of a model on a text's held-out split.")
    ev.add_argument("--model", default=None, help="folder, hub id or 'smollm2-135m' (default)")
    ev.add_argument("--text", default="wiki", help="wiki (held-out 20 %%), ptb (test), wikitext2 (test), file:PATH")
    ev.add_argument("--seq-len", type=_positive, default=512, help="window length in tokens (default 512)")
    ev.add_argument("--max-windows", type=_positive, default=None, help="cap on windows (default: all)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ev.add_argument("--quiet", action="store_true")

    sub.add_parser("info", help="print how the extension was built (JSON)")
    return p


def _fail(message: str) -> int:
    print(f"dip-ext: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _prune(args) -> int:
    from . import zoo
    from .data import get_text
    from .prune import prune_and_compact, validate_options

    validate_options(args.method, args.ratio, args.ratio_of, args.multiple_of, args.steps)
    if args.method == "hypernetwork":
        from .selection.hypernetwork import check_lr_schedule

        check_lr_schedule(args.lr_schedule, args.decay_steps, args.steps)
    out = Path(args.out)
    # Under torchrun rank 0 decides (the others could already see its work folder) and tells everyone.
    occupied = dist.broadcast_object(out.exists() and any(out.iterdir()) if dist.is_main() else None)
    if occupied and not (args.overwrite or args.resume):
        return _fail(f"output folder {out} exists and is not empty; pass --overwrite to replace it "
                     "or --resume to continue an interrupted run")
    if args.overwrite and args.resume:
        return _fail("--overwrite and --resume contradict each other")
    eval_texts = tuple(args.eval_text or ("wiki", "ptb")) if args.eval_windows else ()
    get_text(args.calibration, "calibration")  # unknown / empty / missing texts fail before the model loads
    for name in eval_texts:
        get_text(name, "heldout")
    if args.overwrite and out.exists() and dist.is_main():
        shutil.rmtree(out)
    dist.barrier()
    device = args.device
    if dist.world_size() > 1 and device == "cuda":  # one GPU per process
        device = f"cuda:{dist.local_rank()}"
    full = None
    if args.fsdp:
        model, full, tokenizer = _load_sharded(args, device)
    else:
        model, tokenizer = zoo.resolve_model(args.model, dtype=args.dtype, device=device)
    model, report = prune_and_compact(
        model, tokenizer, ratio=args.ratio, calibration=args.calibration, method=args.method,
        ratio_of=args.ratio_of, seq_len=args.seq_len, calibration_windows=args.calibration_windows,
        val_windows=args.val_windows, steps=args.steps, multiple_of=args.multiple_of, seed=args.seed,
        eval_texts=eval_texts,
        eval_windows=args.eval_windows or None, measure_speed=not args.no_speed, work_dir=out / "work",
        resume=args.resume, progress=not args.quiet, model_name=args.model or zoo.DEFAULT_MODEL,
        hypernetwork_options=dict(val_every=args.val_every, batch_size=args.batch_size, lr=args.lr, lam=args.lam,
                                  distill=args.distill, margin=args.margin, lr_schedule=args.lr_schedule,
                                  decay_steps=args.decay_steps),
        refit=args.refit, refit_damping=args.refit_damping, full_model=full)
    if dist.is_main():  # every rank holds the same compacted model; one writes it
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        report.save(out)
        print(report.to_markdown())
        print(f"saved the compacted model and report to {out}/ (load it with dip_ext.from_pretrained('{out}'))")
    dist.barrier()
    return 0


def _load_sharded(args, device):
    """``--fsdp``: rank 0 loads the model on the CPU; every rank gets an FSDP2-sharded copy on ``device``.

    Returns ``(sharded model, rank 0's full model or None, tokenizer)``. A model rank 0 cannot use fails on
    every rank with rank 0's message.
    """
    from . import zoo
    from .compaction import is_compacted
    from .sharding import shard_frozen_model

    if dist.world_size() < 2:
        raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N (N >= 2)")
    full, payload = None, None
    if dist.is_main():
        try:
            full, tokenizer = zoo.resolve_model(args.model, dtype=args.dtype, device="cpu")
            if is_compacted(full):
                raise ValueError("the model is already compacted; prune the dense original")
            payload = ("ok", full.config, tokenizer)
        except (ValueError, FileNotFoundError, ImportError, zoo.ZooError) as e:
            payload = ("error", str(e), None)
    kind, config, tokenizer = dist.broadcast_object(payload)
    if kind == "error":
        raise ValueError(config)
    model = shard_frozen_model(full, config, device, zoo.as_dtype(args.dtype))
    return model, full, tokenizer


def _prune_distributed(args) -> int:
    """``prune`` under torchrun / accelerate launch: every rank runs the pipeline data-parallel; an error on
    one rank ends the whole job (exit 1, ``dip_ext: rank R failed: ...``) instead of leaving peers waiting."""
    import torch.distributed

    with dist.fail_fast(brief=(ValueError, FileNotFoundError, ImportError)):
        code = _prune(args)
    torch.distributed.destroy_process_group()
    return code


def _eval(args) -> int:
    from . import zoo
    from .eval import perplexity

    model, tokenizer = zoo.resolve_model(args.model, dtype=args.dtype, device=args.device)
    ppl = perplexity(model, tokenizer, args.text, seq_len=args.seq_len, max_windows=args.max_windows,
                     progress=not args.quiet)
    print(json.dumps({"model": args.model or zoo.DEFAULT_MODEL, "text": args.text, "seq_len": args.seq_len,
                      "perplexity": ppl}))
    return 0


def main(argv=None) -> int:
    from .zoo import ZooError  # a model that cannot be found or read is bad input too

    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    if quiet:  # also transformers' own bars (loading weights); restored on return
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    try:
        if args.command == "prune":
            if dist.init_from_env(device=args.device) and dist.world_size() > 1:
                return _prune_distributed(args)
            return _prune(args)
        if args.command == "eval":
            return _eval(args)
        from . import build_info

        print(json.dumps(build_info(), indent=1))
        return 0
    except (ValueError, FileNotFoundError, ImportError, ZooError) as e:  # bad input: one clear line
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        print("dip-ext: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if quiet and bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
