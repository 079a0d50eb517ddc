"""CPU prefill speed of a zoo model, dense vs DISP-compacted, against the linear FLOP ratio (any family, e.g.
Gemma3-270M whose sandwich norms run through the fused output-norm scatter-add).

Masks: random subsets at realistic per-layer widths (``e2e.budget_widths``: speed does not depend on which dims
are kept). One prefill is ``model(ids [1, S], use_cache=False, logits_to_keep=1)``; dense and compacted forwards
alternate, medians reported. Linear FLOP ratio: dense / compacted of decoder-linear weights × S plus the
vocabulary projection of one row (attention scores, norms and embeddings are not counted).

    python benchmarks/prefill_cpu.py --model gemma3-270m --ratios 0.3 0.5 --seq-len 512 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import budget_widths, random_masks  # noqa: E402

import dip_ext  # noqa: E402
from dip_ext import zoo  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--multiple-of", type=int, default=8)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dense, _ = zoo.resolve_model(a.model)
    ids = torch.randint(3, dense.config.vocab_size, (1, a.seq_len), generator=torch.Generator().manual_seed(0))
    vocab_macs = dense.config.vocab_size * dense.config.hidden_size
    dense_linear = dip_ext.param_report(dense).decoder_linear
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "threads": a.threads, "load_avg": os.getloadavg(), "args": vars(a), "runs": []}
    for ratio in a.ratios:
        masks = random_masks(budget_widths(dense.config, ratio, a.multiple_of, 0.25, 0), dense.config, 0)
        compacted = dip_ext.compact(copy.deepcopy(dense), masks)
        rep = dip_ext.param_report(compacted)
        times = {"dense": [], "compacted": []}
        with torch.inference_mode():
            for model in (dense, compacted):  # warm-up
                model(ids, use_cache=False, logits_to_keep=1)
            for _ in range(a.repeats):
                for name, model in (("dense", dense), ("compacted", compacted)):
                    t = time.perf_counter()
                    model(ids, use_cache=False, logits_to_keep=1)
                    times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        flop_ratio = (dense_linear * a.seq_len + vocab_macs) / (rep.decoder_linear * a.seq_len + vocab_macs)
        row = {"ratio": ratio, "removed_decoder_linear": rep.removed_decoder_linear, "removed_total": rep.removed_total,
               "dense_s": med["dense"], "compacted_s": med["compacted"], "speedup": med["dense"] / med["compacted"],
               "linear_flop_ratio": flop_ratio, "times": times}
        results["runs"].append(row)
        print(f"{100 * ratio:.0f} %: removed {100 * rep.removed_decoder_linear:.1f} % decoder-linear "
              f"({100 * rep.removed_total:.1f} % total); prefill {a.seq_len} tokens dense {med['dense']:.3f} s, "
              f"compacted {med['compacted']:.3f} s: ×{row['speedup']:.2f} (linear FLOP ratio ×{flop_ratio:.2f})",
              flush=True)
        del compacted
    results["load_avg_end"] = os.getloadavg()
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
