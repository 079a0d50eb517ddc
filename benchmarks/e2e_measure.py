"""The end-to-end benchmark's measurements (see e2e.py for what is measured and how): the three variants of a
model, prefill and decode timings, the CUDA-graph check and the decode self-check, all recorded in ``Bench.data``
(rewritten to the JSON file after every measurement)."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import dip_ext
from dip_ext.files import atomic_write_text
from dip_ext.families import adapter_for
from dip_ext.benchmarking import random_budget_widths, random_llama, random_masks, same_widths
from dip_ext.params import kv_cache_bytes
from dip_ext.decoding import DecodeSession, HostSyncDetector, capture_step, forward_kwargs

import e2e_report

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


@dataclass
class Variant:
    """One model as the benchmark runs it; ``ctx()`` is open around every forward of it."""

    kind: str    # "dense" | "compacted" | "same-widths"
    ratio: float  # fraction of decoder-linear parameters removed (0 for dense)
    model: torch.nn.Module

    @property
    def key(self) -> str:
        return "dense" if self.kind == "dense" else f"{self.kind}@{self.ratio:g}"

    def ctx(self):
        return same_widths(self.model) if self.kind == "same-widths" else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def param_bytes(model) -> int:
    """Bytes of the parameters and buffers (shared storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class Runner:
    """One decode step of a session: a CUDA-graph replay when captured, else the eager step under the variant ctx."""

    def __init__(self, variant: Variant, session: DecodeSession, graphs: bool, warmup: int = 2):
        self.variant, self.session, self.graph, self.error = variant, session, None, None
        if graphs:
            try:
                with variant.ctx():
                    self.graph = capture_step(session, warmup)
            except Exception as e:  # noqa: BLE001 - recorded, then timed eagerly
                self.error = f"{type(e).__name__}: {e}"[:500]
                self.graph = None

    def __call__(self, n: int) -> None:
        if self.graph is not None:
            for _ in range(n):
                self.graph.replay()
            self.session.steps_done += n
        else:
            with self.variant.ctx():
                for _ in range(n):
                    self.session.step()


def build_variants(dense, ratios, multiple_of, spread, seed, log, kv_ratio=None) -> tuple[list[Variant], dict]:
    """``[dense, compacted@r, same-widths@r for r in ratios]`` (random masks at each ratio) and the masks' summary;
    with ``kv_ratio`` also ``kv-groups@r``: the same parameter budget met with at least ``kv_ratio`` of the KV-cache
    bytes removed by dropping whole KV groups."""
    variants, masks_info = [Variant("dense", 0.0, dense)], {}
    for r, kv in [(r, None) for r in ratios] + ([(r, kv_ratio) for r in ratios] if kv_ratio else []):
        widths = random_budget_widths(dense, r, multiple_of, spread, seed, kv_ratio=kv)
        masks = random_masks(widths, adapter_for(dense).dims(dense.config), seed)
        t0 = time.perf_counter()
        model = dip_ext.compact(copy.deepcopy(dense), masks).eval()
        # .to() on the same device still visits every module: the index sets make their device copies now, before
        # any CUDA-graph capture (the warm-up steps would also make them)
        model.to(next(dense.parameters()).device)
        rep = dip_ext.param_report(model)
        itemsize = next(dense.parameters()).element_size()
        kv_bytes = kv_cache_bytes(model.config, masks.widths(), itemsize)
        masks_info[f"{r:g}" if kv is None else f"kv-groups@{r:g}"] = {
            "kv_ratio": kv, "kv_cache_bytes_per_token": kv_bytes,
            "dense_kv_cache_bytes_per_token": kv_cache_bytes(model.config, None, itemsize),
            "ratio_requested": r, "removed_decoder_linear": rep.removed_decoder_linear,
            "removed_total": rep.removed_total, "decoder_linear": rep.decoder_linear,
            "dense_decoder_linear": rep.dense_decoder_linear, "multiple_of": multiple_of, "spread": spread,
            "widths": widths, "method": "random subsets; per-layer widths jittered log-normally, fitted to the budget"}
        log(f"compacted {100 * r:.0f} %{'' if kv is None else f' with KV groups ({100 * kv:g} % of the KV cache)'}: "
            f"removed {100 * rep.removed_decoder_linear:.2f} % of decoder-linear parameters "
            f"({100 * rep.removed_total:.2f} % of all), KV cache {kv_bytes:,} bytes per token, in "
            f"{time.perf_counter() - t0:.1f} s")
        variants += ([Variant("compacted", r, model), Variant("same-widths", r, model)] if kv is None
                     else [Variant("kv-groups", r, model)])
    return variants, masks_info


class Bench:
    """The measurements of one run, in ``data``; ``save()`` rewrites ``out`` (JSON) after each one."""

    def __init__(self, args, device: torch.device, out: Optional[str]):
        self.args, self.device, self.out = args, device, out
        self.t0 = time.perf_counter()
        self.data: dict = {"meta": {}, "selfcheck": None, "masks": {}, "models": {}, "prefill": [], "decode": [],
                           "graph_checks": [], "targets": [], "skipped": [], "errors": []}

    # -- bookkeeping
    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def time_left(self) -> float:
        b = self.args.time_budget
        return math.inf if not b else b - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.data["targets"] = e2e_report.targets(self.data, self.args, self.device.type == "cuda")
        self.data["meta"]["elapsed_s"] = time.perf_counter() - self.t0
        if not self.out:
            return
        atomic_write_text(self.out, json.dumps(self.data, indent=1, default=str))

    def error(self, where: str, e: BaseException) -> None:
        self.log(f"ERROR in {where}: {type(e).__name__}: {e}")
        self.data["errors"].append({"where": where, "error": f"{type(e).__name__}: {e}"[:2000],
                                    "traceback": traceback.format_exc()[-4000:]})
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save()

    # -- measurements
    def timed(self, fn: Callable[[], object]) -> float:
        sync(self.device)
        t = time.perf_counter()
        fn()
        sync(self.device)
        return time.perf_counter() - t

    def flops(self, model, tokens: int, lm_rows: int) -> float:
        c = model.config
        return 2.0 * tokens * dip_ext.param_report(model).decoder_linear + 2.0 * lm_rows * c.hidden_size * c.vocab_size

    @torch.inference_mode()
    def prefill(self, variants: list[Variant], seq_len: int, repeats: int) -> None:
        gen = torch.Generator().manual_seed(self.args.seed)
        ids = torch.randint(0, variants[0].model.config.vocab_size, (1, seq_len), generator=gen).to(self.device)
        rows = {}
        for v in variants:
            kw = forward_kwargs(v.model)
            keep = {"logits_to_keep": 1} if kw["logits_to_keep"] else {}
            fn = (lambda m=v.model, k=keep: m(input_ids=ids, use_cache=False, **k))
            peak = None
            with v.ctx():
                if self.device.type == "cuda":
                    sync(self.device)
                    torch.cuda.reset_peak_memory_stats(self.device)
                    base = torch.cuda.memory_allocated(self.device)
                    fn()
                    sync(self.device)
                    peak = torch.cuda.max_memory_allocated(self.device) - base
                else:
                    fn()  # warm-up
            lm_rows = 1 if keep else seq_len
            rows[v.key] = {"fn": fn, "times": [], "peak": peak,
                           "flops": self.flops(v.model, seq_len, lm_rows)}
        for _ in range(repeats):  # interleaved, so load drift hits every variant alike
            for v in variants:
                with v.ctx():
                    rows[v.key]["times"].append(self.timed(rows[v.key]["fn"]))
        dense_flops = rows["dense"]["flops"]
        for v in variants:
            r = rows[v.key]
            med = statistics.median(r["times"])
            self.data["prefill"].append({
                "seq_len": seq_len, "batch": 1, "variant": v.kind, "ratio": v.ratio, "key": v.key,
                "tokens_per_s": seq_len / med, "median_s": med, "times_s": r["times"],
                "peak_activation_bytes": r["peak"], "linear_flops": r["flops"],
                "linear_flop_ratio": dense_flops / r["flops"]})
        self.log(f"prefill {seq_len}: " + ", ".join(
            f"{row['key']} {row['tokens_per_s']:.0f} tok/s" for row in self.data["prefill"]
            if row["seq_len"] == seq_len))
        self.save()

    @torch.inference_mode()
    def decode(self, variants: list[Variant], batch: int) -> None:
        a = self.args
        needed = a.prompt_len + 4 + a.decode_repeats * a.decode_steps + 8
        max_len = -(-needed // 64) * 64
        graphs = self.device.type == "cuda" and not a.no_graphs
        runners = {}
        try:
            for v in variants:
                session = DecodeSession(v.model, batch, a.prompt_len, max_len, seed=a.seed)
                with v.ctx():
                    session.prefill()
                    if not graphs:
                        session.step()  # eager warm-up
                runners[v.key] = Runner(v, session, graphs)
                if runners[v.key].error:
                    self.log(f"decode b={batch} {v.key}: graph capture failed, timing eager steps: "
                             f"{runners[v.key].error}")
                    # the failed capture may have left the session half-advanced: start it again
                    session = DecodeSession(v.model, batch, a.prompt_len, max_len, seed=a.seed)
                    with v.ctx():
                        session.prefill()
                        session.step()
                    err = runners[v.key].error
                    runners[v.key] = Runner(v, session, graphs=False)
                    runners[v.key].error = err
            times = {k: [] for k in runners}
            for _ in range(a.decode_repeats):
                for v in variants:
                    times[v.key].append(self.timed(lambda r=runners[v.key]: r(a.decode_steps)))
            dense = self.data["models"]["dense"]
            for v in variants:
                r = runners[v.key]
                med = statistics.median(times[v.key])
                if a.prompt_len + r.session.steps_done > max_len:
                    raise RuntimeError("decode ran past its static cache")  # sizing bug: never silently wrap
                flops = self.flops(v.model, 1, 1)
                self.data["decode"].append({
                    "batch": batch, "prompt_len": a.prompt_len, "steps": a.decode_steps, "max_cache_len": max_len,
                    "variant": v.kind, "ratio": v.ratio, "key": v.key, "tokens_per_s": batch * a.decode_steps / med,
                    "median_s": med, "times_s": times[v.key], "cuda_graph": r.graph is not None,
                    "graph_error": r.error, "kv_cache_bytes": r.session.cache_bytes(),
                    "linear_flop_ratio": self.flops(variants[0].model, 1, 1) / flops,
                    "weight_bytes_ratio": dense["param_bytes"] / self.data["models"][v.key]["param_bytes"]})
        finally:
            runners.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.log(f"decode b={batch}: " + ", ".join(
            f"{row['key']} {row['tokens_per_s']:.1f} tok/s{'' if row['cuda_graph'] or not graphs else ' (eager)'}"
            for row in self.data["decode"] if row["batch"] == batch))
        self.save()

    @torch.inference_mode()
    def graph_check(self, v: Variant, steps: int = 6) -> None:
        """Tokens of graph replays == tokens of eager steps from the same prompt (batch 1)."""
        max_len = -(-(self.args.prompt_len + steps + 8) // 64) * 64
        eager = DecodeSession(v.model, 1, self.args.prompt_len, max_len, seed=self.args.seed + 7)
        graphed = DecodeSession(v.model, 1, self.args.prompt_len, max_len, seed=self.args.seed + 7)
        with v.ctx():
            eager.prefill()
            ref = []
            for _ in range(steps):
                eager.step()
                ref.append(eager.ids.clone())
            graphed.prefill()
            got: list = []
            graph = capture_step(graphed, warmup=2, record=got)
        for _ in range(steps - 2):
            graph.replay()
            got.append(graphed.ids.clone())
        sync(self.device)
        ref_t, got_t = torch.cat(ref, 1), torch.cat(got, 1)
        mism = int((ref_t != got_t).sum())
        self.data["graph_checks"].append({"key": v.key, "steps": steps, "mismatched_tokens": mism,
                                          "eager": ref_t.tolist(), "graph": got_t.tolist()})
        self.log(f"graph check {v.key}: {steps - mism}/{steps} tokens equal to eager")
        self.save()

    # -- self-check: correctness of the decode path on a tiny fp32 model
    @torch.inference_mode()
    def selfcheck(self) -> None:
        dense = random_llama(TINY, torch.float32, self.device, seed=123)
        with torch.no_grad():
            for n, p in dense.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        widths = random_budget_widths(dense, 0.4, 8, 0.25, seed=5)
        masks = random_masks(widths, adapter_for(dense).dims(dense.config), seed=5)
        layers = [dict(masks[i]) for i in range(len(masks))]
        layers[0]["attn_out"] = torch.empty(0, dtype=torch.long)  # layer 0: attention pruned away (cache placeholder)
        layers[1]["mlp_out"] = torch.empty(0, dtype=torch.long)   # layer 1: MLP pruned away
        masks = dip_ext.DispMasks(layers)
        comp = dip_ext.compact(copy.deepcopy(dense), masks).eval()
        P, steps = 7, 6
        session = DecodeSession(comp, 2, P, 64, seed=9)
        session.prefill()
        got = [session.ids.clone()]
        detector = HostSyncDetector()
        if self.device.type == "cuda":
            graph = capture_step(session, warmup=2, record=got)
            for _ in range(steps - 2):
                graph.replay()
                got.append(session.ids.clone())
        else:
            with detector:
                for _ in range(steps):
                    session.step()
                    got.append(session.ids.clone())
        got_t = torch.cat(got, 1)
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(session.prompt, attention_mask=torch.ones_like(session.prompt),
                                 max_new_tokens=steps + 1, do_sample=False, pad_token_id=0)[:, P:]
        ok = torch.equal(got_t, ref) and not detector.seen
        self.data["selfcheck"] = {"ok": ok, "graph": self.device.type == "cuda", "tokens": got_t.tolist(),
                                  "reference": ref.tolist(), "host_syncs_in_step": detector.seen}
        self.log(f"self-check (tiny fp32, pruned attention + MLP, decode step vs masked reference generate): "
                 f"{'ok' if ok else 'FAILED'}" + (f"; host syncs: {detector.seen}" if detector.seen else ""))
        self.save()

