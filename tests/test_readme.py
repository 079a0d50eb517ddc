"""Every Python example of the README runs, in order, in one namespace — on a tiny model.

The README uses the embedded SmolLM2 and the built-in texts; here ``zoo.load_default`` returns a tiny seeded
Llama with the tests' word-level tokenizer and every named text is the tests' word text, so the examples run
in seconds and offline. Nothing else is changed: the calls are the README's own.

Examples fenced as ``python vllm`` need vLLM, which lives in its own venv: tests/vllm/test_vllm_engine.py runs
them there (``make test-vllm``), and this file's pattern (a fence of exactly ``python``) leaves them out.
"""

import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dip_ext import data, zoo

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_examples() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_readme_has_python_examples():
    assert len(readme_examples()) >= 3


@pytest.fixture
def tiny_world(monkeypatch, tmp_path, word_tokenizer, word_text, one_thread):
    def load_default(*args, **kwargs):  # a fresh dense model at every call, as the real one loads from disk
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval(), word_tokenizer

    text_of = data.get_text
    monkeypatch.setattr(zoo, "load_default", load_default)
    every_text_is_the_word_text = lambda name, split="calibration": text_of(word_text, split)  # noqa: E731
    monkeypatch.setattr(data, "get_text", every_text_is_the_word_text)
    monkeypatch.setattr(data.blocks, "get_text", every_text_is_the_word_text)
    monkeypatch.chdir(tmp_path)


def test_readme_examples_run(tiny_world, capsys):
    namespace: dict = {}
    for i, code in enumerate(readme_examples()):
        try:
            exec(compile(code, f"README.md python example {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - name the example that failed
            raise AssertionError(f"README python example {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
