"""Held-out validation loss of hypernetwork runs with different settings, through the pipeline's stages.

One Pruner per setting (the same split of the calibration text as ``dip-ext prune``: held-out windows, the
calibration pass on ``--calibration-windows`` of the rest, training on all the rest), sharing one calibration
pass; prints the validation history (LM loss of the exported masks on the held-out windows) of each setting.

    python benchmarks/hyper_sweep.py --ratio 0.3 --steps 200 --configs '[{"lr": 3e-3}, {"lr": 1e-2}]'

``--configs``: a JSON list of HypernetworkConfig fields, each overriding the flags' values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from dip_ext import EvalConfig, HypernetworkConfig, PruneConfig, Pruner, RefitConfig, zoo
from dip_ext.options import OptionParser, from_namespace


def main(argv=None) -> None:
    p = OptionParser([PruneConfig, HypernetworkConfig], prog="hyper_sweep.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="[{}]", help="JSON list of HypernetworkConfig field overrides")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also append each result as a JSON line to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = dataclasses.replace(from_namespace(PruneConfig, args), method="hypernetwork")
    hyper = from_namespace(HypernetworkConfig, args)
    model, tokenizer = zoo.load_default()
    calibration = None
    for overrides in json.loads(args.configs):
        options = dataclasses.replace(hyper, **overrides)
        pruner = Pruner(model, tokenizer, base, method_options=options, refit=RefitConfig(refit="off"),
                        evaluation=EvalConfig(eval_windows=0), progress=False, calibration=calibration)
        calibration = pruner.calibrate()
        t0 = time.time()
        run = pruner.select().training
        line = json.dumps({"date": time.strftime("%Y-%m-%d"), "ratio": base.ratio, "steps": options.steps,
                           "threads": args.threads, "config": overrides, "best_step": run.best_step,
                           "best_val_loss": run.best_val_loss,
                           "history": [(s, round(loss, 4)) for s, loss in run.val_history],
                           "seconds": round(time.time() - t0)})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
