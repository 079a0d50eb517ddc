"""Python cross-check of the C++ CPU microbenchmarks: each dip_ext op (through torch.ops) vs its torch chain.

    python benchmarks/bench_ops_cpu.py [--threads 2] [--dtype float32 bfloat16]

Same shapes as benchmarks/cpp/bench_ops_cpu.cpp (tokens 256, d 2048, 60 % kept, 2048 outputs). Prints the
median time of each side over alternating rounds (torch.utils.benchmark; the cores are shared, so both
sides see the same neighbours) and the median per-round ratio ours / torch.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from dip_ext import ops

T, D, OUT, KEEP, EPS = 256, 2048, 2048, 0.6, 1e-6


def cases(dtype):
    g = torch.Generator().manual_seed(0)
    k = int(KEEP * D)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = torch.randn(D, generator=g).to(dtype)
    idx = torch.randperm(D, generator=g)[:k].sort().values
    wg = (torch.randn(OUT, k, generator=g) / k**0.5).to(dtype)
    xs = torch.randn(T, OUT, generator=g).to(dtype)
    ws = (torch.randn(k, OUT, generator=g) / OUT**0.5).to(dtype)
    y = torch.randn(T, k, generator=g).to(dtype)
    res = torch.randn(T, D, generator=g).to(dtype)
    env = dict(ops=ops, F=F, torch=torch, x=x, w=w, idx=idx, wg=wg, xs=xs, ws=ws, y=y, res=res, D=D, EPS=EPS)
    return env, {
        "rms_norm_gather": ("ops.rms_norm_gather(x, w, idx, EPS, check_idx=False)",
                            "F.rms_norm(x, (D,), w, EPS)[..., idx]"),
        "index_select_gemm": ("ops.index_select_gemm(x, idx, wg, check_idx=False)",
                              "F.linear(x.index_select(-1, idx), wg)"),
        "scatter_add_": ("ops.scatter_add_(res, idx, y, check_idx=False)", "res.index_add_(-1, idx, y)"),
        "gemm_scatter_add_": ("ops.gemm_scatter_add_(res, idx, xs, ws, check_idx=False)",
                              "res.index_add_(-1, idx, F.linear(xs, ws))"),
        "rms_norm_scatter_add_": (
            "ops.rms_norm_scatter_add_(res, idx, y, w, EPS, unit_offset=True, check_idx=False)",
            "res.index_add_(-1, idx, (y.float() * torch.rsqrt(y.float().pow(2).sum(-1, keepdim=True) / D + EPS)"
            " * (w.float()[idx] + 1)).to(y.dtype))"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds per op and dtype, both sides")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'op':<20} {'dtype':<9} {'ours us':>10} {'torch us':>10} {'ratio':>7}")
    for name in a.dtype:
        env, table = cases(getattr(torch, name))
        for op, (ours, ref) in table.items():
            timers = [benchmark.Timer(stmt, globals=env, num_threads=a.threads) for stmt in (ours, ref)]
            # size one round to ~min_run_time / rounds, then alternate the two sides round by round
            per = timers[1].blocked_autorange(min_run_time=0.2).median
            number = max(1, int(a.min_run_time / a.rounds / 2 / per))
            t = [[], []]
            for _ in range(a.rounds):
                for side in (0, 1):
                    t[side].append(timers[side].timeit(number).median * 1e6)
            m = [statistics.median(v) for v in t]
            r = statistics.median(o / f for o, f in zip(*t))
            print(f"{op:<20} {name:<9} {m[0]:>10.1f} {m[1]:>10.1f} {r:>7.3f}")


if __name__ == "__main__":
    main()
