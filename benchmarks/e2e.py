"""End-to-end speed: dense vs DISP-compacted vs "same-widths dense", prefill and decode, CPU and CUDA.

Three variants run side by side in one process (measurements interleaved round-robin, medians reported):

- ``dense``:       the unpruned Hugging Face model.
- ``compacted``:   ``dip_ext.compact(dense, masks)``: every block reads its kept inputs through the fused
                   norm+gather kernel and scatter-adds its output into the full-width residual.
- ``same-widths``: the floor. The SAME compacted model object (same weights, same per-block GEMM shapes) run with
                   a patched decoder-layer forward that replaces every index set by the prefix range ``[0, k)``:
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
  written back into the static ``ids`` and the position / mask advance, ALL as tensor ops on the device, so on CUDA
  one step is captured once into a ``torch.cuda.CUDAGraph`` and replayed (warmed up first, so every per-device
  index copy of dip_ext and the cache tensors exist before capture). Passing the 4-D mask skips transformers' mask
  construction, whose host-side checks (``.all()``) would synchronise. On CPU the same step runs eagerly.
  tokens/s = b * steps / wall time. If capture fails the error is recorded and the eager step is timed instead.
  A graph check compares the tokens of graph replays with those of eager steps (batch 1).

Masks: random kept subsets (speed does not depend on WHICH dims are kept) with realistic per-layer widths: each
layer's five widths start at a common keep fraction times a log-normal jitter (sigma ``--spread``, 0.25: learned
DISP masks vary by layer and structure), rounded to ``--multiple-of`` (64 on CUDA), and a global scale is bisected
so the decoder-linear parameters removed match the ratio (the achieved fraction is reported).

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
``--out``. Targets (issues 3 and 6) are printed as PASS / MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=16384, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)

# Targets (issue 6): (device, name) -> threshold. "within X %" means time(compacted) <= (1 + X) * time(same-widths).
CPU_FLOOR_SLACK, CUDA_FLOOR_SLACK = 0.05, 0.03
CPU_FLOP_FRACTION = 0.9
CUDA_PREFILL_SPEEDUP, CUDA_DECODE_SPEEDUP = 1.8, 1.7


# ---------------------------------------------------------------------------------------------------------------
# masks with budget widths
# ---------------------------------------------------------------------------------------------------------------

def budget_widths(config, ratio: float, multiple_of: int, spread: float, seed: int) -> list[dict[str, int]]:
    """Per-layer kept widths removing about ``ratio`` of the decoder-linear parameters (see the module docstring)."""
    from dip_ext.families import adapter_for
    from dip_ext.masks import STRUCTURES

    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratios must be in (0, 1), got {ratio}")
    adapter = adapter_for(config)
    dims = adapter.dims(config)
    sizes = {s: dims.size(s) for s in STRUCTURES}
    dense = dims.num_layers * sum(adapter.linear_params(config, sizes).values())
    target = (1.0 - ratio) * dense
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.exp(spread * torch.randn(dims.num_layers, len(STRUCTURES), generator=gen, dtype=torch.float64))

    def widths_at(scale: float) -> list[dict[str, int]]:
        out = []
        for i in range(dims.num_layers):
            w = {}
            for j, s in enumerate(STRUCTURES):
                n = sizes[s]
                m = min(multiple_of, n)
                k = int(round(min(1.0, scale * float(jitter[i, j])) * n / m)) * m
                w[s] = max(m, min(n, k))
            out.append(w)
        return out

    def kept(ws) -> int:
        return sum(sum(adapter.linear_params(config, w).values()) for w in ws)

    lo, hi = 0.0, 1.0 / float(jitter.min())
    for _ in range(60):
        mid = (lo + hi) / 2
        if kept(widths_at(mid)) < target:
            lo = mid
        else:
            hi = mid
    best = min((widths_at(lo), widths_at(hi)), key=lambda ws: abs(kept(ws) - target))
    return best


def random_masks(widths: list[dict[str, int]], config, seed: int):
    """DispMasks with random sorted subsets of the given per-layer widths."""
    from dip_ext import DispMasks
    from dip_ext.families import adapter_for

    dims = adapter_for(config).dims(config)
    gen = torch.Generator().manual_seed(seed + 1)
    layers = [{s: torch.randperm(dims.size(s), generator=gen)[:k].sort().values for s, k in w.items()}
              for w in widths]
    return DispMasks(layers)


# ---------------------------------------------------------------------------------------------------------------
# the same-widths floor
# ---------------------------------------------------------------------------------------------------------------

def _same_widths_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A compacted Llama layer with every index set replaced by ``[0, k)``: narrow views, no gather, no scatter."""
    x = hidden_states
    d = x.shape[-1]
    if self.self_attn is not None:
        norm = self.input_layernorm
        h = F.rms_norm(x, (d,), norm.weight, norm.variance_epsilon)[..., :norm.idx.numel()]
        a, _ = self.self_attn(hidden_states=h, **kwargs)
        x[..., :a.shape[-1]].add_(a)
    else:
        self.skip_attention(x, kwargs)
    if self.mlp is not None:
        norm = self.post_attention_layernorm
        h = F.rms_norm(x, (d,), norm.weight, norm.variance_epsilon)[..., :norm.idx.numel()]
        y = self.mlp(h)
        x[..., :y.shape[-1]].add_(y)
    return x


