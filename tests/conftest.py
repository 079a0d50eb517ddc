"""Shared test fixtures: one intra-op thread for tiny models, an offline word-level tokenizer and a text for it."""

import pytest
import torch

#: the word-level tokenizer's vocabulary after <unk>=0, <s>=1, </s>=2 (ids 3..19: inside any tiny model's vocab)
WORDS = "the a cat dog sat on mat and ran far away big small red blue house tree".split()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add overhead (20x on a busy 2-core machine). Yields the old count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield before
    torch.set_num_threads(before)


def make_word_tokenizer():
    """A fast tokenizer built offline: whitespace words over WORDS, bos <s>, eos </s>, pad = unk.

    A plain function (the ``word_tokenizer`` fixture calls it) so scripts outside pytest, such as
    ``tests/golden/regenerate.py``, build exactly the same tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def write_word_text(folder) -> str:
    """Writes 12 paragraphs of 40 random WORDS (seeded) to ``folder/words.txt``; returns ``file:PATH``.

    ~380 calibration and ~100 held-out tokens. A plain function for the same reason as :func:`make_word_tokenizer`.
    """
    from pathlib import Path

    g = torch.Generator().manual_seed(0)
    paras = [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(12)]
    path = Path(folder) / "words.txt"
    path.write_text("\n\n".join(paras) + "\n")
    return f"file:{path}"


@pytest.fixture(scope="session")
def word_tokenizer():
    """A fast tokenizer built offline: whitespace words over WORDS, bos <s>, eos </s>, pad = unk."""
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def word_text(tmp_path_factory) -> str:
    """``file:PATH`` of 12 paragraphs of 40 random WORDS (seeded): ~380 calibration and ~100 held-out tokens."""
    return write_word_text(tmp_path_factory.mktemp("text"))
