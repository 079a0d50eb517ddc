"""A KV-cache target with ``heads_multiple_of``: how many KV groups the one-shot selection keeps, and what that
costs in perplexity, when the target's drops land on the step (dip_ext's selection) against the earlier policy
(the lowest-scored groups over all layers dropped singly, then each layer's count rounded down to the step).

    python benchmarks/kv_target_step.py --ratio 0.5 --kv-ratio 0.3 --heads-multiple-of 2

Both selections read one calibration pass of the default model (wiki, the pipeline's defaults) and meet the same
parameter budget; perplexity on wiki and PTB test (``--eval-windows`` windows each), fp32, on the CPU.
"""

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import dip_ext
from dip_ext import EvalConfig, PruneConfig, Pruner, RefitConfig, zoo
from dip_ext.eval import perplexity
from dip_ext.masks import KV_GROUPS
from dip_ext.selection.kv_target import kv_target_drops
from dip_ext.selection.greedy import GroupSpace, greedy_select

TEXTS = ("wiki", "ptb")


def rounded_after_the_target(calib, budget):
    """The earlier policy: the KV target's lowest-scored groups over all layers dropped singly (step 1), then the
    parameter budget met and each layer's group count rounded down to ``budget.heads_multiple_of``."""
    space = budget.space
    slots = space.slots()
    scores = [calib.scores[i][s] for i, s in slots]
    unit_group = torch.cat([torch.full((x.numel(),), g, dtype=torch.long) for g, x in enumerate(scores)])
    unit_index = torch.cat([torch.arange(x.numel()) for x in scores])
    unit_score = torch.cat(scores).double()
    kv_slots = torch.tensor([s == KV_GROUPS for _, s in slots])
    dropped = kv_target_drops(unit_score, unit_group, kv_slots, budget.kv_groups_kept, step=1)
    return greedy_select(GroupSpace(space, [[slot] for slot in slots]), budget, unit_group, unit_index, unit_score,
                         dropped=dropped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--kv-ratio", type=float, default=0.3)
    p.add_argument("--heads-multiple-of", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dip_ext-kv-target-step"),
                   help="the calibration pass's checkpoint (reused by a rerun)")
    p.add_argument("--out", default=None,
                   help="default: benchmarks/results/kv-target-step-RATIO-kvKV_RATIO-headsN.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out = args.out or (f"benchmarks/results/kv-target-step-{args.ratio:g}-kv{args.kv_ratio:g}-heads"
                            f"{args.heads_multiple_of}.json")
    dense, tokenizer = zoo.resolve_model(None)
    config = PruneConfig(method="oneshot", ratio=args.ratio, kv_ratio=args.kv_ratio,
                         heads_multiple_of=args.heads_multiple_of)
    pruner = Pruner(dense, tokenizer, config, refit=RefitConfig("off"), evaluation=EvalConfig(eval_windows=0),
                    work_dir=args.work, resume=True, progress=False)
    calib, budget = pruner.calibrate(), pruner.budget
    rows = {}
    selections = {"on the step": pruner.select().masks, "rounded after": rounded_after_the_target(calib, budget)}
    for name, masks in selections.items():
        t = time.perf_counter()
        model = dip_ext.compact(copy.deepcopy(dense), masks)  # compact() works in place
        groups = [w[KV_GROUPS] for w in masks.widths()]
        described = budget.describe(masks.widths(), itemsize=2)
        rows[name] = {"kv_groups_kept": groups, "kv_groups_total": sum(groups), "cap": budget.kv_groups_kept,
                      "kv_bytes_per_token_bf16": described["kv_cache_bytes_per_token_kept"],
                      "dense_kv_bytes_per_token_bf16": described["kv_cache_bytes_per_token_dense"],
                      "kept_linear": int(budget.kept_linear(masks.widths())), "target_linear": budget.target_linear,
                      "ppl": {text: perplexity(model, tokenizer, text, max_windows=args.eval_windows,
                                               progress=False) for text in TEXTS}}
        rows[name]["seconds"] = time.perf_counter() - t
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "kv_groups_kept"}), flush=True)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
