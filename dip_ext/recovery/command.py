"""``dip-ext recover --model PRUNED --teacher DENSE``: recovery of an already saved compacted model.

:func:`add_recover_parser` adds the subcommand to the ``dip-ext`` parser (flags from :class:`RecoverRun`,
:class:`RecoveryConfig` and :class:`~dip_ext.config.EvalConfig`); :func:`run_recover` runs it from the parsed
arguments and returns the exit status. Output folder: the recovered model (an ordinary dip_ext checkpoint),
``recovery.json``, ``recovery.md``, ``recovery.png`` (held-out curve) and the checkpoints in ``OUT/work``.
Under torchrun every rank loads the student and distils a whole copy of it data-parallel; with ``--fsdp`` the dense
teacher is sharded across the ranks (:func:`dip_ext.sharding.load_sharded`) instead of loaded whole on each.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Optional

from .. import distributed as dist
from .. import zoo
from ..config import DEFAULT_SEQ_LEN, EvalConfig
from ..data import fit_seq_len
from ..eval import perplexity
from ..files import atomic_write_text
from ..model_card import model_card
from ..model_state import check_device, model_digest
from ..options import check_fields, from_namespace, option
from ..mixtures import is_mixture
from ..outputs import command_folders, prepare_work_dir, text_input_path, text_inputs, without_local_paths
from ..sharding import load_sharded
from ..windows import calibration_windows, mixture_windows, recovery_windows, split_calibration
from .checks import check_sharded_teacher, check_training_text
from .config import RecoveryConfig
from .stage import recover

__all__ = ["RecoverRun", "add_recover_parser", "run_recover"]


@dataclass(frozen=True)
class RecoverRun:
    """Where ``recover`` reads the pruned and dense models and the text, and where it writes."""

    _argument_group_name = "run"

    model: str = option(help="the pruned, compacted model's folder (saved by dip-ext prune)")
    teacher: Optional[str] = option(None, "the dense model it was pruned from: a folder, a hub id or 'smollm2-135m' "
                                    "(default: the embedded SmolLM2-135M-Instruct)")
    out: str = option("dip-recovered", "output folder: the recovered model, recovery.json/.md/.png; written beside "
                      "it first and moved into place when the run succeeds")
    work_dir: Optional[str] = option(None, "checkpoint folder of the run (default: OUT-work, beside the output)")
    overwrite: bool = option(False, "replace an output folder an earlier dip-ext run wrote (never any other)")
    resume: bool = option(False, "continue an interrupted run from the checkpoints in the work folder")
    calibration: str = option("wiki", "the text the model was calibrated on: its training windows train the "
                              "recovery (unless --recover-text), its held-out windows stop it early")
    seq_len: Optional[int] = option(None, "tokens per training window (default: 256, or the model's position "
                                    "limit when that is shorter)", minimum=2)
    val_windows: int = option(16, "held-out calibration windows (early stopping, --recover auto's choice)",
                              minimum=0)
    device: str = option("cpu", "cpu, cuda, cuda:1 ...")
    dtype: str = option("float32", "weights dtype", choices=["float32", "bfloat16", "float16"])
    fsdp: bool = option(False, "under torchrun: shard the frozen dense teacher across the processes with FSDP2 (for "
                        "models that do not fit one device); every rank still trains a whole copy of the pruned "
                        "model (--recover distill only)")
    quiet: bool = option(False, "no progress bars")

    def __post_init__(self):
        check_fields(self)
        check_device(self.device)


def add_recover_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``recover`` to ``dip-ext``'s subparsers (an :class:`~dip_ext.options.OptionParser` subparser action);
    ``--recover`` defaults to ``auto`` there."""
    parser = subparsers.add_parser("recover", dataclass_types=[RecoverRun, RecoveryConfig, EvalConfig],
                                   help="train a pruned model back toward the dense one (reconstruction, distillation)",
                                   description="Recover a compacted model saved by dip-ext prune from its dense "
                                               "original; save the recovered model and recovery.json/.md/.png.")
    parser.set_defaults(recover="auto")
    return parser


