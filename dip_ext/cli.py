"""The ``dip-ext`` command line (also ``python -m dip_ext``).

    dip-ext prune                     # prune the embedded default model (SmolLM2-135M) into ./dip-out
    dip-ext prune --model DIR --method oneshot --ratio 0.2 --out pruned/
    dip-ext eval --model pruned/ --text ptb
    dip-ext export --model pruned/ --to gguf --out pruned.gguf   # or --to decilm --out DIR: for stock vLLM
    dip-ext info
    torchrun --nproc_per_node=4 -m dip_ext prune --device cuda ...   # data-parallel (docs/distributed.md)

Every ``prune`` option is a field of an options dataclass (:mod:`dip_ext.config`, the registered selection
methods' options classes, :class:`PruneRun` below): the flags, their help and their checks come from there.
A usage error or bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from transformers.utils import logging as hf_logging

from . import data, ops, zoo
from . import distributed as dist
from .config import DEFAULT_SEQ_LEN, EvalConfig, PruneConfig, RefitConfig
from .errors import UnsupportedModelError
from .eval import perplexity
from .export_decilm import export_decilm
from .export_gguf import LLAMA_CPP_TYPES, QUANTIZE_TYPES, export_gguf
from .model_state import check_device
from .outputs import command_folders, text_input_path, text_inputs
from .options import EXIT_USAGE, OptionParser, check_fields, field_default, flag_dest, from_namespace, option
from .pipeline import Pruner
from .recovery import RecoveryConfig
from .recovery.checks import check_sharded_teacher
from .recovery.command import add_recover_parser, run_recover
from .selection import get_method, method_names
from .selection.registry import registered_options_classes
from .selftest import selftest
from .sharding import load_sharded

__all__ = ["main", "build_parser", "prune_option_classes", "PruneRun", "EvalRun", "ExportRun", "InfoRun"]

#: what a bad input raises anywhere in the library: one line, exit status 2
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, zoo.ZooError, UnsupportedModelError)


@dataclass(frozen=True)
class PruneRun:
    """Where ``prune`` reads the model and writes its results, and on what device."""

    _argument_group_name = "run"

    model: Optional[str] = option(None, "model: a local Hugging Face folder, a hub id (downloads), or "
                                  "'smollm2-135m' (default: the embedded SmolLM2-135M-Instruct, offline)")
    out: str = option("dip-out", "output folder: the compacted model, report.json, report.md, widths.png; written "
                      "beside it first and moved into place when the run succeeds")
    work_dir: Optional[str] = option(None, "checkpoint folder of the run (default: OUT-work, beside the output)")
    overwrite: bool = option(False, "replace an output folder an earlier dip-ext run wrote (never any other)")
    resume: bool = option(False, "continue an interrupted run from the checkpoints in the work folder")
    device: str = option("cpu", "cpu, cuda, cuda:1 ... (under torchrun with cuda: one GPU per process)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "weights dtype while pruning")
    fsdp: bool = option(False, "under torchrun: shard the frozen model across the processes with FSDP2 (for "
                        "models that do not fit one device); rank 0 loads it on the CPU, compacts and saves it; "
                        "--recover distill then trains a whole copy of the compacted model on every rank toward "
                        "the sharded one")
    quiet: bool = option(False, "no progress bars")

    def __post_init__(self):
        check_fields(self)
        check_device(self.device)


@dataclass(frozen=True)
class EvalRun:
    """``dip-ext eval``: one model, one text, its perplexity as JSON."""

    model: Optional[str] = option(None, "folder, hub id or 'smollm2-135m' (default)")
    text: str = option("wiki", "wiki (its held-out 20 %), ptb (test), wikitext2 (test) or file:PATH (the whole "
                       "file)")
    split: Optional[str] = option(None, "the part of the text to score: calibration, heldout, test, all (default: "
                                  "a built-in text's held-out part, a file whole)")
    seq_len: Optional[int] = option(None, "window length in tokens (default: 256, or the model's position limit "
                                    "when that is shorter; the same windows as the prune report)", minimum=2)
    max_windows: Optional[int] = option(None, "cap on the number of windows, evenly spaced (default: all)",
                                        minimum=1)
    device: str = option("cpu", "cpu, cuda, cuda:1 ...")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "weights dtype")
    quiet: bool = option(False, "no progress bars")

    def __post_init__(self):
        check_fields(self)
        check_device(self.device)


@dataclass(frozen=True)
class ExportRun:
    """``dip-ext export``: a pruned model zero-padded back to full-width inputs and outputs (lossless), for engines that
    cannot run index sets; prints what the export keeps against the compacted and the dense model."""

    model: str = option(dataclasses.MISSING, "folder of a model pruned by dip_ext (what `dip-ext prune --out` wrote); "
                        "a dense Llama-shaped folder works too")
    to: Literal["decilm", "gguf"] = option(dataclasses.MISSING, "decilm: a DeciLM (Nemotron-NAS) folder that stock "
                                           "vLLM and transformers (trust_remote_code) run; gguf: one GGUF file for "
                                           "llama.cpp")
    out: str = option(dataclasses.MISSING, "the folder (decilm) or .gguf file (gguf) to write; written beside it first "
                      "and moved into place when complete")
    quantize: Optional[str] = option(None, "gguf only: weights type (default: the model's dtype); q4_0 .. q8_0 apply "
                                     "to matrices whose rows split into whole blocks (the others are written f16); "
                                     "the k-quants run llama.cpp's quantizer (needs llama-cpp-python)",
                                     choices=QUANTIZE_TYPES + LLAMA_CPP_TYPES)
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = option(None, "decilm only: weights dtype (default: "
                                                                        "the model's)")
    overwrite: bool = option(False, "replace an output dip_ext wrote (never any other)")

    def __post_init__(self):
        check_fields(self)
        if self.to == "decilm" and self.quantize is not None:
            raise ValueError("--quantize applies to --to gguf; a DeciLM folder takes --dtype")
        if self.to == "gguf" and self.dtype is not None:
            raise ValueError("--dtype applies to --to decilm; a GGUF file takes --quantize")


@dataclass(frozen=True)
class InfoRun:
    """``dip-ext info``: how the extension was built, whether the offline default model and texts are here, and
    (``--selftest``) whether every kernel matches its torch reference on a device."""

    assets: bool = option(True, "also check that the default model and the built-in texts are available offline")
    selftest: bool = option(False, "run every op against its plain-torch reference in fp32/fp16/bf16 on --device "
                            "and print a table of errors; exit status 1 if any fails")
    device: Optional[str] = option(None, "device of --selftest (default: cuda when available, else cpu)")

    def __post_init__(self):
        check_fields(self)
        if self.device is not None:
            check_device(self.device)


def _method_prefixes() -> dict[type, str]:
    """Each registered method's options class and its flags' prefix (the method's name)."""
    return {get_method(n).options_class: n for n in method_names() if get_method(n).options_class is not None}


def prune_option_classes() -> list[type]:
    """The options classes ``dip-ext prune`` builds its flags from, in the order of its help."""
    return [PruneConfig, *registered_options_classes(), RefitConfig, RecoveryConfig, EvalConfig, PruneRun]


def build_parser() -> argparse.ArgumentParser:
    """The ``dip-ext`` parser: ``prune`` (flags from every options class), ``eval`` and ``info``."""
    p = OptionParser(prog="dip-ext", description="DISP-LLM structural pruning for Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OptionParser)
    # registered methods are known at run time, not when PruneConfig is declared
    sub.add_parser("prune", dataclass_types=prune_option_classes(), flag_prefixes=_method_prefixes(),
                   flag_choices={"method": list(method_names())},
                   help="learn DISP masks, compact the model, save it with a report",
                   description="Prune a model with DISP and save the compacted model, report.json, report.md and "
                               "widths.png into --out.")
    add_recover_parser(sub)
    sub.add_parser("eval", dataclass_types=[EvalRun], help="perplexity of a (pruned or dense) model on a text",
                   description="Print the perplexity of a model on a text (a built-in text's held-out part).")
    sub.add_parser("export", dataclass_types=[ExportRun], help="write a pruned model for vLLM (DeciLM) or llama.cpp "
                   "(GGUF), zero-padded, lossless",
                   description="Write a pruned model zero-padded back to full-width inputs and outputs (identical "
                               "logits), keeping per-layer MLP widths and removed blocks: a DeciLM folder for stock "
                               "vLLM / transformers, or a GGUF file for llama.cpp. Prints what it keeps.")
    sub.add_parser("info", dataclass_types=[InfoRun], help="print how the extension was built (JSON)")
    return p


def _fail(message: str) -> int:
    print(f"dip-ext: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _method_options(args: argparse.Namespace):
    """The chosen method's options; a flag of another method's options given with a non-default value is an
    error (it would be silently ignored)."""
    method = get_method(args.method)
    mine = method.options_class
    for cls, prefix in _method_prefixes().items():
        if cls is mine:
            continue
        for f in dataclasses.fields(cls):
            if getattr(args, flag_dest(f.name, prefix)) != f.default:
                raise ValueError(f"--{prefix}-{f.name.replace('_', '-')} is an option of --method {prefix}, not of "
                                 f"--method {args.method}")
    return from_namespace(mine, args, method.name) if mine is not None else None


#: (options class, the field that switches its other fields on, the values that switch them off, fields exempt):
#: a flag of a switched-off group given with a non-default value would be silently ignored, so it is refused
_SWITCHED_GROUPS = ((RecoveryConfig, "recover", ("off",), ()),
                    (RefitConfig, "refit", ("off", "auto"), ()))


def _refuse_ignored(args: argparse.Namespace) -> None:
    """ValueError naming a flag that the other flags switch off (e.g. --recover-steps with --recover off)."""
    for cls, switch, off, exempt in _SWITCHED_GROUPS:
        if getattr(args, switch) not in off:
            continue
        for f in dataclasses.fields(cls):
            if f.name not in (switch, *exempt) and getattr(args, f.name) != field_default(f):
                raise ValueError(f"--{f.name.replace('_', '-')} has no effect with --{switch.replace('_', '-')} "
                                 f"{getattr(args, switch)}")


def _prune(args: argparse.Namespace) -> int:
    config, refit = from_namespace(PruneConfig, args), from_namespace(RefitConfig, args)
    recovery = from_namespace(RecoveryConfig, args)
    evaluation, run = from_namespace(EvalConfig, args), from_namespace(PruneRun, args)
    options = _method_options(args)
    _refuse_ignored(args)
    held_out = get_method(config.method).uses_validation(options) or refit.refit == "auto" or recovery.recover != "off"
    if not held_out and config.val_windows != PruneConfig().val_windows:
        raise ValueError("--val-windows has no effect: no stage of this run scores held-out windows (a trained "
                         "method, --refit auto and --recover do)")
    if run.fsdp and dist.world_size() > 1:
        # the sharded model will be the recovery's teacher: refuse what it cannot run before loading it
        check_sharded_teacher(recovery, dist.world_size())
    if run.overwrite and run.resume:
        return _fail("--overwrite and --resume contradict each other")
    inputs = {"--model": run.model or zoo.default_model_dir(), **text_inputs("--calibration", config.calibration),
              **text_inputs("--recover-text", recovery.recover_text),
              **{f"--eval-text {t}": text_input_path(t) for t in evaluation.eval_text}}
    # rank 0 checks (and later writes) the output; an error there ends every rank (dist.fail_fast)
    out, work = command_folders(run.out, run.work_dir, command="prune", inputs=inputs,
                                replace=run.overwrite or run.resume, main=dist.is_main())
    data.get_text(config.calibration, "calibration")  # unknown / empty / missing texts fail before the model loads
    for name in (evaluation.eval_text if evaluation.eval_windows else []):
        data.get_text(name, data.eval_split(name, config.calibration))
    dist.barrier()
    device = run.device
    if dist.world_size() > 1 and device == "cuda":  # one GPU per process
        device = f"cuda:{dist.local_rank()}"
    full = None
    if run.fsdp:
        model, full, tokenizer = load_sharded(run.model, device, run.dtype)
    else:
        model, tokenizer = zoo.resolve_model(run.model, dtype=run.dtype, device=device)
    pruner = Pruner(model, tokenizer, config, method_options=options, refit=refit, recovery=recovery,
                    evaluation=evaluation,
                    work_dir=work, resume=run.resume, progress=not run.quiet,
                    model_name=run.model or zoo.DEFAULT_MODEL, full_model=full)
    model, report = pruner.run()
    if dist.is_main():  # every rank holds the same compacted model; one writes it
        with out.staging() as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            report.publishable().save(folder, model_card=True)
        print(report.to_markdown())
        print(f"saved the compacted model and report to {run.out}/ (load it with "
              f"dip_ext.from_pretrained('{run.out}'))")
    dist.barrier()
    return 0


def _prune_distributed(args) -> int:
    """``prune`` under torchrun / accelerate launch: every rank runs the pipeline data-parallel; an error on
    one rank ends the whole job (exit 1, ``dip_ext: rank R failed: ...``) instead of leaving peers waiting."""
    import torch.distributed

    with dist.fail_fast(brief=USER_ERRORS):
        code = _prune(args)
    torch.distributed.destroy_process_group()
    return code


def _eval(args) -> int:
    run = from_namespace(EvalRun, args)
    model, tokenizer = zoo.resolve_model(run.model, dtype=run.dtype, device=run.device)
    seq_len = data.fit_seq_len(run.seq_len, model.config, default=DEFAULT_SEQ_LEN, what="--seq-len")
    split = run.split or data.eval_split(run.text)
    ppl = perplexity(model, tokenizer, run.text, seq_len=seq_len, max_windows=run.max_windows,
                     progress=not run.quiet, split=split)
    print(json.dumps({"model": run.model or zoo.DEFAULT_MODEL, "text": run.text, "split": split,
                      "seq_len": seq_len, "perplexity": ppl}))
    return 0


def _export(args) -> int:
    run = from_namespace(ExportRun, args)
    if run.to == "decilm":
        report = export_decilm(run.model, run.out, dtype=getattr(torch, run.dtype) if run.dtype else None,
                               overwrite=run.overwrite)
    else:
        report = export_gguf(run.model, run.out, quantize=run.quantize, overwrite=run.overwrite)
    print(report.table())
    return 0


def offline_assets() -> dict[str, str]:
    """``{asset: "ok: ..." | "missing: <what to run>"}`` for the default model and the built-in texts."""
    try:
        gguf = zoo.default_gguf_path()
        converted = zoo.default_model_dir()
        status = f"ok: {gguf}" + (f" (converted copy in {converted})" if converted.is_dir() else
                                  " (converted on first use, ~30 s)")
    except zoo.ZooError as e:
        status = f"missing: {e}"
    texts = data.download_data(("wiki", "ptb", "shakespeare"), fetch=False)
    return {"default model": status, **{f"text {name}": line for name, line in texts.items()}}


def _info(args) -> int:
    run = from_namespace(InfoRun, args)
    if run.device is not None and not run.selftest:
        raise ValueError("--device is the device of --selftest; add --selftest")
    info = {"build": ops.build_info()}
    if run.assets:
        info["offline assets"] = offline_assets()
    print(json.dumps(info, indent=1))
    if not run.selftest:
        return 0
    result = selftest(run.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(result.table())
    return 0 if result.ok else 1


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = str(message).splitlines()[0] if str(message) else category.__name__
    print(f"dip-ext: warning: {text}", file=file or sys.stderr)


def main(argv=None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    bars = hf_logging.is_progress_bar_enabled()
    if quiet:  # also transformers' own bars (loading weights); restored on return
        hf_logging.disable_progress_bar()
    show = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        if args.command == "prune":
            if dist.init_from_env(device=args.device) and dist.world_size() > 1:
                return _prune_distributed(args)
            return _prune(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "export":
            return _export(args)
        if args.command == "recover":
            if dist.init_from_env(device=args.device) and dist.world_size() > 1:
                with dist.fail_fast(brief=USER_ERRORS):
                    return run_recover(args)
            return run_recover(args)
        return _info(args)
    except USER_ERRORS as e:  # bad input: one clear line
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        print("dip-ext: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show
        if quiet and bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
