"""The calibration pass (Fisher scores and activation statistics) in fp32 against bf16 autocast on the CPU: seconds
per window (the two interleaved) and how far the scores agree (Spearman rank correlation per structure over all
layers' units, the order the one-shot selection reads them in).

    python benchmarks/calibration_dtype.py --windows 8 --repeats 2

The default model, windows of 256 tokens evenly spaced over wiki's calibration split, weights in fp32 either way.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from dip_ext.calibration import run_calibration
from dip_ext.windows import calibration_windows
from dip_ext.zoo import load_default


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([torch.argsort(torch.argsort(x)).double() for x in (a, b)])
    return float(torch.corrcoef(ranks)[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8, help="windows per timed pass")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per dtype, interleaved")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/calibration-dtype.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_default()
    blocks = calibration_windows(tokenizer, "wiki", args.seq_len)
    blocks = blocks[::max(1, blocks.shape[0] // args.windows)][:args.windows]

    def run(bf16: bool, windows: torch.Tensor):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            result = run_calibration(model, windows, progress=False)
        return result, (time.perf_counter() - t) / windows.shape[0]

    run(False, blocks[:1]), run(True, blocks[:1])  # warm-up
    seconds, results = {"fp32": [], "bf16": []}, {}
    for rep in range(args.repeats):
        for name in ("fp32", "bf16"):
            results[name], per_window = run(name == "bf16", blocks)
            seconds[name].append(per_window)
            print(f"pass {rep} {name}: {per_window:.3f} s a window", flush=True)
    agreement = {s: spearman(torch.cat([layer[s] for layer in results["fp32"].scores]),
                             torch.cat([layer[s] for layer in results["bf16"].scores]))
                 for s in results["fp32"].scores[0]}
    print("Spearman fp32 / bf16 scores:", json.dumps({s: round(v, 4) for s, v in agreement.items()}))
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "seconds_per_window": seconds,
           "spearman": agreement, "losses": {k: v.losses for k, v in results.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
