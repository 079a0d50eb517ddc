"""Serving speed in llama.cpp (llama-cpp-python, in the project venv): prefill and decode tokens/s of a dense Llama
written as GGUF against the GGUF exports (``dip_ext.export_gguf``) of compacted copies of it, one model at a time.

    python benchmarks/serve_gguf.py [--shapes llama-1b] [--ratios 0.3 0.5] [--quantize q8_0] [--out FILE.json]

Random weights (speed does not depend on values) in the shapes of ``benchmarks/serve.py``, with SmolLM2's
vocabulary (the GGUF carries a tokenizer; the default model's is the one at hand offline). Each compacted copy keeps
the same fraction of every index set, as in serve.py. The dense model is written by the same exporter (llama.cpp's
``deci`` graph at full widths), so both sides run the same code. Prefill: one ``--prompt-len``-token prompt in one
batch; decode: ``--decode-tokens`` tokens one at a time after a 16-token prompt (batch 1), and at each
``--decode-batches`` size that many sequences at once (llama.cpp's low-level batch API). Each figure is the best of
``--repeats`` runs after a warm-up, ``--threads`` threads. Prints a table (with what each export keeps: its
parameters and linear FLOPs against the dense model's) and writes JSON.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import SHAPES, keep_fraction, uniform_masks  # noqa: E402 - the serving benchmark's shapes and masks


def save_models(root: Path, ratios, shapes: dict, quantize: str) -> tuple[dict, dict]:
    """GGUF files of the dense model and of its compacted copies: (name → file, name → ExportReport dict)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import dip_ext
    from dip_ext.families import adapter_for
    from dip_ext.zoo import load_default

    _, tokenizer = load_default()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**shapes)).eval()
    files, reports = {}, {}
    reports["dense"] = dip_ext.export_gguf(dense, root / "dense.gguf", tokenizer=tokenizer, quantize=quantize).to_dict()
    files["dense"] = root / "dense.gguf"
    adapter, dims = adapter_for(dense), adapter_for(dense).dims(dense.config)
    for ratio in ratios:
        masks = uniform_masks(dims, keep_fraction(adapter, dense.config, ratio))
        torch.manual_seed(0)
        model = dip_ext.compact(LlamaForCausalLM(LlamaConfig(**shapes)).eval(), masks)
        name = f"export-{ratio}"
        reports[name] = dip_ext.export_gguf(model, root / f"{name}.gguf", tokenizer=tokenizer,
                                            quantize=quantize).to_dict()
        files[name] = root / f"{name}.gguf"
    return files, reports


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(path: Path, args, vocab: int) -> dict:
    """Prefill and batch-1 decode tokens/s of one GGUF file."""
    import torch
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=args.prompt_len + args.decode_tokens + 32, n_batch=args.prompt_len,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
    short = prompt[:16]

    def prefill():
        llm.reset()
        llm.eval(prompt)

    def decode():
        llm.reset()
        llm.eval(short)
        for t in prompt[16:16 + args.decode_tokens]:
            llm.eval([t])

    def short_prefill():
        llm.reset()
        llm.eval(short)

    row = {"prefill_tok_s": args.prompt_len / best(prefill, args.repeats)}
    decode_s = best(decode, args.repeats) - best(short_prefill, args.repeats)
    row["decode_b1_tok_s"] = args.decode_tokens / max(decode_s, 1e-9)
    llm.close()
    for b in args.decode_batches:
        row[f"decode_b{b}_tok_s"] = batched_decode(path, args, vocab, b)
    return row


def batched_decode(path: Path, args, vocab: int, batch: int) -> float:
    """Decode tokens/s of ``batch`` sequences at once (llama.cpp's low-level API: one ``llama_decode`` per step with
    one token of each sequence), after their 16-token prompts, minus the time of those prompts alone."""
    import llama_cpp
    import torch

    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = batch * (16 + args.decode_tokens + 8)
    params.n_batch = params.n_ubatch = batch * 16
    params.n_seq_max = batch
    params.n_threads = params.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (batch, 16), generator=g).tolist()
    steps = torch.randint(0, vocab, (args.decode_tokens, batch), generator=g).tolist()
    tokens = llama_cpp.llama_batch_init(batch * 16, 0, 1)

    def decode(entries) -> None:  # entries: (token, position, sequence)
        tokens.n_tokens = len(entries)
        for i, (tok, pos, seq) in enumerate(entries):
            tokens.token[i], tokens.pos[i], tokens.n_seq_id[i] = tok, pos, 1
            tokens.seq_id[i][0], tokens.logits[i] = seq, 1
        if llama_cpp.llama_decode(ctx, tokens) != 0:
            raise RuntimeError(f"llama_decode failed on {path.name}")

    def run(decode_steps: int) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        decode([(t, p, s) for s, prompt in enumerate(prompts) for p, t in enumerate(prompt)])
        for step in range(decode_steps):
            decode([(steps[step][s], 16 + step, s) for s in range(batch)])

    try:
        seconds = best(lambda: run(args.decode_tokens), args.repeats) - best(lambda: run(0), args.repeats)
    finally:
        llama_cpp.llama_batch_free(tokens)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return batch * args.decode_tokens / max(seconds, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.3, 0.5])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--quantize", default="q8_0", help="GGUF weight type (dip_ext.export_gguf's quantize)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[8, 32],
                        help="also decode this many sequences at once (batch 1 is always measured)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve-gguf.json"))
    args = parser.parse_args()
    shapes = {**SHAPES[args.shapes], "vocab_size": 49152}  # SmolLM2's tokenizer goes into every file
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "shapes": shapes,
               "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files, results["exports"] = save_models(Path(tmp), args.ratios, shapes, args.quantize)
        for name, path in files.items():
            results["rows"][name] = row = measure(path, args, shapes["vocab_size"])
            print(name, " ".join(f"{k}={v:.1f}" for k, v in row.items()), flush=True)
    base, dense = results["rows"]["dense"], results["exports"]["dense"]
    print(f"\n| GGUF | {' | '.join(base)} | vs dense | params kept | linear FLOPs kept |\n"
          f"|---|{'---:|' * len(base)}---|---:|---:|")
    for name, row in results["rows"].items():
        rep = results["exports"][name]
        params = rep["params"]["export"] / dense["params"]["export"]
        flops = rep["linear_flops"]["export"] / dense["linear_flops"]["export"]
        ratios = " / ".join(f"{row[k] / base[k]:.2f}" for k in base)
        print(f"| {name} | {' | '.join(f'{v:.1f}' for v in row.values())} | {ratios} | {params:.3f} | {flops:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