def run_recover(args: argparse.Namespace) -> int:
    """Runs ``dip-ext recover`` (exit status 0); bad input raises ValueError / FileNotFoundError for the CLI's
    one-line error."""
    run, config = from_namespace(RecoverRun, args), from_namespace(RecoveryConfig, args)
    evaluation = from_namespace(EvalConfig, args)
    if config.recover == "off":
        raise ValueError("--recover off does nothing; choose reconstruct, distill or auto")
    if not evaluation.speed:  # an option of the shared evaluation group that this command has no use for
        raise ValueError("--no-speed has no effect with dip-ext recover: it scores perplexity, never speed")
    # the command always reads text, so the teacher's tokenizer is at hand
    config = config.resolved(run.device, tokenizer=True, sharded_teacher=run.fsdp)
    if run.fsdp:
        if dist.world_size() < 2:
            raise ValueError("--fsdp shards the teacher across processes: launch with torchrun --nproc_per_node=N "
                             "(N >= 2)")
        check_sharded_teacher(config, dist.world_size())
    if run.overwrite and run.resume:
        raise ValueError("--overwrite and --resume contradict each other")
    inputs = {"--model": run.model, "--teacher": run.teacher or zoo.default_model_dir(),
              **text_inputs("--calibration", run.calibration), **text_inputs("--recover-text", config.recover_text),
              **{f"--eval-text {t}": text_input_path(t) for t in evaluation.eval_text}}
    # rank 0 checks (and later writes) the output; an error there ends every rank (dist.fail_fast)
    out, work = command_folders(run.out, run.work_dir, command="recover", inputs=inputs,
                                replace=run.overwrite or run.resume, main=dist.is_main())
    texts = list(evaluation.eval_text) if evaluation.eval_windows != 0 else []
    if config.recover_text is not None:
        check_training_text(config.recover_text, texts, calibration=run.calibration)
    student, tokenizer = zoo.resolve_model(run.model, dtype=run.dtype, device=run.device)
    dist.check_same(model_digest(student), "the pruned model's weights (every rank loads --model itself)")
    if run.fsdp:  # rank 0 reads the dense model, every rank keeps a shard of it
        teacher, _, _ = load_sharded(run.teacher, run.device, run.dtype, what="the teacher of --fsdp recovery")
    else:
        teacher, _ = zoo.resolve_model(run.teacher, dtype=run.dtype, device=run.device)
    seq_len = fit_seq_len(run.seq_len, student.config, default=DEFAULT_SEQ_LEN, what="--seq-len")
    if is_mixture(run.calibration):  # held-out and training windows each drawn from every text in proportion
        windows = mixture_windows(tokenizer, run.calibration, seq_len, None, run.val_windows, config=student.config)
    else:
        windows = split_calibration(calibration_windows(tokenizer, run.calibration, seq_len, config=student.config),
                                    None, run.val_windows)
    train = recovery_windows(tokenizer, windows.train, run.calibration, config.recover_text, config.recover_windows,
                             seq_len, config=student.config)
    progress = not run.quiet and dist.is_main()
    eval_len = fit_seq_len(evaluation.eval_seq_len, student.config, default=DEFAULT_SEQ_LEN, what="--eval-seq-len")

    def scores(model, every_rank: bool = False) -> dict:
        return {t: perplexity(model, tokenizer, t, seq_len=eval_len, max_windows=evaluation.eval_windows,
                              progress=progress) for t in texts} if dist.is_main() or every_rank else {}

    dense, before = scores(teacher, every_rank=run.fsdp), scores(student)  # sharded: every rank joins the forwards
    if dist.is_main():
        prepare_work_dir(work, resume=run.resume, checkpoints=())  # checkpoints are overwritten, never deleted
    result = recover(student, teacher, train, windows.val, config, work_dir=work, resume=run.resume,
                     progress=progress, tokenizer=tokenizer)
    after = scores(student)
    if dist.is_main():
        record = {"model": run.model, "teacher": run.teacher or zoo.DEFAULT_MODEL, "perplexity_dense": dense,
                  "perplexity_pruned": before, "perplexity_recovered": after, "recovery": result.to_dict()}
        lines = ["# dip_ext recovery report", "", "| text | dense | pruned | recovered |", "|---|---:|---:|---:|"]
        lines += [f"| {without_local_paths(t)} | {dense[t]:.3f} | {before[t]:.3f} | {after[t]:.3f} |"
                  for t in texts if math.isfinite(after[t])]
        card = model_card(without_local_paths(run.teacher or zoo.DEFAULT_MODEL),
                          f"The pruned model `{without_local_paths(run.model)}` after `{config.recover}` recovery "
                          "toward its dense original (DISP-LLM, dip_ext). Details: `recovery.md`.",
                          {without_local_paths(t): [dense[t], before[t], after[t]] for t in texts},
                          ["dense", "pruned", "recovered"])
        with out.staging() as folder:
            student.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            atomic_write_text(folder / "recovery.json", json.dumps(without_local_paths(record), indent=1))
            atomic_write_text(folder / "recovery.md", "\n".join(lines + result.markdown_lines()) + "\n")
            atomic_write_text(folder / "README.md", card)
            result.plot(folder / "recovery.png")
        print("\n".join(lines + result.markdown_lines()))
        print(f"saved the recovered model to {run.out}/ (load it with dip_ext.from_pretrained('{run.out}'))")
    dist.barrier()
    return 0
