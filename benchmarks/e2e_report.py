"""The end-to-end benchmark's targets and tables, from its JSON data (see e2e.py for what is measured)."""

from __future__ import annotations

# Targets: "within X %" means time(compacted) <= (1 + X) * time(same-widths).
CPU_FLOOR_SLACK, CUDA_FLOOR_SLACK = 0.05, 0.03
CPU_FLOP_FRACTION = 0.9
CUDA_PREFILL_SPEEDUP, CUDA_DECODE_SPEEDUP = 1.8, 1.7


def _rows(data: dict, table: str, **match) -> list[dict]:
    return [r for r in data[table] if all(r.get(k) == v for k, v in match.items())]


def targets(data: dict, a, cuda: bool) -> list[dict]:
    """The PASS / MISS rows of e2e.py's targets from the measured rows of ``data`` (``a``: the parsed arguments:
    ``ratios``, ``target_seq``, ``quick``)."""
    out = []
    slack = CUDA_FLOOR_SLACK if cuda else CPU_FLOOR_SLACK
    seq = a.target_seq
    for r in a.ratios:
        dense = _rows(data, "prefill", seq_len=seq, key="dense")
        comp = _rows(data, "prefill", seq_len=seq, key=f"compacted@{r:g}")
        floor = _rows(data, "prefill", seq_len=seq, key=f"same-widths@{r:g}")
        if not (dense and comp and floor):
            continue
        dense, comp, floor = dense[0], comp[0], floor[0]
        rel = comp["median_s"] / floor["median_s"]
        out.append({"name": f"prefill {seq}, {100 * r:g} %: compacted time / same-widths time",
                    "value": rel, "threshold": f"<= {1 + slack:.2f}", "pass": rel <= 1 + slack})
        speed = comp["tokens_per_s"] / dense["tokens_per_s"]
        if cuda:
            if abs(r - 0.5) < 1e-9:
                out.append({"name": f"prefill {seq}, 50 %: speedup over dense", "value": speed,
                            "threshold": f">= {CUDA_PREFILL_SPEEDUP}", "pass": speed >= CUDA_PREFILL_SPEEDUP})
        else:
            need = CPU_FLOP_FRACTION * comp["linear_flop_ratio"]
            out.append({"name": f"prefill {seq}, {100 * r:g} %: speedup over dense vs {CPU_FLOP_FRACTION} x "
                                f"linear FLOP ratio {comp['linear_flop_ratio']:.3f}",
                        "value": speed, "threshold": f">= {need:.3f}", "pass": speed >= need})
    if cuda:
        for row in _rows(data, "decode", key="compacted@0.5"):
            dense = _rows(data, "decode", key="dense", batch=row["batch"])
            if dense:
                speed = row["tokens_per_s"] / dense[0]["tokens_per_s"]
                graphs = row["cuda_graph"] and dense[0]["cuda_graph"]
                out.append({"name": f"decode b={row['batch']}, 50 %: speedup over dense"
                                    f"{' (CUDA graphs)' if graphs else ' (EAGER: capture failed)'}",
                            "value": speed, "threshold": f">= {CUDA_DECODE_SPEEDUP}",
                            "pass": speed >= CUDA_DECODE_SPEEDUP and graphs})
    if a.quick:
        for t in out:
            t["note"] = "quick mode: tiny shapes, not meaningful"
    return out

def table(data: dict) -> str:
    """The human-readable tables of ``data`` (prefill, decode, targets)."""
    lines = []
    pf = data["prefill"]
    for seq in sorted({r["seq_len"] for r in pf}):
        rows = [r for r in pf if r["seq_len"] == seq]
        dense = next((r for r in rows if r["key"] == "dense"), None)
        lines.append(f"\nprefill, batch 1, {seq} tokens")
        lines.append(f"{'variant':<20}{'tok/s':>12}{'ms':>10}{'vs dense':>10}{'vs floor':>10}{'FLOP ratio':>12}"
                     f"{'act MB':>9}")
        for r in rows:
            floor = next((f for f in rows if f["key"] == f"same-widths@{r['ratio']:g}"), None)
            vs_floor = (f"{floor['median_s'] / r['median_s']:.3f}" if floor and r["variant"] == "compacted"
                        else "")
            peak = f"{r['peak_activation_bytes'] / 2**20:.0f}" if r["peak_activation_bytes"] is not None else "-"
            lines.append(f"{r['key']:<20}{r['tokens_per_s']:>12.1f}{1e3 * r['median_s']:>10.2f}"
                         f"{r['tokens_per_s'] / dense['tokens_per_s'] if dense else float('nan'):>10.3f}"
                         f"{vs_floor:>10}{r['linear_flop_ratio']:>12.3f}{peak:>9}")
    dc = data["decode"]
    if dc:
        batches = sorted({r["batch"] for r in dc})
        r0 = dc[0]
        lines.append(f"\ndecode tokens/s (greedy, StaticCache, prompt {r0['prompt_len']}, {r0['steps']} steps "
                     f"timed per repeat; G = CUDA graph)")
        lines.append(f"{'variant':<20}" + "".join(f"{f'b={b}':>12}{'xdense':>8}" for b in batches)
                     + f"{'FLOP ratio':>12}{'weights MB':>12}")
        for key in dict.fromkeys(r["key"] for r in dc):
            cells = ""
            for b in batches:
                r = next((x for x in dc if x["key"] == key and x["batch"] == b), None)
                d = next((x for x in dc if x["key"] == "dense" and x["batch"] == b), None)
                if r is None:
                    cells += f"{'-':>12}{'':>8}"
                    continue
                g = "G" if r["cuda_graph"] else " "
                cells += f"{r['tokens_per_s']:>11.1f}{g}{r['tokens_per_s'] / d['tokens_per_s'] if d else 0:>8.3f}"
            any_r = next(x for x in dc if x["key"] == key)
            mb = data["models"][key]["param_bytes"] / 2**20
            lines.append(f"{key:<20}{cells}{any_r['linear_flop_ratio']:>12.3f}{mb:>12.0f}")
    if data["targets"]:
        lines.append("\ntargets")
        for t in data["targets"]:
            lines.append(f"  {'PASS' if t['pass'] else 'MISS'}  {t['name']}: {t['value']:.3f} "
                         f"(needs {t['threshold']}){'  [' + t['note'] + ']' if t.get('note') else ''}")
    return "\n".join(lines)