@contextlib.contextmanager
def same_widths(model):
    """Runs a compacted Llama-family model as its same-widths dense floor while the context is open."""
    from dip_ext.families.llama_style import LlamaStyleLayer

    layers = [m for m in model.modules() if isinstance(m, LlamaStyleLayer)]
    if not layers:
        raise ValueError("same_widths needs a compacted Llama-family model (no LlamaStyleLayer found)")
    for layer in layers:
        layer.forward = types.MethodType(_same_widths_forward, layer)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


@dataclass
class Variant:
    kind: str    # "dense" | "compacted" | "same-widths"
    ratio: float  # fraction of decoder-linear parameters removed (0 for dense)
    model: torch.nn.Module

    @property
    def key(self) -> str:
        return "dense" if self.kind == "dense" else f"{self.kind}@{self.ratio:g}"

    def ctx(self):
        return same_widths(self.model) if self.kind == "same-widths" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# model plumbing shared by every transformers 5.x (the cache kwarg was renamed past_key_values -> cache in 5.2x)
# ---------------------------------------------------------------------------------------------------------------

def forward_kwargs(model) -> dict:
    params = inspect.signature(type(model).forward).parameters
    return {"cache_kw": "cache" if "cache" in params else "past_key_values",
            "logits_to_keep": "logits_to_keep" in params}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def param_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class HostSyncDetector(TorchDispatchMode):
    """Records ops that read device data on the host (a sync on CUDA, fatal inside graph capture).

    Works on CPU tensors too, so a CPU run proves the decode step has no data-dependent host reads.
    """

    NAMES = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.NAMES:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class DecodeSession:
    """Greedy decode state for one model and batch: a StaticCache and static input tensors, all on the device.

    ``prefill()`` fills the cache with a random prompt ``[batch, prompt_len]``; ``step()`` runs one decode step and
    advances ``ids [batch, 1]``, ``pos [batch, 1]``, ``cp [1]`` and the additive mask ``[batch, 1, 1, max_len]`` in
    place, so it can be captured into a CUDA graph and replayed.
    """

    def __init__(self, model, batch: int, prompt_len: int, max_len: int, seed: int = 0):
        from transformers import StaticCache

        self.model, self.batch, self.prompt_len, self.max_len = model, batch, prompt_len, max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        kw = forward_kwargs(model)
        self.cache_kw, self.keep = kw["cache_kw"], ({"logits_to_keep": 1} if kw["logits_to_keep"] else {})
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        gen = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(self.device)
        self.neg = torch.finfo(self.dtype).min
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.full((batch, 1), prompt_len, dtype=torch.long, device=self.device)
        self.cp = torch.full((1,), prompt_len, dtype=torch.long, device=self.device)
        self.mask = torch.full((batch, 1, 1, max_len), self.neg, dtype=self.dtype, device=self.device)
        self.mask[..., :prompt_len] = 0.0
        self.steps_done = 0

    def _forward(self, ids, mask, pos):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self.cache_kw: self.cache}, **self.keep)
        return out.logits[:, -1]

    def prefill(self) -> None:
        P, L = self.prompt_len, self.max_len
        causal = torch.ones(P, L, dtype=torch.bool, device=self.device).tril()  # row i sees columns <= i
        mask = torch.zeros(P, L, dtype=self.dtype, device=self.device).masked_fill(~causal, self.neg)
        mask = mask.expand(self.batch, 1, P, L)
        pos = torch.arange(P, device=self.device).expand(self.batch, P)
        logits = self._forward(self.prompt, mask, pos)
        self.ids.copy_(logits.argmax(-1, keepdim=True))

    def step(self) -> None:
        self.mask.index_fill_(-1, self.cp, 0.0)  # the new token sees itself
        logits = self._forward(self.ids, self.mask, self.pos)
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.cp.add_(1)
        self.steps_done += 1

    def cache_bytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def capture_step(session: DecodeSession, warmup: int = 2, record: Optional[list] = None) -> "torch.cuda.CUDAGraph":
    """Warms ``session.step`` up on a side stream (index copies, cuBLAS handles, lazy cache tensors) and captures it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            session.step()
            if record is not None:
                record.append(session.ids.clone())
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        session.step()
    return graph


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


# ---------------------------------------------------------------------------------------------------------------
# building the models
# ---------------------------------------------------------------------------------------------------------------

def build_random_llama(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """A LlamaForCausalLM with random weights created directly on ``device`` in ``dtype`` (sdpa attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def build_variants(dense, ratios, multiple_of, spread, seed, log) -> tuple[list[Variant], dict]:
    import dip_ext

    variants, masks_info = [Variant("dense", 0.0, dense)], {}
    for r in ratios:
        widths = budget_widths(dense.config, r, multiple_of, spread, seed)
        masks = random_masks(widths, dense.config, seed)
        t0 = time.perf_counter()
        model = dip_ext.compact(copy.deepcopy(dense), masks).eval()
        # .to() on the same device still visits every module: the index sets make their device copies now, before
        # any CUDA-graph capture (the warm-up steps would also make them)
        model.to(next(dense.parameters()).device)
        rep = dip_ext.param_report(model)
        masks_info[f"{r:g}"] = {
            "ratio_requested": r, "removed_decoder_linear": rep.removed_decoder_linear,
            "removed_total": rep.removed_total, "decoder_linear": rep.decoder_linear,
            "dense_decoder_linear": rep.dense_decoder_linear, "multiple_of": multiple_of, "spread": spread,
            "widths": widths, "method": "random subsets; per-layer widths from the budget with log-normal jitter"}
        log(f"compacted {100 * r:.0f} %: removed {100 * rep.removed_decoder_linear:.2f} % of decoder-linear "
            f"parameters ({100 * rep.removed_total:.2f} % of all) in {time.perf_counter() - t0:.1f} s")
        variants += [Variant("compacted", r, model), Variant("same-widths", r, model)]
    return variants, masks_info


# ---------------------------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------------------------

class Bench:
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
        self.data["targets"] = self.targets()
        self.data["meta"]["elapsed_s"] = time.perf_counter() - self.t0
        if not self.out:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.out)

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
        import dip_ext

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
        import dip_ext

        dense = build_random_llama(TINY, torch.float32, self.device, seed=123)
        with torch.no_grad():
            for n, p in dense.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        widths = budget_widths(dense.config, 0.4, 8, 0.25, seed=5)
        masks = random_masks(widths, dense.config, seed=5)
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

    # -- targets
    def _rows(self, table: str, **match) -> list[dict]:
        return [r for r in self.data[table] if all(r.get(k) == v for k, v in match.items())]

    def targets(self) -> list[dict]:
        a, out = self.args, []
        cuda = self.device.type == "cuda"
        slack = CUDA_FLOOR_SLACK if cuda else CPU_FLOOR_SLACK
        seq = a.target_seq
        for r in a.ratios:
            dense = self._rows("prefill", seq_len=seq, key="dense")
            comp = self._rows("prefill", seq_len=seq, key=f"compacted@{r:g}")
            floor = self._rows("prefill", seq_len=seq, key=f"same-widths@{r:g}")
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
            for row in self._rows("decode", key="compacted@0.5"):
                dense = self._rows("decode", key="dense", batch=row["batch"])
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

    # -- report
    def table(self) -> str:
        lines = []
        pf = self.data["prefill"]
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
        dc = self.data["decode"]
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
                mb = self.data["models"][key]["param_bytes"] / 2**20
                lines.append(f"{key:<20}{cells}{any_r['linear_flop_ratio']:>12.3f}{mb:>12.0f}")
        if self.data["targets"]:
            lines.append("\ntargets")
            for t in self.data["targets"]:
                lines.append(f"  {'PASS' if t['pass'] else 'MISS'}  {t['name']}: {t['value']:.3f} "
                             f"(needs {t['threshold']}){'  [' + t['note'] + ']' if t.get('note') else ''}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
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
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; optional measurements are skipped past it (default cuda 170, cpu none)")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: time eager decode steps instead of graphs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch intra-op threads (default: torch's; 1 is steadier on a shared, loaded machine)")
    p.add_argument("--no-selfcheck", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    a.dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    a.model = a.model or ("tiny" if a.quick else ("llama2-7b" if cuda else "smollm2"))
    try:
        a.ratios = [float(r) for r in a.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios must be a comma list of numbers, got {a.ratios!r}")
    if not a.ratios or any(not 0 < r < 1 for r in a.ratios):
        p.error("--ratios must be numbers in (0, 1)")

    def ints(s, name):
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            p.error(f"--{name} must be a comma list of integers, got {s!r}")
        if not v or any(x < 1 for x in v):
            p.error(f"--{name} must be positive integers")
        return v

    if a.quick:
        defaults = dict(prefill_lens="32,16", batches="1,2", prompt_len=8, decode_steps=4, repeats=2,
                        multiple_of=8, time_budget=0)
        a.decode_repeats = min(a.decode_repeats, 2)
    elif cuda:
        defaults = dict(prefill_lens="2048,512,8192", batches="1,8,16", prompt_len=128, decode_steps=32, repeats=7,
                        multiple_of=64, time_budget=170)
    else:
        defaults = dict(prefill_lens="256,64", batches="1,8,16", prompt_len=64, decode_steps=8, repeats=5,
                        multiple_of=8, time_budget=0)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.prefill_lens = ints(a.prefill_lens, "prefill-lens")
    a.batches = ints(a.batches, "batches")
    for name in ("prompt_len", "decode_steps", "repeats", "decode_repeats", "multiple_of"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    a.target_seq = a.prefill_lens[0]
    return a


def load_model(a, device):
    if a.model == "smollm2":
        from dip_ext import zoo

        model, _ = zoo.load_default(dtype=a.dtype, device=device)
        model.config._attn_implementation = "sdpa"
        return model.eval(), "SmolLM2-135M-Instruct (zoo.load_default)"
    shape = LLAMA2_7B if a.model == "llama2-7b" else TINY
    name = "Llama-2-7B shapes, random weights" if a.model == "llama2-7b" else "tiny random Llama"
    return build_random_llama(shape, a.dtype, device, a.seed), name


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    if a.threads is not None:
        if a.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import dip_ext
    import transformers

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
        variants, bench.data["masks"] = build_variants(dense, a.ratios, a.multiple_of, a.spread, a.seed, bench.log)
    except Exception as e:  # noqa: BLE001
        bench.error("building models", e)
        print(bench.table())
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
    print(bench.table(), flush=True)
    failed = bench.data["errors"] or (bench.data["selfcheck"] is not None and not bench.data["selfcheck"]["ok"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
