"""The ``README.md`` of a folder dip_ext saves: what the model is, what was measured, how to load and serve it."""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["model_card"]


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith(("/", ".", "~"))


def model_card(base: str, summary: str, perplexity: Mapping[str, Sequence[float]] = {},
               columns: Sequence[str] = ()) -> str:
    """Markdown with a Hugging Face front matter (``base_model`` when ``base`` is a hub id).

    ``summary``: a paragraph saying what was done to ``base``; ``perplexity``: ``{text: values}``, one value per
    name in ``columns`` (e.g. dense, pruned, recovered), on held-out text."""
    front = ["---", "library_name: transformers", "tags: [dip_ext, pruning, structured-pruning, disp-llm]"]
    front += [f"base_model: {base}"] if _is_hub_id(base) else []
    lines = front + ["---", "", f"# {base}, pruned with DISP-LLM (dip_ext)", "", summary]
    if perplexity:
        lines += ["", "## Measured quality", "", "Perplexity (lower is better) on held-out text the pruning and the "
                  "recovery never trained on:", "", "| text | " + " | ".join(columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for name, row in perplexity.items()]
    lines += ["", "## Load", "", "It needs the `dip_ext` package (a compiled PyTorch extension) installed: build it "
              "from its source with `pip install --no-build-isolation <dip_ext source folder>` after torch.", "",
              "```python", "import dip_ext", "", 'model = dip_ext.from_pretrained("<this folder>")',
              '# or: AutoModelForCausalLM.from_pretrained("<this folder>", trust_remote_code=True)', "```", "",
              "## Serve", "", "Wherever transformers runs a causal LM: `generate`, pipelines, peft (LoRA), and "
              "lm-evaluation-harness with `--model hf --model_args pretrained=<this folder>,trust_remote_code=True`."]
    return "\n".join(lines) + "\n"
