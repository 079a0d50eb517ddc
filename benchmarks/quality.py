"""Quality and cost of the selection methods on the default model (issue 4).

Held-out wiki perplexity and PTB test perplexity of dense, dependent, oneshot and hypernetwork (warm-started
from oneshot) at several ratios of decoder-linear parameters removed, plus the one-shot wall time after load.
The calibration windows are split as ``prune_and_compact`` splits them (:func:`dip_ext.prune.split_calibration`):
--val-windows held out for the hypernetwork's early stopping, the calibration pass (Fisher scores) on
--calibration-windows of the rest, the hypernetwork trained on all the rest. One calibration pass serves every
ratio and method; it is cached in --work (several processes can share a finished one).

    python benchmarks/quality.py                                  # the RESULTS.md table
    python benchmarks/quality.py --ratios 0.2 --steps 50 --eval-windows 4   # quick look
    python benchmarks/quality.py --table results/quality-*.json     # one table from several runs' files
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

import dip_ext
from dip_ext import zoo
from dip_ext.calibration import CalibrationResult, run_calibration
from dip_ext.data import get_blocks, spread_indices
from dip_ext.eval import perplexity
from dip_ext.prune import split_calibration
from dip_ext.refit import choose_refit
from dip_ext.selection import Budget
from dip_ext.selection.oneshot import dependent_masks, oneshot_masks

TEXTS = {"wiki": "heldout", "ptb": "test"}


def evaluate(model, tokenizer, args) -> dict:
    return {name: perplexity(model, tokenizer, name, seq_len=args.seq_len, max_windows=args.eval_windows,
                             split=split, progress=False) for name, split in TEXTS.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--methods", nargs="+", default=["dependent", "oneshot", "hypernetwork"])
    p.add_argument("--hyper-ratios", type=float, nargs="*", default=None,
                   help="ratios that also get a hypernetwork run (default: all --ratios)")
    p.add_argument("--steps", type=int, default=300, help="hypernetwork steps per ratio")
    p.add_argument("--lam", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=("constant", "cosine", "cosine-tail"), default="constant")
    p.add_argument("--decay-steps", type=int, default=None, help="length of the cosine-tail decay")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--margin", type=float, default=3.0)
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                   help="also score every method's masks after the refit prune_and_compact does by default (auto: "
                        "the best of dip_ext.refit.CANDIDATES or none on the --val-windows; rows 'METHOD+refit')")
    p.add_argument("--calibration-windows", type=int, default=64)
    p.add_argument("--refit-windows", type=int, default=None,
                   help="with --refit: the refit's statistics from this many training windows (evenly spaced) "
                        "instead of the calibration pass's --calibration-windows")
    p.add_argument("--val-windows", type=int, default=16, help="held-out windows for early stopping")
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="benchmarks/results/quality-work")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hyper_ratios = args.ratios if args.hyper_ratios is None else args.hyper_ratios

    t0 = time.perf_counter()
    dense, tokenizer = zoo.load_default()
    load_s = time.perf_counter() - t0
    blocks, train_blocks, val_blocks = split_calibration(
        get_blocks(tokenizer, "wiki", "calibration", args.seq_len, None), args.calibration_windows, args.val_windows)
    t0 = time.perf_counter()
    calib = run_calibration(dense, blocks, checkpoint=work / "calibration.safetensors")
    calib_s = time.perf_counter() - t0
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "threads": args.threads, "args": vars(args), "load_s": load_s, "calibration_s": calib_s,
               "dense": evaluate(dense, tokenizer, args), "runs": []}
    print(f"dense: {results['dense']}  (calibration pass {calib_s:.1f} s over {calib.windows} windows)")

    for ratio in args.ratios:
        budget = Budget.for_model(dense, ratio)
        oneshot = None
        for method in args.methods:
            if method == "hypernetwork" and ratio not in hyper_ratios:
                continue
            t0 = time.perf_counter()
            log: list = []
            if method == "dependent":
                masks = dependent_masks(calib, budget)
            else:
                oneshot = oneshot if oneshot is not None else oneshot_masks(calib, budget)
                masks = oneshot
                if method == "hypernetwork":
                    from dip_ext.selection.hypernetwork import learn_masks_hypernetwork

                    hyper_report: dict = {}
                    masks = learn_masks_hypernetwork(
                        dense, train_blocks, budget, steps=args.steps, init_masks=oneshot, lam=args.lam, lr=args.lr,
                        distill=args.distill, margin=args.margin, lr_schedule=args.lr_schedule,
                        decay_steps=args.decay_steps,
                        val_blocks=val_blocks, val_every=args.val_every, checkpoint_dir=work / f"hyper-{ratio}",
                        resume=True, log=log, report=hyper_report)
            select_s = time.perf_counter() - t0
            model = dip_ext.compact(copy.deepcopy(dense), masks)
            rep = dip_ext.param_report(model)
            run = {"ratio": ratio, "method": method, "select_s": select_s,
                   "removed_decoder_linear": rep.removed_decoder_linear, "removed_total": rep.removed_total,
                   "ppl": evaluate(model, tokenizer, args)}
            if method == "oneshot":
                run["oneshot_wall_after_load_s"] = calib_s + select_s
            if method == "hypernetwork":
                run["hyper_log_tail"] = log[-5:]
                run["hyper_steps"] = args.steps
                run["val_history"] = hyper_report.get("val_history")
                run["best_step"] = hyper_report.get("best_step")
                run["train_windows"] = int(train_blocks.shape[0])
                run["settings"] = {"lr": args.lr, "lam": args.lam, "distill": args.distill, "margin": args.margin,
                                   "lr_schedule": args.lr_schedule, "decay_steps": args.decay_steps}
            results["runs"].append(run)
            print(f"{method:>12} {100 * ratio:4.0f} %: removed {100 * rep.removed_decoder_linear:.2f} % "
                  f"decoder-linear, ppl wiki {run['ppl']['wiki']:.2f} ptb {run['ppl']['ptb']:.2f} "
                  f"({select_s:.1f} s)", flush=True)
            del model
            Path(args.out).write_text(json.dumps(results, indent=1))
            if args.refit:
                t0 = time.perf_counter()
                model = copy.deepcopy(dense)
                refit_blocks = blocks if args.refit_windows is None else train_blocks[
                    spread_indices(train_blocks.shape[0], args.refit_windows)]
                refit = choose_refit(model, masks, refit_blocks, val_blocks, progress=False)
                refit_s = time.perf_counter() - t0
                model = dip_ext.compact(model, masks)
                run = {**run, "method": f"{method}+refit", "refit_s": refit_s, "refit": refit,
                       "ppl": evaluate(model, tokenizer, args)}
                results["runs"].append(run)
                print(f"{run['method']:>12} {100 * ratio:4.0f} %: ppl wiki {run['ppl']['wiki']:.2f} "
                      f"ptb {run['ppl']['ptb']:.2f} (refit {refit_s:.1f} s: {refit['structures']} damping "
                      f"{refit['damping']}, held-out loss {refit['val_loss'][0]:.4f} -> {refit['val_loss'][1]:.4f})",
                      flush=True)
                del model
                Path(args.out).write_text(json.dumps(results, indent=1))

    print(table([results]))
    print(f"\nwrote {args.out}")


def table(all_results: list) -> str:
    """One Markdown table of the runs of several result files (sorted by ratio, then method)."""
    dw, dp = all_results[0]["dense"]["wiki"], all_results[0]["dense"]["ptb"]
    order = {"dependent": 0, "oneshot": 1, "hypernetwork": 2}
    runs = sorted((r for res in all_results for r in res["runs"]),
                  key=lambda r: (r["ratio"], order[r["method"].split("+")[0]], r["method"]))
    lines = ["| ratio | method | wiki ppl (×dense) | ptb ppl (×dense) |", "|---:|---|---:|---:|",
             f"| 0 | dense | {dw:.2f} | {dp:.2f} |"]
    for r in runs:
        name = r["method"]
        if name.startswith("hypernetwork"):
            settings = r.get("settings", {"lr": 1e-3, "distill": False})  # files before the settings were kept
            loss = "KL to dense" if settings["distill"] else "LM loss"
            schedule = {"cosine": " cosine", "cosine-tail": f" cosine over the last {settings.get('decay_steps')}"
                        }.get(settings.get("lr_schedule"), "")
            name += f" ({r['hyper_steps']} steps, best {r.get('best_step')}, lr {settings['lr']:g}{schedule}, {loss})"
        lines.append(f"| {100 * r['ratio']:.0f} % | {name} | {r['ppl']['wiki']:.2f} (×{r['ppl']['wiki'] / dw:.2f}) | "
                     f"{r['ppl']['ptb']:.2f} (×{r['ppl']['ptb'] / dp:.2f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--table"]:  # python benchmarks/quality.py --table results/a.json results/b.json
        print(table([json.loads(Path(f).read_text()) for f in sys.argv[2:]]))
    else:
        main()
