"""Calibration data in the forms users have: documents, chat conversations, tokenizer output (padding dropped),
token ids; anything else refused naming what was received and what is accepted."""

import pytest
import torch
from helpers import make_word_tokenizer, tiny_llama

import dip_ext
from dip_ext.data import calibration_tokens
from dip_ext.data.inputs import ACCEPTED

DOCS = ["the cat sat on the mat", "a dog ran far away", "big red house and small blue tree"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield one_thread


def ids(tokenizer, text) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_documents_are_tokenized_one_by_one_and_joined_by_eos(word_tokenizer):
    got = calibration_tokens(DOCS, word_tokenizer)
    eos = word_tokenizer.eos_token_id
    want = ids(word_tokenizer, DOCS[0]) + [eos] + ids(word_tokenizer, DOCS[1]) + [eos] + ids(word_tokenizer, DOCS[2])
    assert got.tokens.tolist() == want and got.label == "<3 documents>"
    assert calibration_tokens(iter(DOCS), word_tokenizer).tokens.tolist() == want  # any iterable of strings
    with pytest.raises(ValueError, match="need a tokenizer"):
        calibration_tokens(DOCS, None)


def test_chat_conversations_go_through_the_chat_template():
    tok = make_word_tokenizer()
    chat = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on the mat"}]
    with pytest.raises(ValueError, match="chat template.*has none"):
        calibration_tokens([chat], tok)
    tok.chat_template = TEMPLATE
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert "user" in rendered and "assistant" in rendered
    for value in ([chat, chat], [{"messages": chat}, {"messages": chat}]):
        got = calibration_tokens(value, tok)
        assert got.tokens.tolist() == ids(tok, rendered) + [tok.eos_token_id] + ids(tok, rendered)
        assert got.label == "<2 conversations>"
    assert calibration_tokens(chat, tok).label == "<1 conversation>"  # one conversation alone


def test_tokenizer_output_drops_the_padding(word_tokenizer):
    batch = word_tokenizer(DOCS, padding=True, return_tensors="pt")
    assert bool((batch["attention_mask"] == 0).any())  # the batch really is padded
    got = calibration_tokens(batch, word_tokenizer)
    assert got.tokens.tolist() == calibration_tokens(DOCS, word_tokenizer).tokens.tolist()
    plain = {"input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"].tolist()}
    assert torch.equal(calibration_tokens(plain, word_tokenizer).tokens, got.tokens)


def test_token_ids_with_a_dedicated_pad_id_are_refused():
    tok = make_word_tokenizer(pad_token=None)
    tok.add_special_tokens({"pad_token": "<pad>"})
    pad = tok.pad_token_id
    windows = torch.tensor([[3, 4, 5, pad], [6, 7, 8, 9]])
    with pytest.raises(ValueError, match=f"pad id {pad}.*attention_mask"):
        calibration_tokens(windows, tok)
    assert torch.equal(calibration_tokens(windows[1:], tok).tokens, windows[1:])
    # a pad id shared with the unknown token (as this helper's tokenizer has) cannot be told from text
    shared = make_word_tokenizer()
    assert shared.pad_token_id == shared.unk_token_id
    assert calibration_tokens(torch.tensor([[0, 3, 4]]), shared).label == "<token ids 1x3>"


@pytest.mark.parametrize("value, received", [
    ([1, 2, 3], "list of int"), ({"text": "x"}, "dict"), (3.5, "float"), ([], "list of nothing"),
    (["a", 3], "list of int, str"), (torch.ones(2, 2), "float32"), ("wiki", "text name here"),
])
def test_anything_else_is_refused_naming_what_was_received(value, received, word_tokenizer):
    with pytest.raises(ValueError) as info:
        calibration_tokens(value, word_tokenizer)
    assert received in str(info.value)
    if not isinstance(value, (str, torch.Tensor)):
        assert ACCEPTED in str(info.value)


def test_prune_and_compact_calibrates_on_documents_and_tokenizer_output(word_tokenizer):
    docs = [" ".join(DOCS * 3)] * 8
    batch = word_tokenizer(docs, padding=True, return_tensors="pt")
    kw = dict(ratio=0.3, method="oneshot", seq_len=16, calibration_windows=4, val_windows=0, refit="off",
              eval_texts=(), measure_speed=False, progress=False)
    _, by_docs = dip_ext.prune_and_compact(tiny_llama(vocab_size=len(word_tokenizer)), word_tokenizer,
                                           calibration=docs, **kw)
    _, by_batch = dip_ext.prune_and_compact(tiny_llama(vocab_size=len(word_tokenizer)), word_tokenizer,
                                            calibration=batch, **kw)
    assert by_docs.calibration == "<8 documents>"
    assert by_batch.calibration.startswith("<tokenizer output: 8 sequences")
    assert by_docs.masks == by_batch.masks  # the same tokens, padding or not
    with pytest.raises(ValueError, match="calibration got a list of int"):
        dip_ext.prune_and_compact(tiny_llama(), word_tokenizer, calibration=[1, 2], **kw)
