"""Where a hypernetwork training step spends its time (the default model, one CPU thread, 256-token windows).

Runs ``--steps`` steps of the pipeline's own ``Trainer`` unprofiled (warm-up), then as many under
``torch.profiler``, and prints the operators by self CPU time; writes the top rows as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dip_ext import HypernetworkConfig, zoo
from dip_ext.data import get_blocks
from dip_ext.selection import Budget
from dip_ext.selection.hypernetwork import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/profile-hyper-step.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = zoo.load_default()
    windows = get_blocks(tokenizer, "wiki", "calibration", 256, None)[:64]
    budget = Budget.for_model(model, args.ratio)
    trainer = Trainer(model, windows, budget, HypernetworkConfig(steps=2 * args.steps), progress=False)
    warmup = [trainer.step() for _ in range(args.steps)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            trainer.step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
            "calls": e.count} for e in rows[:10]]
    print(f"warm-up step seconds: {[round(e.seconds, 2) for e in warmup]}")
    for r in top:
        print(f"{r['share']:6.1%}  {r['self_s']:7.3f} s  {r['calls']:6d} calls  {r['op']}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "step_seconds": [e.seconds for e in warmup],
                                          "profiled_self_s": total / 1e6, "top": top}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
