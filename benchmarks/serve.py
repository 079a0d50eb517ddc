"""Serving speed in vLLM (its CPU build, in the vLLM venv): prefill and decode tokens/s of a dense Llama in vLLM's
own model, the same dense model in vLLM's Transformers backend, compacted copies of it at given ratios in dip_ext's
native vLLM model (:mod:`dip_ext.vllm_model`, the default route) and in the Transformers backend (dip_ext's layers),
and, with ``--decilm``, their zero-padded DeciLM exports in vLLM's own ``DeciLMForCausalLM``, one engine at a time,
in this process. ``--routes`` picks the compacted models' routes.

    .venv-vllm/bin/python benchmarks/serve.py [--ratios 0.3 0.5] [--decilm] [--out benchmarks/results/serve.json]

Random weights (speed does not depend on values) in SmolLM2-135M's shapes by default (``--shapes``); each compacted model keeps
the same fraction of every index set, the fraction that removes ``ratio`` of the decoder-linear parameters (the
formula of the family adapter). Prefill: ``--batch`` prompts of ``--prompt-len`` tokens, one token generated;
decode: ``--decode-tokens`` tokens after 16-token prompts, at each ``--decode-batches`` size, minus that batch's
prefill. Each figure is the best of ``--repeats`` timed runs after one warm-up. Prints a table and writes JSON.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process, built one after another

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True),
    # TinyLlama-1.1B's shapes: a model whose GEMMs outweigh the engine's fixed costs per token
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                     tie_word_embeddings=False),
}


def keep_fraction(adapter, config, ratio: float) -> float:
    """The fraction of every index set that removes ``ratio`` of the decoder-linear parameters (bisection)."""
    d, ffn = config.hidden_size, config.intermediate_size

    def params(k):
        widths = {"attn_in": round(k * d), "attn_out": round(k * d), "mlp_in": round(k * d),
                  "mlp_mid": round(k * ffn), "mlp_out": round(k * d)}
        return sum(adapter.linear_params(config, widths).values())

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(mid) < (1 - ratio) * params(1.0) else (lo, mid)
    return hi


def uniform_masks(dims, k: float, seed: int = 1):
    """Random index sets keeping the fraction ``k`` of every set of every layer (speed does not depend on which)."""
    import torch

    import dip_ext

    g = torch.Generator().manual_seed(seed)
    sets = {s: (dims.size(s), round(k * dims.size(s))) for s in dip_ext.STRUCTURES}
    return dip_ext.DispMasks([{s: torch.randperm(n, generator=g)[:kept].sort().values for s, (n, kept) in sets.items()}
                              for _ in range(dims.num_layers)])


def save_models(root: Path, ratios, shapes: dict, decilm: bool) -> tuple[dict, dict]:
    """Saves the dense model and its compacted copies under ``root`` (with ``decilm``, their DeciLM exports too):
    (name → folder, name → removed fraction of the decoder-linear parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import dip_ext
    from dip_ext.families import adapter_for

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**shapes)).eval()
    dense.save_pretrained(root / "dense")
    folders, removed = {"dense": root / "dense"}, {}
    adapter, dims = adapter_for(dense), adapter_for(dense).dims(dense.config)
    for ratio in ratios:
        masks = uniform_masks(dims, keep_fraction(adapter, dense.config, ratio))
        model = dip_ext.compact(LlamaForCausalLM.from_pretrained(root / "dense").eval(), masks)
        model.save_pretrained(root / f"pruned-{ratio}")
        folders[f"pruned-{ratio}"] = root / f"pruned-{ratio}"
        removed[f"pruned-{ratio}"] = dip_ext.param_report(model).removed_decoder_linear
        if decilm:
            report = dip_ext.export_decilm(root / f"pruned-{ratio}", root / f"decilm-{ratio}")
            folders[f"decilm-{ratio}"] = root / f"decilm-{ratio}"
            removed[f"decilm-{ratio}"] = report.to_dict()
    return folders, removed


def timed(llm, prompts, max_tokens: int, repeats: int) -> float:
    """Best wall time (s) of ``repeats`` greedy generations of exactly ``max_tokens`` tokens per prompt."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            detokenize=False)
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch, params, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return best


def measure(folder, impl: str, args) -> dict:
    """Prefill and decode tokens/s of one engine (``model_impl=impl``) over ``folder``."""
    import gc

    import torch
    from vllm import LLM

    llm = LLM(str(folder), model_impl=impl, trust_remote_code=True, dtype=args.dtype, enforce_eager=args.eager,
              max_model_len=args.prompt_len + 64, kv_cache_memory_bytes=1 << 30, distributed_executor_backend="uni",
              skip_tokenizer_init=True, seed=0)
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shapes]["vocab_size"]
    long = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    short = [torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(max(args.decode_batches))]
    row = {"prefill_tok_s": args.batch * args.prompt_len / timed(llm, long, 1, args.repeats)}
    for b in args.decode_batches:
        total = timed(llm, short[:b], args.decode_tokens + 1, args.repeats)
        prefill = timed(llm, short[:b], 1, args.repeats)
        row[f"decode_b{b}_tok_s"] = b * args.decode_tokens / max(total - prefill, 1e-9)
    del llm
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.3, 0.5])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="no torch.compile (vLLM's default compiles)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--routes", nargs="+", choices=["native", "transformers"], default=["native", "transformers"],
                        help="how the compacted models run: dip_ext's native vLLM model, vLLM's Transformers backend")
    parser.add_argument("--decilm", action="store_true", help="also the DeciLM exports in vLLM's own model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = parser.parse_args()
    results = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "shapes": SHAPES[args.shapes],
               "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folders, results["removed_decoder_linear"] = save_models(Path(tmp), args.ratios, SHAPES[args.shapes],
                                                                 args.decilm)
        runs = [("vllm-native-dense", folders["dense"], "vllm"), ("transformers-dense", folders["dense"], "transformers")]
        pruned = [(name, folder) for name, folder in folders.items() if name.startswith("pruned")]
        runs += [(f"dip_ext-native-{name}", folder, "vllm") for name, folder in pruned if "native" in args.routes]
        runs += [(f"transformers-{name}", folder, "transformers") for name, folder in pruned
                 if "transformers" in args.routes]
        runs += [(f"vllm-native-{name}", folder, "vllm") for name, folder in folders.items() if name.startswith("decilm")]
        for name, folder, impl in runs:
            results["rows"][name] = row = measure(folder, impl, args)
            print(name, " ".join(f"{k}={v:.1f}" for k, v in row.items()), flush=True)
    base = results["rows"]["vllm-native-dense"]
    print(f"\n| engine | {' | '.join(base)} | vs native dense |\n|---|{'---:|' * len(base)}---|")
    for name, row in results["rows"].items():
        ratios = " / ".join(f"{row[k] / base[k]:.2f}" for k in base)
        print(f"| {name} | {' | '.join(f'{v:.1f}' for v in row.values())} | {ratios} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
