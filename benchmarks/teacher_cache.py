"""The teacher's top-k cache for distillation on a real model: disk per window, how much of the teacher's
distribution the k tokens hold, how close the coarsened KL is to the full one, and the time of a distillation
step's forwards and backwards (no optimizer update) with the live teacher against reading the cache.

    python benchmarks/teacher_cache.py --ratio 0.3 --k 16 64 256 --windows 8 --out benchmarks/results/teacher-cache.json

The student is the one-shot compacted model (``Pruner`` stages, calibration checkpoint in ``--work``). Step time:
``--repeats`` interleaved pairs of one optimizer step each (the same 4 windows: a live-teacher step, then a cached
step), the median reported; the cache fill is timed once per k.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dip_ext import zoo
from dip_ext.config import EvalConfig, PruneConfig, RefitConfig
from dip_ext.pipeline import Pruner
from dip_ext.recovery import RecoveryConfig
from dip_ext.recovery.distill import micro_step
from dip_ext.recovery.losses import kl_sum, topk_kl_sum
from dip_ext.recovery.stage import trainable_student
from dip_ext.recovery.teacher_cache import TeacherTopK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--windows", type=int, default=8, help="windows scored for mass and KL")
    ap.add_argument("--batch", type=int, default=4, help="windows per timed step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/dip-teacher-cache-work")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = zoo.load_default()
    teacher = copy.deepcopy(model)
    # the recovery setting makes the Pruner hold out validation windows, as benchmarks/recovery.py does, so the
    # two share a calibration checkpoint in --work
    pruner = Pruner(model, tok, PruneConfig(ratio=args.ratio, method="oneshot", prune_heads=False),
                    refit=RefitConfig(refit="off"), recovery=RecoveryConfig(recover="distill", recover_data="text"),
                    evaluation=EvalConfig(eval_windows=0, speed=False),
                    work_dir=args.work, resume=True, progress=False)
    train = pruner.windows().train
    student = pruner.compact().model
    out = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_start": os.getloadavg(),
           "args": vars(args), "vocab": int(teacher.config.vocab_size), "rows": []}
    ids = train[: args.windows]
    with torch.no_grad():
        t_logits, s_logits = teacher(input_ids=ids).logits, student(input_ids=ids).logits
    full = float(kl_sum(s_logits, t_logits)) / (ids.numel() - len(ids))
    out["kl_full_per_token"] = full
    batch = list(range(args.batch))
    config = RecoveryConfig(recover="distill")
    tokens = args.batch * (train.shape[1] - 1)
    for k in args.k:
        z = t_logits[:, :-1].float()
        lse = torch.logsumexp(z, -1)
        values, indices = z.topk(k, -1)
        mass = (values - lse.unsqueeze(-1)).exp().sum(-1)
        coarse = float(topk_kl_sum(s_logits, values, indices, lse)) / (ids.numel() - len(ids))
        cache = TeacherTopK.for_teacher(Path(args.work) / "cache", teacher, train, k, 1.0)
        t0 = time.perf_counter()
        cache.fill(teacher, batch, micro_batch=1, progress=False)
        fill_s = (time.perf_counter() - t0) / len(batch)
        live, cached = [], []
        with trainable_student(student, config):
            for _ in range(args.repeats):
                for kind, times in (("live", live), ("cached", cached)):
                    t0 = time.perf_counter()
                    for i in batch:
                        targets = cache.targets([i]) if kind == "cached" else None
                        micro_step(student, teacher, train[i:i + 1], config, tokens=tokens, parts={},
                                    cached=targets)
                    times.append(time.perf_counter() - t0)
                    student.zero_grad(set_to_none=True)
        row = {"k": k, "bytes_per_window": sum(p.stat().st_size for p in cache.folder.glob("w*")) // len(batch),
               "teacher_mass_median": float(mass.median()), "teacher_mass_p10": float(mass.quantile(0.1)),
               "kl_coarse_per_token": coarse, "fill_s_per_window": fill_s,
               "fwd_bwd_live_s": statistics.median(live), "fwd_bwd_cached_s": statistics.median(cached)}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    out["load_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"full KL per token {full:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
