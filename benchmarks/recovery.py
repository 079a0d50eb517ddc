"""Recovery after pruning on a real model: perplexity without recovery, after block-wise reconstruction and after
distillation (a curve over steps), plus a dense-model control fine-tuned on the same text.

Drives the pipeline's stages (``dip_ext.pipeline.Pruner``: windows → calibrate → select → refit → compact) and then
``dip_ext.recovery.recover``; nothing of the pipeline is copied. The calibration pass is checkpointed in ``--work``
and reused by later runs (``resume=True``).

    python benchmarks/recovery.py --ratio 0.3 --mode auto --steps 150 --eval-at 50 100 150 --out r.json
    python benchmarks/recovery.py --control --steps 150 --eval-at 150 --out control.json   # dense, LM fine-tune

Perplexity: ``--eval-windows`` windows × 256 tokens, evenly spread, of the wiki held-out split, PTB test and the
off-domain ``shakespeare`` text (never trained on). ``--data self|mix``: recovery on text the dense model writes
itself (cached in ``--work``; the record gives the tokens generated and the seconds it took). ``--eval-at`` scores the student during one distillation run (the cosine schedule is laid
out over ``--steps``, so step 50 of a 150-step run is not a 50-step run); the seconds reported exclude that
scoring. The final row is the kept (best held-out) state.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from dip_ext import HypernetworkConfig, zoo
from dip_ext.config import EvalConfig, PruneConfig, RefitConfig
from dip_ext.eval import perplexity
from dip_ext.pipeline import Pruner
from dip_ext.recovery import RecoveryConfig, recover
from dip_ext.recovery.config import DISTILL_ONLY, RECONSTRUCT_ONLY
from dip_ext.recovery.distill import distill
from dip_ext.recovery.stage import trainable_student
from dip_ext.windows import recovery_windows

TEXTS = ("wiki", "ptb", "shakespeare")


def scores(model, tokenizer, windows: int) -> dict:
    return {t: perplexity(model, tokenizer, t, seq_len=256, max_windows=windows, progress=False) for t in TEXTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a zoo name (gemma3-270m), folder or hub id; default SmolLM2-135M")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--method", default="oneshot")
    ap.add_argument("--hyper-steps", type=int, default=HypernetworkConfig().steps,
                    help="--method hypernetwork: its --steps (checkpointed in --work, resumed)")
    ap.add_argument("--hyper-schedule", default="constant", choices=["constant", "cosine"], help="--method hypernetwork: its --lr-schedule")
    ap.add_argument("--refit", default="off", choices=["auto", "on", "off"])
    ap.add_argument("--mode", default="auto", choices=["off", "reconstruct", "distill", "auto"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=RecoveryConfig().recover_lr)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lm-weight", type=float, default=0.0)
    ap.add_argument("--temperature", type=float, default=1.0, help="--recover-temperature (of the KL)")
    ap.add_argument("--warmup", type=int, default=RecoveryConfig().recover_warmup, help="--recover-warmup")
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--teacher-topk", type=int, default=0, help="--recover-teacher-topk (0: the live teacher)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--autocast", action="store_true", help="--recover-autocast (the student's forward in bf16)")
    ap.add_argument("--teacher-dtype", default="same", help="--recover-teacher-dtype")
    ap.add_argument("--recon-windows", type=int, default=64)
    ap.add_argument("--recon-epochs", type=int, default=2)
    ap.add_argument("--recon-lr", type=float, default=1e-4)
    ap.add_argument("--val-every", type=int, default=25)
    ap.add_argument("--prune-heads", action="store_true", help="--prune-heads (KV groups compete; default off here)")
    ap.add_argument("--kv-ratio", type=float, default=None, help="--kv-ratio (a KV-cache target; turns heads on)")
    ap.add_argument("--calibration-self", type=float, default=0.0,
                    help="--calibration-self (the part of the calibration pass the dense model writes)")
    ap.add_argument("--data", default="text", choices=["text", "self", "mix"], help="--recover-data")
    ap.add_argument("--self-batch", type=int, default=RecoveryConfig().recover_self_batch,
                    help="--recover-self-batch")
    ap.add_argument("--self-temperature", type=float, default=1.0, help="--recover-self-temperature")
    ap.add_argument("--seed", type=int, default=0, help="--recover-seed")
    ap.add_argument("--recover-text", default=None, help="--recover-text (a text or a mixture such as "
                    "wiki:0.5,ptb:0.5; default: the calibration text's training windows)")
    ap.add_argument("--eval-at", type=int, nargs="*", default=[])
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--split-auto", action="store_true", help="--mode auto as reconstruct, score, then distill")
    ap.add_argument("--dense", action="store_true", help="also score the dense model")
    ap.add_argument("--control", action="store_true", help="dense model fine-tuned on the LM loss, same text/steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/dip-recovery-work")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"args": vars(args), "load_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                         time.gmtime())}
    model, tok = zoo.resolve_model(args.model)
    teacher = copy.deepcopy(model)  # the dense teacher, kept before the in-place compaction
    values = dict(recover_steps=args.steps, recover_lr=args.lr, recover_batch=args.batch,
                  recover_lm_weight=args.lm_weight, recover_temperature=args.temperature,
                  recover_warmup=args.warmup, recover_hidden_weight=args.hidden_weight,
                  recover_lora_rank=args.lora_rank, recover_recon_windows=args.recon_windows,
                  recover_teacher_topk=args.teacher_topk, recover_micro_batch=args.micro_batch,
                  recover_autocast=args.autocast, recover_teacher_dtype=args.teacher_dtype,
                  recover_recon_epochs=args.recon_epochs, recover_recon_lr=args.recon_lr,
                  recover_val_every=args.val_every, recover_checkpoint_every=0, recover_data=args.data,
                  recover_seed=args.seed, recover_text=args.recover_text)
    if args.data != "text":
        values.update(recover_self_batch=args.self_batch, recover_self_temperature=args.self_temperature)
    unused = {"distill": RECONSTRUCT_ONLY, "reconstruct": DISTILL_ONLY}.get(args.mode, ())  # refused, not ignored
    cfg = RecoveryConfig(recover=args.mode, **{k: v for k, v in values.items() if k not in unused})
    # the Pruner's own stages up to compaction; recovery runs below, scored along the way
    hyper = HypernetworkConfig(steps=args.hyper_steps, lr_schedule=args.hyper_schedule)
    prune = PruneConfig(ratio=args.ratio, method=args.method,
                        prune_heads=True if args.prune_heads else (None if args.kv_ratio else False),
                        kv_ratio=args.kv_ratio, calibration_self=args.calibration_self)
    pruner = Pruner(model, tok, prune, refit=RefitConfig(refit=args.refit),
                    method_options=hyper if args.method == "hypernetwork" else None,
                    recovery=cfg, evaluation=EvalConfig(eval_windows=0, speed=False), work_dir=args.work,
                    resume=True, progress=False)
    windows = pruner.windows()
    if args.dense:
        out["dense"] = scores(teacher, tok, args.eval_windows)
    points, eval_seconds = [], [0.0]

    def make_callback(student, t0):
        def callback(entry):
            if entry["step"] % 5 == 0:
                print(json.dumps({"step": entry["step"], "loss": round(entry["loss"], 4),
                                  "seconds": round(time.perf_counter() - t0 - eval_seconds[0], 1)}), flush=True)
            if entry["step"] in args.eval_at:
                e0 = time.perf_counter()
                points.append({"step": entry["step"], "tokens": entry["step"] * args.batch * windows.train.shape[1],
                               "seconds": e0 - t0 - eval_seconds[0], **scores(student, tok, args.eval_windows)})
                eval_seconds[0] += time.perf_counter() - e0
                print(json.dumps(points[-1]), flush=True)
        return callback

    if args.control:
        student = teacher
        t0 = time.perf_counter()
        with trainable_student(student, cfg):
            run = distill(student, None, windows.train, windows.val, RecoveryConfig(
                recover="distill", recover_steps=args.steps, recover_lr=args.lr, recover_batch=args.batch,
                recover_lm_weight=1.0, recover_val_every=args.val_every, recover_checkpoint_every=0),
                progress=False, callback=make_callback(student, t0))
        out["control"] = {"seconds": time.perf_counter() - t0 - eval_seconds[0], "best_step": run.best_step,
                          "curve": run.curve, "points": points, "final": scores(student, tok, args.eval_windows)}
    else:
        t0 = time.perf_counter()
        student = pruner.compact().model
        out["prune_seconds"] = dict(pruner.seconds)
        selection = pruner.select()
        out["budget"] = pruner.budget.describe(selection.masks.widths())  # kept parameters, KV-cache bytes (bf16)
        if selection.training is not None:
            out["hypernetwork"] = {"steps": selection.training.steps, "best_step": selection.training.best_step,
                                   "val_history": selection.training.val_history}
        out["pruned"] = scores(student, tok, args.eval_windows)
        print(json.dumps({"pruned": out["pruned"]}), flush=True)
        t0 = time.perf_counter()
        if args.mode == "auto" and args.split_auto:
            # auto's two stages run one after the other, scored in between (auto would also drop the
            # reconstruction if it did not lower the held-out loss; the record says whether it did)
            rec = recover(student, teacher, windows.train, windows.val, cfg.with_mode("reconstruct"),
                          progress=False)
            e0 = time.perf_counter()
            out["reconstructed"] = {"seconds": e0 - t0, "result": rec.to_dict(), **scores(student, tok,
                                                                                         args.eval_windows)}
            eval_seconds[0] += time.perf_counter() - e0
            print(json.dumps({"reconstructed": {k: out["reconstructed"][k] for k in ("seconds", *TEXTS)}}), flush=True)
            cfg = cfg.with_mode("distill")
        train = recovery_windows(tok, windows.train, pruner.config.calibration, cfg.recover_text, cfg.recover_windows,
                                 windows.train.shape[1], config=student.config)
        out["recovery_windows"] = int(train.shape[0])
        result = recover(student, teacher, train, windows.val, cfg, progress=False,
                         callback=make_callback(student, t0), tokenizer=tok, data_cache=args.work)
        out["recovery_seconds"] = time.perf_counter() - t0 - eval_seconds[0]
        out["recovery"] = result.to_dict()
        out["recovery"]["distillation"] = {k: v for k, v in (out["recovery"]["distillation"] or {}).items()
                                           if k != "losses"}
        out["points"] = points
        out["final"] = scores(student, tok, args.eval_windows)
    out["load_end"] = os.getloadavg()
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("pruned", "final", "recovery_seconds") if k in out}))


if __name__ == "__main__":
    main()
