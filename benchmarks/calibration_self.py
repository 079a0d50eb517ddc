"""One-shot masks from a calibration pass partly written by the dense model itself (``--calibration-self``):
perplexity on the calibration text's domain (wiki), its neighbour (PTB) and the off-domain text (Shakespeare),
before any recovery, for each fraction and each budget asked.

    python benchmarks/calibration_self.py --fractions 0 0.5 0.99 --out benchmarks/results/calibration-self.json

Each fraction has its own calibration pass of the default model (SmolLM2-135M, the pipeline's defaults: 64 windows
of 256 wiki tokens), checkpointed in ``--work`` and reused by every budget; the self-written windows are sampled as
the default recovery samples them and cached there too. Budgets: 30 % with the default KV-group setting (the main
job), and 50 % with and without a 30 % KV-cache target. Perplexity on ``--eval-windows`` windows of each text's
held-out part, fp32, on the CPU.
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from dip_ext import EvalConfig, PruneConfig, Pruner, zoo
from dip_ext.eval import perplexity

TEXTS = ("wiki", "ptb", "shakespeare")
#: (ratio, kv_ratio) pairs
BUDGETS = ((0.3, None), (0.5, 0.3), (0.5, None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 0.99])
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/dip-calibration-self")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = zoo.resolve_model(None)
    out = {"args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": []}
    out["dense"] = {t: perplexity(model, tok, t, seq_len=256, max_windows=args.eval_windows, progress=False)
                    for t in TEXTS}
    print(json.dumps({"dense": out["dense"]}), flush=True)
    for fraction in args.fractions:
        calibration = None  # one pass per fraction, shared by its budgets
        for ratio, kv in BUDGETS:
            pruner = Pruner(copy.deepcopy(model), tok, PruneConfig(ratio=ratio, kv_ratio=kv, calibration_self=fraction),
                            evaluation=EvalConfig(eval_windows=0, speed=False), calibration=calibration,
                            work_dir=Path(args.work) / f"self-{fraction:g}", resume=True, progress=False)
            t0 = time.perf_counter()
            student = pruner.compact().model
            calibration = pruner.calibrate()
            row = {"fraction": fraction, "ratio": ratio, "kv_ratio": kv, "seconds": round(time.perf_counter() - t0, 1),
                   "windows": pruner.windows().sources,
                   "kv_groups_kept": sum(int(w.get("kv_groups", 0)) for w in pruner.select().masks.widths()),
                   **{t: perplexity(student, tok, t, seq_len=256, max_windows=args.eval_windows, progress=False)
                      for t in TEXTS}}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
