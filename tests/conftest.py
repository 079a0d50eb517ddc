"""Shared test fixtures: one intra-op thread for tiny models, an offline word-level tokenizer and a text for it.

Plain helper functions live in helpers.py. pytest's importlib mode (setup.cfg) puts no test folder on
``sys.path``, so this file puts its own folder there: every test file (and a worker it starts as a script)
imports them as ``from helpers import ...``.
"""

import sys
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# re-exported: tests/golden/regenerate.py imports these two from here
from helpers import WORDS, make_word_tokenizer, write_word_text  # noqa: E402,F401


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add overhead (20x on a busy 2-core machine). Yields the old count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield before
    torch.set_num_threads(before)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """DIP_EXT_CACHE set to an empty ``tmp_path / "cache"`` for one test (token ids, models: never the user's
    cache); yields that path."""
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"


@pytest.fixture(scope="session")
def word_tokenizer():
    """A fast tokenizer built offline: whitespace words over WORDS, bos <s>, eos </s>, pad = unk."""
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def word_text(tmp_path_factory) -> str:
    """``file:PATH`` of 12 paragraphs of 40 random WORDS (seeded): ~380 calibration and ~100 held-out tokens."""
    return write_word_text(tmp_path_factory.mktemp("text"))
