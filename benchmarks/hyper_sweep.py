"""Held-out validation loss of hypernetwork runs with different settings (issue 4 follow-up).

Same data split as ``prune_and_compact`` (16 held-out windows, Fisher pass on 64 of the rest, training on all the
rest); prints the validation history (LM loss of the exported masks on the held-out windows) of each setting.

    python benchmarks/hyper_sweep.py --ratio 0.3 --steps 200 --configs '[{"lr": 3e-3}, {"lr": 1e-2}]'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dip_ext import zoo
from dip_ext.calibration import run_calibration
from dip_ext.data import get_blocks
from dip_ext.prune import split_calibration
from dip_ext.selection import Budget
from dip_ext.selection.hypernetwork import learn_masks_hypernetwork
from dip_ext.selection.oneshot import oneshot_masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--configs", default='[{"lr": 1e-3}]', help="JSON list of learn_masks_hypernetwork options")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calibration-checkpoint", default="/tmp/dip_ext-sweep-calibration.safetensors")
    p.add_argument("--out", default=None, help="also append each result as a JSON line to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = zoo.load_default()
    calib_blocks, train, val = split_calibration(get_blocks(tok, "wiki", "calibration", 256, None), 64, 16)
    calib = run_calibration(model, calib_blocks, checkpoint=args.calibration_checkpoint, progress=False)
    budget = Budget.for_model(model, args.ratio)
    init = oneshot_masks(calib, budget)
    for cfg in json.loads(args.configs):
        report, t0 = {}, time.time()
        learn_masks_hypernetwork(model, train, budget, steps=args.steps, init_masks=init, val_blocks=val,
                                 val_every=args.val_every, progress=False, report=report, **cfg)
        history = [(s, round(loss, 4)) for s, loss in report["val_history"]]
        line = json.dumps({"date": time.strftime("%Y-%m-%d"), "ratio": args.ratio, "steps": args.steps,
                           "threads": args.threads, "config": cfg, "best_step": report["best_step"],
                           "best_val_loss": report["best_val_loss"], "history": history,
                           "seconds": round(time.time() - t0)})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
