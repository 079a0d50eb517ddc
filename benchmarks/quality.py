"""Quality and cost of the selection methods on the default model: a grid of ratios x methods, run through the
pipeline's own stages (``dip_ext.Pruner``).

Held-out wiki perplexity, PTB test perplexity and Shakespeare perplexity (the evaluation-only ``shakespeare``
text: off-domain, never calibrated on) of dense, dependent, oneshot and hypernetwork at several ratios of
decoder-linear parameters removed, plus the one-shot wall time after load. One calibration pass serves every
ratio and method that hold out the same validation windows (``Pruner(..., calibration=...)``; two passes in
all: runs without held-out windows -- one-shot and dependent without the refit -- calibrate on other windows,
as ``prune_and_compact`` does); each (method, ratio) keeps its checkpoints in
``--work/<method>-<ratio>`` and resumes from them, so an interrupted grid continues where it stopped and a longer
``--steps`` extends the hypernetwork runs. ``--refit`` adds a row per method with ``--refit auto`` on
the same masks. ``--recover distill`` (or ``reconstruct``, ``auto``; the pipeline's recovery options, e.g.
``--recover-steps``) adds a row per cell: the same compacted model after the Pruner's recovery stage, with the
tokens and seconds it used. ``--kv-variants off heads 0.3 0.5`` adds KV-group pruning to the one-shot cells: ``heads``
lets whole KV groups compete for the parameter budget (``--prune-heads``), a number is a KV-cache target
(``--kv-ratio``: at least that fraction of the KV-cache bytes per token removed); every row records the KV-cache bytes
per token it keeps.

    python benchmarks/quality.py                                   # the RESULTS.md table
    python benchmarks/quality.py --ratios 0.2 --steps 50 --eval-windows 4    # quick look
    python benchmarks/quality.py --ratios 0.1 0.2 --methods oneshot --recover distill --recover-steps 40
    python benchmarks/quality.py --ratios 0.3 0.5 --methods oneshot --kv-variants off heads 0.3 0.5
    python benchmarks/quality.py --table results/quality-*.json      # one table from several runs' files

Every option of the pipeline (``--calibration-windows``, ``--seq-len``, ``--val-windows``, the hypernetwork's
``--steps``, ``--lr`` ...) is the CLI's own flag, generated from the same option dataclasses.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dip_ext import EvalConfig, HypernetworkConfig, PruneConfig, Pruner, RefitConfig, zoo
from dip_ext.options import OptionParser, as_dict, from_namespace
from dip_ext.recovery import RecoveryConfig

TEXTS = ["wiki", "ptb", "shakespeare"]
ORDER = {"dependent": 0, "oneshot": 1, "hypernetwork": 2}


def parse_args(argv=None):
    p = OptionParser([PruneConfig, HypernetworkConfig, RecoveryConfig], prog="quality.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the grid")
    g.add_argument("--model", default=None, help="a zoo name (smollm2-135m, gemma3-270m) or a model folder "
                   "(default: the embedded SmolLM2-135M)")
    g.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    g.add_argument("--methods", nargs="+", default=["dependent", "oneshot", "hypernetwork"])
    g.add_argument("--hyper-ratios", type=float, nargs="*", default=None,
                   help="ratios that also get a hypernetwork run (default: all --ratios)")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                   help="also score every method's masks after --refit auto (rows 'METHOD+refit')")
    g.add_argument("--kv-variants", nargs="+", default=["off"],
                   help="one-shot cells with KV groups: off, heads (--prune-heads) or a --kv-ratio value")
    g.add_argument("--eval-windows", type=int, default=32, help="perplexity windows per text")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--work", default="benchmarks/results/quality-work")
    g.add_argument("--out", default="benchmarks/results/quality.json")
    p.set_defaults(recover="off")  # the grid scores masks; --recover distill adds the recovered rows
    args = p.parse_args(argv)
    return (args, from_namespace(PruneConfig, args), from_namespace(HypernetworkConfig, args),
            from_namespace(RecoveryConfig, args))


def kv_options(variant: str) -> dict:
    """PruneConfig fields of a ``--kv-variants`` entry: off, heads, or a KV-cache target."""
    if variant == "off":
        return {"prune_heads": False}
    if variant == "heads":
        return {"prune_heads": True}
    return {"kv_ratio": float(variant)}


def make_pruner(dense, tokenizer, base: PruneConfig, hyper: HypernetworkConfig, recovery: RecoveryConfig, args,
                calibrations: dict, *, ratio: float, method: str, refit: str, kv: str = "off") -> Pruner:
    """A Pruner of one grid cell, reusing the calibration pass of an earlier cell with the same windows."""
    config = dataclasses.replace(base, ratio=ratio, method=method, **kv_options(kv))

    def pruner(calibration=None) -> Pruner:
        return Pruner(copy.deepcopy(dense), tokenizer, config,
                      method_options=hyper if method == "hypernetwork" else None, refit=RefitConfig(refit=refit),
                      recovery=recovery,
                      evaluation=EvalConfig(eval_text=TEXTS, eval_windows=args.eval_windows, speed=False),
                      work_dir=Path(args.work) / (f"{method}-{ratio}-refit-{refit}"
                                                  + ("" if kv == "off" else f"-kv-{kv}")),
                      resume=True, progress=False,
                      calibration=calibration)

    first = pruner()
    key = first.windows().val is not None  # the calibration pass's windows depend on the held-out ones
    if key not in calibrations:
        calibrations[key] = first.calibrate()
        return first
    return pruner(calibrations[key])


def run_one(pruner: Pruner) -> list[dict]:
    """One grid cell through the pipeline's stages: its row of the table, and with recovery a second row (the
    same model after :meth:`Pruner.recover`)."""
    selection, compaction, after = pruner.select(), pruner.compact(), pruner.evaluate()
    params, config = compaction.params_after, pruner.config
    kv = ("+heads" if config.prune_heads and config.kv_ratio is None else
          f"+kv{config.kv_ratio:g}" if config.kv_ratio is not None else "")
    described = pruner.budget.describe(selection.masks.widths(), itemsize=2)
    row = {"ratio": config.ratio, "method": config.method + kv + ("+refit" if pruner.refit() is not None else ""),
           "select_s": selection.seconds, "removed_decoder_linear": params.removed_decoder_linear,
           "removed_total": params.removed_total, "ppl": after.perplexity, "seconds": dict(pruner.seconds),
           "kv_cache_bytes_per_token_bf16": described["kv_cache_bytes_per_token_kept"],
           "dense_kv_cache_bytes_per_token_bf16": described["kv_cache_bytes_per_token_dense"],
           "kv_groups_kept": [w.get("kv_groups") for w in selection.masks.widths()]}
    if selection.training is not None:
        t = selection.training
        row.update(hyper_steps=t.steps, best_step=t.best_step, val_history=t.val_history,
                   train_windows=int(pruner.windows().train.shape[0]), settings=as_dict(pruner.method_options))
    if pruner.refit() is not None:
        row["refit"] = pruner.refit().to_dict()
    rows = [row]
    recovery = pruner.recover()
    if recovery is not None:
        recovered = pruner.evaluate()  # "recovered", or the pruned weights again when recovery kept them
        rows.append({**{k: row[k] for k in ("ratio", "select_s", "removed_decoder_linear", "removed_total",
                                            "kv_cache_bytes_per_token_bf16", "dense_kv_cache_bytes_per_token_bf16")},
                     "method": f"{row['method']}+recover", "ppl": recovered.perplexity,
                     "seconds": dict(pruner.seconds), "recovery": recovery.to_dict()})
    return rows


def main(argv=None) -> None:
    args, base, hyper, recovery = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    hyper_ratios = args.ratios if args.hyper_ratios is None else args.hyper_ratios

    t0 = time.perf_counter()
    dense, tokenizer = zoo.resolve_model(args.model)
    load_s = time.perf_counter() - t0
    dense_eval = Pruner(dense, tokenizer, dataclasses.replace(base, method="oneshot"), refit=RefitConfig("off"),
                        evaluation=EvalConfig(eval_text=TEXTS, eval_windows=args.eval_windows, speed=False),
                        progress=False).evaluate()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "threads": args.threads, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "load_s": load_s, "dense": dense_eval.perplexity, "runs": []}
    print(f"dense: {results['dense']}", flush=True)
    calibrations: dict = {}
    for ratio in args.ratios:
        for method in args.methods:
            if method == "hypernetwork" and ratio not in hyper_ratios:
                continue
            cells = [(refit, "off") for refit in (("off", "auto") if args.refit else ("off",))]
            cells += [("off", kv) for kv in args.kv_variants if kv != "off" and method == "oneshot"]
            if "off" not in args.kv_variants and method == "oneshot":
                cells = [c for c in cells if c[1] != "off"]
            for refit, kv in cells:
                pruner = make_pruner(dense, tokenizer, base, hyper, recovery, args, calibrations, ratio=ratio,
                                     method=method, refit=refit, kv=kv)
                rows = run_one(pruner)
                if "calibration pass" in pruner.seconds:  # this cell ran the pass the later ones reuse
                    results.setdefault("calibration_s", []).append(pruner.seconds["calibration pass"])
                if method == "oneshot" and refit == "off" and kv == "off":
                    rows[0]["oneshot_wall_after_load_s"] = (pruner.seconds.get("calibration pass", 0.0)
                                                            + rows[0]["select_s"])
                for row in rows:
                    results["runs"].append(row)
                    ppl = " ".join(f"{t} {row['ppl'][t]:.2f}" for t in TEXTS)
                    print(f"{row['method']:>26} {100 * ratio:4.0f} %: removed {100 * row['removed_decoder_linear']:.2f}"
                          f" % decoder-linear, ppl {ppl} (selection {row['select_s']:.1f} s)", flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    print(table([results]))
    print(f"\nwrote {args.out}")


def _cell(ppl: dict, text: str, dense: float) -> str:
    return f"{ppl[text]:.2f} (×{ppl[text] / dense:.2f})" if text in ppl else "–"


def table(all_results: list) -> str:
    """One Markdown table of the runs of several result files (sorted by ratio, then method): a column per text
    of the first file's dense row (files from before the shakespeare text have none for it: "–")."""
    dense = all_results[0]["dense"]
    texts = [t for t in TEXTS if t in dense]
    runs = sorted((r for res in all_results for r in res["runs"]),
                  key=lambda r: (r["ratio"], ORDER[r["method"].split("+")[0]], r["method"]))
    kv = any("kv_cache_bytes_per_token_bf16" in r for r in runs)
    dense_kv = next((r["dense_kv_cache_bytes_per_token_bf16"] for r in runs
                     if "dense_kv_cache_bytes_per_token_bf16" in r), None)
    lines = ["| ratio | method | " + " | ".join(f"{t} ppl (×dense)" for t in texts)
             + (" | KV B/token (bf16)" if kv else "") + " |", "|---:|---|" + "---:|" * (len(texts) + kv),
             "| 0 | dense | " + " | ".join(f"{dense[t]:.2f}" for t in texts)
             + (f" | {dense_kv:,}" if kv else "") + " |"]
    for r in runs:
        name = r["method"]
        if name.startswith("hypernetwork"):
            settings = r.get("settings", {"lr": 1e-3, "distill": False})  # files before the settings were kept
            loss = "KL to dense" if settings["distill"] else "LM loss"
            schedule = {"cosine": " cosine", "cosine-tail": f" cosine over the last {settings.get('decay_steps')}"
                        }.get(settings.get("lr_schedule"), "")
            name += f" ({r['hyper_steps']} steps, best {r.get('best_step')}, lr {settings['lr']:g}{schedule}, {loss})"
        if "recovery" in r:
            rec = r["recovery"]
            kept = "+".join(rec["chosen"]) or "nothing beat the pruned weights"
            name += (f" ({rec['mode']}: kept {kept}, {rec['tokens']} tokens, "
                     f"{sum(rec['seconds'].values()):.0f} s)")
        kv_cell = ""
        if kv:
            kept, full = r.get("kv_cache_bytes_per_token_bf16"), r.get("dense_kv_cache_bytes_per_token_bf16")
            kv_cell = f" | {kept:,} (−{100 * (1 - kept / full):.0f} %)" if kept is not None else " | –"
        lines.append(f"| {100 * r['ratio']:.0f} % | {name} | "
                     + " | ".join(_cell(r["ppl"], t, dense[t]) for t in texts) + kv_cell + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # python benchmarks/quality.py --table results/a.json results/b.json
        print(table([json.loads(Path(f).read_text()) for f in sys.argv[2:]]))
    else:
        main()
