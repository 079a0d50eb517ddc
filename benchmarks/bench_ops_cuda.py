"""CUDA microbenchmark of the dip_ext kernels against the unfused torch chains they replace.

For each op, dtype and token count (Llama-2-7B-like shapes: d 4096, ffn 11008, half of each index set kept,
widths aligned to 64) it times, with CUDA events and the L2 cache flushed before every repetition (a 256 MB
buffer is overwritten):

- ``dip``:      the dip_ext op (``check_idx=False``, as compacted models call it),
- ``unfused``:  the plain torch chain it replaces (``F.rms_norm(...)[..., idx]``, ``index_select`` + linear,
                ``index_add_``, ...),
- ``mm``:       for the GEMM ops, ``torch.mm`` on a pre-gathered contiguous input (the floor: no gather at all).

Ceilings measured in the same run: device-to-device copy bandwidth (``dst.copy_(src)`` on 1 GiB) and a large
bf16 GEMM (8192^3).

Rows that measure two design choices: ``index_select_gemm`` at 1 token is the decode GEMV (2 to 16 tokens
take gather + cuBLAS: the rows at 2, 4, 8 and 16 tokens show that choice), which
gathers ``x[:, idx]`` once per call (not once per thread block) and then only streams the weight, so its
``%copy`` (weight bytes over copy bandwidth) and ``ratio_vs_mm`` (against cuBLAS on a pre-gathered input) show
what the gather costs; ``calibration_stats`` at 512 and 2048 tokens uses short row chunks so that even small
inputs launch several thread blocks per SM (its ``%copy``). Each row reports GB/s on the op's MINIMAL bytes (norm+gather: read x [M, d] + write
[M, k]; scatter-add: read y + read and write residual[:, idx]; statistics: read x; GEMMs: weight + inputs +
outputs) and its fraction of the copy bandwidth, and TFLOP/s with its fraction of the GEMM ceiling.

    python benchmarks/bench_ops_cuda.py --out results/ops_cuda.json [--tokens 1,2,4,8,16,512,2048,8192] [--dtypes bf16,fp32]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def align_down(n: int, a: int) -> int:
    return max(a, n // a * a)


class Timer:
    """Median of per-repetition CUDA-event times (ms), each repetition preceded by an L2 flush."""

    def __init__(self, reps: int, warmup: int, flush_mb: int = 256):
        self.reps, self.warmup = reps, warmup
        self.flush_buf = torch.empty(flush_mb * (1 << 20) // 4, dtype=torch.float32, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self.flush_buf.fill_(1.0)  # evicts everything the op touched from the 60 MB L2
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def measure_ceilings(timer: Timer) -> dict:
    n = 1 << 28  # 256 Mi fp32 = 1 GiB per buffer: far beyond L2
    src = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    copy_gbs = 2 * n * 4 / ms / 1e6
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms_mm = timer(lambda: torch.mm(a, b))
    gemm_tflops = 2 * m ** 3 / ms_mm / 1e9
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbs, "copy_ms_1GiB": ms, "gemm_bf16_TFLOPs": gemm_tflops, "gemm_shape": [m, m, m]}


def sorted_subset(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k].sort().values.cuda()


def bench_cases(ops, M: int, dtype: torch.dtype, d: int, ffn: int, keep: float):
    """Yields (op name, {variant: callable}, minimal bytes, flops, (dip output fn, reference output fn))."""
    gen = torch.Generator().manual_seed(M * 7 + d)
    es = torch.tensor([], dtype=dtype).element_size()
    k_in = align_down(int(d * keep), 64)     # attn_in / mlp_in
    k_out = align_down(int(d * keep), 64)    # attn_out / mlp_out
    k_mid = align_down(int(ffn * keep), 64)  # mlp_mid
    idx_in = sorted_subset(d, k_in, gen)
    idx_out = sorted_subset(d, k_out, gen)
    x = torch.randn(M, d, device="cuda", dtype=dtype)
    w_norm = torch.randn(d, device="cuda", dtype=dtype)
    b_norm = torch.randn(d, device="cuda", dtype=dtype)
    eps = 1e-6

    yield ("rms_norm_gather",
           {"dip": lambda: ops.rms_norm_gather(x, w_norm, idx_in, eps, check_idx=False),
            "unfused": lambda: F.rms_norm(x, (d,), w_norm, eps).index_select(-1, idx_in)},
           (M * d + M * k_in) * es, 0)
    yield ("layer_norm_gather",
           {"dip": lambda: ops.layer_norm_gather(x, w_norm, b_norm, idx_in, eps, check_idx=False),
            "unfused": lambda: F.layer_norm(x, (d,), w_norm, b_norm, eps).index_select(-1, idx_in)},
           (M * d + M * k_in) * es, 0)

    # gate/up-like projection: x[:, mlp_in] @ W^T, W [k_mid, k_in]
    w_up = torch.randn(k_mid, k_in, device="cuda", dtype=dtype) / math.sqrt(k_in)
    x_pre = x.index_select(-1, idx_in).contiguous()
    yield ("index_select_gemm",
           {"dip": lambda: ops.index_select_gemm(x, idx_in, w_up, check_idx=False),
            "unfused": lambda: F.linear(x.index_select(-1, idx_in), w_up),
            "mm": lambda: torch.mm(x_pre, w_up.t())},
           (k_mid * k_in + M * k_in + M * k_mid) * es, 2 * M * k_in * k_mid)

    # residual update after a block: residual[:, attn_out] += y
    residual = torch.randn(M, d, device="cuda", dtype=dtype)
    y = torch.randn(M, k_out, device="cuda", dtype=dtype)
    yield ("scatter_add_",
           {"dip": lambda: ops.scatter_add_(residual, idx_out, y, check_idx=False),
            "unfused": lambda: residual.index_add_(-1, idx_out, y)},
           3 * M * k_out * es, 0)

    # down-like projection fused with the residual update: residual[:, mlp_out] += h @ W^T, W [k_out, k_mid]
    h = torch.randn(M, k_mid, device="cuda", dtype=dtype)
    w_down = torch.randn(k_out, k_mid, device="cuda", dtype=dtype) / math.sqrt(k_mid)
    yield ("gemm_scatter_add_",
           {"dip": lambda: ops.gemm_scatter_add_(residual, idx_out, h, w_down, check_idx=False),
            "unfused": lambda: residual.index_add_(-1, idx_out, F.linear(h, w_down)),
            "mm": lambda: torch.mm(h, w_down.t())},
           (k_out * k_mid + M * k_mid + 2 * M * k_out) * es, 2 * M * k_mid * k_out)

    # Gemma's output norm fused with the residual update: residual[:, out] += rms_norm(y over d) * (1 + w)[out]
    def rnsa_unfused():
        yf = y.float()
        scale = w_norm.float().index_select(0, idx_out) + 1.0
        residual.index_add_(-1, idx_out, (yf * torch.rsqrt(yf.pow(2).sum(-1, keepdim=True) / d + eps) * scale).to(dtype))

    yield ("rms_norm_scatter_add_",
           {"dip": lambda: ops.rms_norm_scatter_add_(residual, idx_out, y, w_norm, eps, unit_offset=True,
                                                     check_idx=False),
            "unfused": rnsa_unfused},
           (3 * M * k_out + d) * es, 0)

    s64 = torch.zeros(d, device="cuda", dtype=torch.float64)
    q64 = torch.zeros(d, device="cuda", dtype=torch.float64)

    def stats_unfused():
        xd = x.double()
        s64.add_(xd.sum(0))
        q64.add_((xd * xd).sum(0))

    yield ("calibration_stats",
           {"dip": lambda: torch.ops.dip_ext.calibration_stats_(x, s64, q64, None),
            "unfused": stats_unfused},
           M * d * es, 0)


def correctness(ops, dtype) -> dict:
    """Max abs error of the timed kernels against fp32 references on one shape per path (the tests are the
    real check; this only guards the figures against timing a broken kernel)."""
    gen = torch.Generator().manual_seed(0)
    d = 4096
    x = torch.randn(64, d, generator=gen).to("cuda", dtype)
    w = torch.randn(d, generator=gen).to("cuda", dtype)
    idx = sorted_subset(d, 2048, gen)
    wl = (torch.randn(512, 2048, generator=gen) / 45).to("cuda", dtype)
    out = {"rms_norm_gather": (ops.rms_norm_gather(x, w, idx, 1e-6).float()
                               - F.rms_norm(x.float(), (d,), w.float(), 1e-6)[:, idx]).abs().max().item()}
    for m in (1, 16, 64):  # GEMV buckets and the gather + cuBLAS path
        ref = F.linear(x[:m].float()[:, idx], wl.float())
        out[f"index_select_gemm_M{m}"] = (ops.index_select_gemm(x[:m], idx, wl).float() - ref).abs().max().item()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--tokens", default="1,2,4,8,16,512,2048,8192")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of each index set kept")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops_cuda: no CUDA device", file=sys.stderr)
        return 2

    import dip_ext
    from dip_ext import ops

    t0 = time.time()
    timer = Timer(args.reps, args.warmup)
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "dip_ext": dip_ext.build_info(), "shapes": {"d": args.d, "ffn": args.ffn, "keep": args.keep},
        "reps": args.reps, "l2_flush_MB": 256, "results": [], "errors": [],
    }
    ceil = measure_ceilings(timer)
    report["ceilings"] = ceil
    print(f"# {report['device']}  torch {torch.__version__}  copy {ceil['copy_GBps']:.0f} GB/s  "
          f"bf16 GEMM {ceil['gemm_bf16_TFLOPs']:.0f} TFLOP/s")
    hdr = (f"{'op':<19} {'dtype':<5} {'M':>5} {'dip ms':>9} {'unfused':>9} {'mm':>9} {'x unf':>6} "
           f"{'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'%gemm':>6}")
    print(hdr)
    print("-" * len(hdr))
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        try:
            report.setdefault("max_abs_err", {})[dname] = correctness(ops, dtype)
        except Exception as e:  # noqa: BLE001  (record and go on: one run, no chance to debug)
            report["errors"].append({"dtype": dname, "op": "correctness", "error": repr(e),
                                     "trace": traceback.format_exc()})
        for M in (int(t) for t in args.tokens.split(",")):
            try:
                cases = list(bench_cases(ops, M, dtype, args.d, args.ffn, args.keep))
            except Exception as e:  # noqa: BLE001
                report["errors"].append({"dtype": dname, "tokens": M, "op": "setup", "error": repr(e)})
                continue
            for name, fns, nbytes, flops in cases:
                row = {"op": name, "dtype": dname, "tokens": M, "min_bytes": nbytes, "flops": flops}
                try:
                    for variant, fn in fns.items():
                        row[f"{variant}_ms"] = timer(fn)
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)
                    report["errors"].append({"dtype": dname, "tokens": M, "op": name, "error": repr(e),
                                             "trace": traceback.format_exc()})
                ms = row.get("dip_ms")
                if ms:
                    row["GBps"] = nbytes / ms / 1e6
                    row["frac_copy"] = row["GBps"] / ceil["copy_GBps"]
                    if flops:
                        row["TFLOPs"] = flops / ms / 1e9
                        row["frac_gemm"] = row["TFLOPs"] / ceil["gemm_bf16_TFLOPs"]
                    if row.get("unfused_ms"):
                        row["speedup_vs_unfused"] = row["unfused_ms"] / ms
                    if row.get("mm_ms"):
                        row["ratio_vs_mm"] = ms / row["mm_ms"]
                report["results"].append(row)

                def f(key, fmt):
                    v = row.get(key)
                    return format(v, fmt) if v is not None else "-"

                print(f"{name:<19} {dname:<5} {M:>5} {f('dip_ms', '9.4f')} {f('unfused_ms', '9.4f')} "
                      f"{f('mm_ms', '9.4f')} {f('speedup_vs_unfused', '6.2f')} {f('GBps', '7.0f')} "
                      f"{f('frac_copy', '6.1%')} {f('TFLOPs', '8.1f')} {f('frac_gemm', '6.1%')}"
                      + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)
            del cases
            torch.cuda.empty_cache()
    report["wall_s"] = time.time() - t0
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"# wrote {args.out} ({len(report['results'])} rows, {len(report['errors'])} errors, "
          f"{report['wall_s']:.0f} s)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
