"""End-to-end speed: dense vs DISP-compacted vs "same-widths dense", prefill and decode, CPU and CUDA.

Three variants run side by side in one process (measurements interleaved round-robin, medians reported):

- ``dense``:       the unpruned Hugging Face model.
- ``compacted``:   ``dip_ext.compact(dense, masks)``: every block reads its kept inputs through the fused
                   norm+gather kernel and scatter-adds its output into the full-width residual.
- ``same-widths``: the floor (``dip_ext.benchmarking.same_widths``). The SAME compacted model object (same
                   weights, same per-block GEMM shapes) run with a patched decoder-layer forward that replaces
                   every index set by the prefix range ``[0, k)``:
                   ``h = F.rms_norm(x)[..., :k]`` (a narrow VIEW of the norm output, no gather kernel: the GEMM reads
                   it with a leading dimension of d) and ``x[..., :k].add_(y)`` (an in-place add on a narrow view,
                   no scatter, no copy of the layer input). It does exactly the GEMMs of the compacted model and no
                   index data movement: what a dense model with these per-block widths would cost. Its outputs are
                   meaningless (wrong columns); only its speed is used.

Workloads:

- prefill: ``model(input_ids [1, S], use_cache=False, logits_to_keep=1)`` (the prompt pass of generation: the
  vocabulary projection runs for the last position only), S in ``--prefill-lens``; tokens/s = S / median wall time
  (CUDA synchronised around each forward, so CPU launch overhead counts where the GPU would wait for it).
- decode: greedy steps with a ``transformers.StaticCache`` at batch 1 / 8 / 16 after a random prompt. One step is
  ``model(ids [b, 1], attention_mask=4-D additive mask [b, 1, 1, L], position_ids, cache)``, then the argmax is
  written back into the static ``ids`` and the position / mask advance, ALL as tensor ops on the device
  (``dip_ext.decoding.DecodeSession``), so on CUDA
  one step is captured once into a ``torch.cuda.CUDAGraph`` and replayed (warmed up first, so every per-device
  index copy of dip_ext and the cache tensors exist before capture). Passing the 4-D mask skips transformers' mask
  construction, whose host-side checks (``.all()``) would synchronise. On CPU the same step runs eagerly.
  tokens/s = b * steps / wall time. If capture fails the error is recorded and the eager step is timed instead.
  A graph check compares the tokens of graph replays with those of eager steps (batch 1).

Masks: random kept subsets (speed does not depend on WHICH dims are kept) with realistic per-layer widths
(``dip_ext.benchmarking.random_budget_widths``): each layer's five widths start at a common keep fraction times a
log-normal jitter (sigma ``--spread``, 0.25: learned DISP masks vary by layer and structure), the fraction is
bisected to meet the budget, and the project's one budget fitter rounds them to ``--multiple-of`` (64 on CUDA), so
the decoder-linear parameters removed meet the ratio as a selection method's masks do (the achieved fraction is
reported).

FLOPs: the "linear FLOP ratio" is dense / compacted of 2 * (decoder-linear weights) per token plus the vocabulary
projection for the rows computed (one per sequence in prefill, every token in decode). Attention scores, norms and
embeddings are not counted (DISP leaves them alone), so the ideal speedup is a little below this ratio.

Memory: parameter bytes per variant; on CUDA the peak of ``torch.cuda.max_memory_allocated`` above the resident
models during one prefill (activations) and the static KV cache bytes of decode. On CPU peak memory is not measured
(the allocator does not return memory to the OS, so RSS deltas of interleaved models would be noise).

Configurations: CPU (default): SmolLM2-135M fp32 (``dip_ext.zoo.load_default``), prefill 64 and 256 tokens.
CUDA: bf16, Llama-2-7B shapes (d 4096, ffn 11008, 32 layers, 32 heads, vocab 32000) with random weights built on the
device, prefill 2048 (then 512 and 8192 while the ``--time-budget`` lasts), decode with CUDA graphs.
``--quick``: a tiny random Llama (used by the tests to run every code path on CPU in seconds).
Before anything else a self-check runs a tiny fp32 model compacted with a pruned attention and a pruned MLP: the
benchmark's decode step (graph-replayed on CUDA) must produce the masked dense reference's greedy tokens.

    python benchmarks/e2e.py --device cpu --out benchmarks/results/e2e_cpu.json
    python benchmarks/e2e.py --device cuda --out OUT/e2e.json            # (benchmarks/gpu/check.sh)
    python benchmarks/e2e.py --device cpu --quick --out /tmp/e2e.json

The table goes to stdout, the JSON (rewritten after every measurement, so a killed run keeps what it measured) to
``--out``. The targets (thresholds in e2e_report.py) are printed as PASS / MISS.

The script is split in three: this file (arguments, the run's order, the JSON's meta data), e2e_measure.py (the
measurements) and e2e_report.py (targets and tables).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

# torch, transformers, dip_ext and the measurement module are imported once the arguments are checked, so that a
# bad argument is refused at once, not after seconds of imports.

#: --dtype -> the torch dtype's name
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16"}

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=16384, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)


def parse_args(argv=None):
    """The parsed arguments with every default resolved for the device (see --help); argparse exits with code 2
    and a message on a bad argument."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--model", choices=("smollm2", "llama2-7b", "tiny"), default=None,
                   help="default: llama2-7b (random weights) on cuda, smollm2 on cpu, tiny with --quick")
    p.add_argument("--ratios", default="0.3,0.5", help="fractions of decoder-linear parameters removed")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (exercises every code path)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--prefill-lens", default=None, help="comma list; first one is the target length "
                   "(default: cuda 2048,512,8192; cpu 256,64)")
    p.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,16)")
    p.add_argument("--prompt-len", type=int, default=None, help="decode prompt length (default cuda 128, cpu 64)")
    p.add_argument("--decode-steps", type=int, default=None, help="decode steps per timed repeat")
    p.add_argument("--repeats", type=int, default=None, help="timed prefill forwards per variant")
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--multiple-of", type=int, default=None, help="width alignment (default cuda 64, cpu 8)")
    p.add_argument("--spread", type=float, default=0.25, help="log-normal sigma of per-layer width jitter")
    p.add_argument("--kv-ratio", type=float, default=None, help="also run kv-groups@RATIO: the same parameter "
                   "budget with at least this fraction of the KV-cache bytes removed by dropping whole KV groups")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; optional measurements are skipped past it (default cuda 170, cpu none)")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: time eager decode steps instead of graphs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch intra-op threads (default: torch's; 1 is steadier on a shared, loaded machine)")
    p.add_argument("--no-selfcheck", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    try:
        a.ratios = [float(r) for r in a.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios must be a comma list of numbers, got {a.ratios!r}")
    if not a.ratios or any(not 0 < r < 1 for r in a.ratios):
        p.error("--ratios must be numbers in (0, 1)")
    if a.kv_ratio is not None and not 0 < a.kv_ratio < 1:
        p.error("--kv-ratio must be in (0, 1)")

    def ints(s, name):
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            p.error(f"--{name} must be a comma list of integers, got {s!r}")
        if not v or any(x < 1 for x in v):
            p.error(f"--{name} must be positive integers")
        return v

    for name in ("prefill_lens", "batches"):
        if getattr(a, name) is not None:
            setattr(a, name, ints(getattr(a, name), name.replace("_", "-")))
    for name in ("prompt_len", "decode_steps", "repeats", "decode_repeats", "multiple_of"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    import torch

    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    a.dtype = getattr(torch, DTYPES[a.dtype]) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    a.model = a.model or ("tiny" if a.quick else ("llama2-7b" if cuda else "smollm2"))
    if a.quick:
        defaults = dict(prefill_lens=[32, 16], batches=[1, 2], prompt_len=8, decode_steps=4, repeats=2,
                        multiple_of=8, time_budget=0)
        a.decode_repeats = min(a.decode_repeats, 2)
    elif cuda:
        defaults = dict(prefill_lens=[2048, 512, 8192], batches=[1, 8, 16], prompt_len=128, decode_steps=32,
                        repeats=7, multiple_of=64, time_budget=170)
    else:
        defaults = dict(prefill_lens=[256, 64], batches=[1, 8, 16], prompt_len=64, decode_steps=8, repeats=5,
                        multiple_of=8, time_budget=0)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.target_seq = a.prefill_lens[0]
    return a


def load_model(a, device):
    """``(dense model, its description)`` for ``a.model`` on ``device`` in ``a.dtype``."""
    from dip_ext.benchmarking import random_llama

    from e2e_measure import TINY

    if a.model == "smollm2":
        from dip_ext import zoo

        model, _ = zoo.load_default(dtype=a.dtype, device=device)
        model.config._attn_implementation = "sdpa"
        return model.eval(), "SmolLM2-135M-Instruct (zoo.load_default)"
    shape = LLAMA2_7B if a.model == "llama2-7b" else TINY
    name = "Llama-2-7B shapes, random weights" if a.model == "llama2-7b" else "tiny random Llama"
    return random_llama(shape, a.dtype, device, a.seed), name


def main(argv=None) -> int:
    """Runs the benchmark; 0, or 1 when a measurement failed or the self-check did not pass."""
    a = parse_args(argv)
    import dip_ext
    import torch
    import transformers

    # Its sibling modules, also when Python was told not to put the script's folder on sys.path
    # (PYTHONSAFEPATH=1, as the GPU check runs it so that the source checkout never shadows the installed package).
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import e2e_report
    from e2e_measure import Bench, build_variants, param_bytes

    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    if a.threads is not None:
        if a.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bench = Bench(a, device, a.out)
    meta = bench.data["meta"]
    meta.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else f"main({argv})",
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), "torch": torch.__version__,
        "transformers": transformers.__version__, "dip_ext": dip_ext.build_info(), "python": platform.python_version(),
        "threads": torch.get_num_threads(), "dtype": str(a.dtype).replace("torch.", ""), "quick": a.quick,
        "ratios": a.ratios, "prefill_lens": a.prefill_lens, "batches": a.batches, "prompt_len": a.prompt_len,
        "decode_steps": a.decode_steps, "repeats": a.repeats, "decode_repeats": a.decode_repeats,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None})
    bench.log(f"e2e on {meta['device_name']} ({device}), torch {torch.__version__}, "
              f"transformers {transformers.__version__}, {meta['dtype']}")

    if not a.no_selfcheck:
        try:
            bench.selfcheck()
        except Exception as e:  # noqa: BLE001
            bench.error("selfcheck", e)

    try:
        dense, name = load_model(a, device)
        meta["model"] = name
        meta["config"] = {k: getattr(dense.config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")}
        bench.log(f"model: {name}, {sum(p.numel() for p in dense.parameters()) / 1e6:.1f} M parameters")
        variants, bench.data["masks"] = build_variants(dense, a.ratios, a.multiple_of, a.spread, a.seed, bench.log,
                                                       kv_ratio=a.kv_ratio)
    except Exception as e:  # noqa: BLE001
        bench.error("building models", e)
        print(e2e_report.table(bench.data))
        return 1
    for v in variants:
        bench.data["models"][v.key] = {"param_bytes": param_bytes(v.model),
                                       "decoder_linear": dip_ext.param_report(v.model).decoder_linear}
    bench.save()

    # Work in priority order: the target prefill length, then decode, then the other prefill lengths.
    work = [("prefill", a.prefill_lens[0])] + [("decode", b) for b in a.batches]
    if device.type == "cuda" and not a.no_graphs:
        work.append(("graph_check", None))
    work += [("prefill", s) for s in a.prefill_lens[1:]]
    for kind, arg in work:
        if bench.time_left() <= 0:
            bench.data["skipped"].append({"what": f"{kind} {arg}", "why": "time budget spent"})
            bench.log(f"skipped {kind} {arg}: time budget spent")
            continue
        try:
            if kind == "prefill":
                reps = a.repeats if arg <= 4096 else max(2, a.repeats // 2)
                bench.prefill(variants, arg, reps)
            elif kind == "decode":
                bench.decode(variants, arg)
            else:
                comp = [v for v in variants if v.kind == "compacted"]
                for v in [variants[0]] + comp[-1:]:
                    bench.graph_check(v)
        except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
            bench.error(f"{kind} {arg}", e)

    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    bench.save()
    print(e2e_report.table(bench.data), flush=True)
    failed = bench.data["errors"] or (bench.data["selfcheck"] is not None and not bench.data["selfcheck"]["ok"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
