"""Output and work folders never endanger a user's files: every command that writes an output refuses a folder
that is an input, the current folder or a parent of it, or a folder dip_ext did not write; a failed run leaves the
previous output as it was; files and folders dip_ext writes honour the umask."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from transformers import LlamaConfig, LlamaForCausalLM

import dip_ext
from dip_ext import files, zoo
from dip_ext.outputs import OUTPUT_MARKER, WORK_MARKER, OutputFolder, prepare_work_dir
from dip_ext.pipeline import Pruner

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes (folders by their files)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny(tmp_path, word_tokenizer):
    """A dense tiny Llama folder and a compacted one pruned from it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    dense = tmp_path / "inputs" / "dense"
    model.save_pretrained(dense)
    word_tokenizer.save_pretrained(dense)
    masks = dip_ext.DispMasks.from_dict({"layers": [
        {"attn_in": list(range(0, 32, 2)), "attn_out": list(range(0, 32, 2)), "mlp_in": list(range(1, 32, 2)),
         "mlp_mid": list(range(0, 64, 2)), "mlp_out": list(range(0, 32, 2))} for _ in range(2)]})
    dip_ext.compact(model, masks)
    pruned = tmp_path / "inputs" / "pruned"
    model.save_pretrained(pruned)
    word_tokenizer.save_pretrained(pruned)
    return dense, pruned


def prune_argv(model, text, out, *extra):
    return ("prune", "--model", model, "--calibration", text, "--method", "oneshot", "--refit", "off", "--seq-len", 16,
            "--calibration-windows", 4, "--eval-windows", 0, "--no-speed", "--quiet", "--out", out, *extra)


def recover_argv(pruned, dense, text, out, *extra):
    return ("recover", "--model", pruned, "--teacher", dense, "--calibration", text, "--seq-len", 16, "--val-windows",
            2, "--recover", "distill", "--recover-steps", 1, "--recover-batch", 1, "--eval-windows", 0, "--quiet",
            "--out", out, *extra)


def text_path(word_text) -> Path:
    return Path(word_text[len("file:"):])


# ---- every command, its --out pointed at what it must not touch ---------------------------------------------

TARGETS = ["model", "model-child", "text-file", "text-folder", "cwd", "cwd-parent", "unrelated"]


@pytest.mark.parametrize("command,target", [("prune", t) for t in TARGETS] + [("recover", t) for t in
                                                                              TARGETS + ["teacher"]])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_never_destroys_what_dip_ext_did_not_write(capsys, tmp_path, tiny, word_text, command, target,
                                                          overwrite):
    dense, pruned = tiny
    text = text_path(word_text)
    unrelated = tmp_path / "work-area"
    (unrelated / "sub").mkdir(parents=True)
    (unrelated / "notes.txt").write_text("mine")
    (unrelated / "sub" / "data.bin").write_bytes(b"\x00\x01")
    model = dense if command == "prune" else pruned
    out = {"model": model, "model-child": model / "inner", "teacher": dense, "text-file": text,
           "text-folder": text.parent, "cwd": Path("."), "cwd-parent": Path(".."), "unrelated": unrelated}[target]
    watched = [dense, pruned, text.parent, unrelated]
    before = [snapshot(w) for w in watched]
    argv = (prune_argv(model, word_text, out) if command == "prune"
            else recover_argv(pruned, dense, word_text, out))
    code, _, err = run_cli(capsys, *argv, *(["--overwrite"] if overwrite else []))
    assert code == 2 and err.count("\n") == 1, err
    assert [snapshot(w) for w in watched] == before
    assert not any(p.name.startswith(".dip_ext-staging") for p in tmp_path.rglob("*"))


def test_work_dir_refused_inside_an_input_or_the_output(capsys, tmp_path, tiny, word_text):
    dense, _ = tiny
    before = snapshot(dense)
    for work in (dense, dense / "ckpt", tmp_path / "out" / "work", Path(".")):
        code, _, err = run_cli(capsys, *prune_argv(dense, word_text, tmp_path / "out", "--work-dir", work))
        assert code == 2 and "work folder" in err, err
    assert snapshot(dense) == before and not (tmp_path / "out").exists()


def test_prune_then_overwrite_and_resume(capsys, tmp_path, tiny, word_text):
    dense, _ = tiny
    out = tmp_path / "pruned-out"
    assert run_cli(capsys, *prune_argv(dense, word_text, out))[0] == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["written_by"] == "dip_ext" and marker["command"] == "prune"
    assert set(marker["entries"]) == {p.name for p in out.iterdir()} - {OUTPUT_MARKER}
    assert (tmp_path / "pruned-out-work" / "calibration.safetensors").is_file()  # beside the model, not in it
    assert not (out / "work").exists()
    # again without --overwrite: refused; with it: replaced; --resume reuses the checkpoints and replaces it too
    assert run_cli(capsys, *prune_argv(dense, word_text, out))[0] == 2
    assert run_cli(capsys, *prune_argv(dense, word_text, out, "--overwrite", "--ratio", "0.5"))[0] == 0
    assert dip_ext.PruneReport.load(out).ratio == 0.5
    code, _, err = run_cli(capsys, *prune_argv(dense, word_text, out, "--resume", "--ratio", "0.5"))
    assert code == 0, err
    dip_ext.PruneReport.load(out).save(out)  # the command's report files are dip_ext's to replace
    assert set(json.loads((out / OUTPUT_MARKER).read_text())["entries"]) == {p.name for p in out.iterdir()} - {
        OUTPUT_MARKER}


def test_failed_run_leaves_the_previous_output(capsys, tmp_path, tiny, word_text, monkeypatch):
    dense, _ = tiny
    out = tmp_path / "result"
    assert run_cli(capsys, *prune_argv(dense, word_text, out))[0] == 0
    before = snapshot(out)

    def broken_save(self, folder, **kwargs):
        (Path(folder) / "report.json").write_text("half")
        raise ValueError("disk full")

    monkeypatch.setattr(dip_ext.PruneReport, "save", broken_save)
    code, _, err = run_cli(capsys, *prune_argv(dense, word_text, out, "--overwrite", "--ratio", "0.5"))
    assert code == 2 and "disk full" in err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", "inputs", "result", "result-work"])


def test_recover_writes_beside_and_never_into_its_inputs(capsys, tmp_path, tiny, word_text):
    dense, pruned = tiny
    out = tmp_path / "recovered"
    code, _, err = run_cli(capsys, *recover_argv(pruned, dense, word_text, out))
    assert code == 0, err
    assert (out / "recovery.json").is_file() and (out / OUTPUT_MARKER).is_file()
    assert (tmp_path / "recovered-work" / "distill.safetensors").is_file()
    assert dip_ext.is_compacted(dip_ext.from_pretrained(out))


# ---- the building blocks ------------------------------------------------------------------------------------

def test_output_folder_refusals(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "a.txt").write_text("a")
    with pytest.raises(ValueError, match="not empty"):
        OutputFolder(theirs, command="t")
    with pytest.raises(ValueError, match="not written by dip_ext"):
        OutputFolder(theirs, command="t", replace=True)
    with pytest.raises(ValueError, match="current folder"):
        OutputFolder(tmp_path, command="t")
    with pytest.raises(ValueError, match="lies inside the input --model"):
        OutputFolder(theirs / "x", command="t", inputs={"--model": theirs})
    (tmp_path / "up" / "m").mkdir(parents=True)
    with pytest.raises(ValueError, match="contains the input --model"):
        OutputFolder(tmp_path / "up", command="t", inputs={"--model": tmp_path / "up" / "m"})
    with pytest.raises(ValueError, match="is the input --text"):
        OutputFolder(theirs / "a.txt", command="t", inputs={"--text": theirs / "a.txt"})
    assert (theirs / "a.txt").read_text() == "a"


def test_output_folder_replaces_only_its_own_entries(tmp_path):
    out = OutputFolder(tmp_path / "o", command="t")
    with out.staging() as folder:
        (folder / "model.bin").write_bytes(b"1")
    assert (tmp_path / "o" / "model.bin").read_bytes() == b"1"
    again = OutputFolder(tmp_path / "o", command="t", replace=True)
    (tmp_path / "o" / "late.txt").write_text("added while the run ran")
    with pytest.raises(ValueError, match="late.txt.*result is kept in .*o.dip_ext-result-1"):
        with again.staging() as folder:
            (folder / "model.bin").write_bytes(b"2")
    assert (tmp_path / "o" / "late.txt").exists() and (tmp_path / "o" / "model.bin").read_bytes() == b"1"
    # nothing half-written stays behind, and the refused run's result is not lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "o.dip_ext-result-1"]
    assert (tmp_path / "o.dip_ext-result-1" / "model.bin").read_bytes() == b"2"


def test_work_dir_removes_only_named_checkpoints_of_its_own_folder(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "calibration.safetensors").write_text("not ours")
    with pytest.raises(ValueError, match="not created by dip_ext"):
        prepare_work_dir(theirs, resume=False, checkpoints=("calibration.safetensors",))
    assert (theirs / "calibration.safetensors").read_text() == "not ours"
    ours = prepare_work_dir(tmp_path / "ours", resume=False, checkpoints=())
    assert (ours / WORK_MARKER).is_file()
    (ours / "calibration.safetensors").write_text("old")
    (ours / "hypernetwork").mkdir()
    (ours / "keep.txt").write_text("k")
    prepare_work_dir(ours, resume=True, checkpoints=("calibration.safetensors", "hypernetwork"))
    assert (ours / "calibration.safetensors").exists()
    prepare_work_dir(ours, resume=False, checkpoints=("calibration.safetensors", "hypernetwork"))
    assert sorted(p.name for p in ours.iterdir()) == sorted([WORK_MARKER, "keep.txt"])


def test_pruner_refuses_a_work_dir_of_unrelated_files(tmp_path, tiny):
    dense, _ = tiny
    model, tok = zoo.resolve_model(dense)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not created by dip_ext"):
        Pruner(model, tok, work_dir=tmp_path / "mine")
    with pytest.raises(ValueError, match="current folder"):
        Pruner(model, tok, work_dir=".")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


def test_report_save_overwrites_only_the_files_it_wrote(tmp_path):
    """``PruneReport.save`` into a folder of the user's: its own files are replaced on the next save; a file of
    the same name it did not write is refused before anything is written, and stays as it was."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    blocks = torch.randint(3, 60, (12, 16), generator=torch.Generator().manual_seed(0))
    _, report = dip_ext.prune_and_compact(model, None, ratio=0.3, calibration=blocks, recover="off",
                                          eval_windows=0, measure_speed=False, progress=False)
    mine = tmp_path / "pruned"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    report.save(mine)
    first = (mine / "report.json").read_bytes()
    report.save(mine, model_card=True)  # its own files again, and a card where there was none
    assert (mine / "report.json").read_bytes() == first and (mine / "README.md").is_file()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.md").write_text("a report of my own")
    with pytest.raises(FileExistsError, match="report.md, which dip_ext did not write"):
        report.save(theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["report.md"]
    assert (theirs / "report.md").read_text() == "a report of my own" and (mine / "notes.md").read_text() == "mine"
    (mine / "README.md").unlink()
    (mine / "README.md").write_text("my card")  # replaced by the user: no longer dip_ext's to overwrite
    report.save(mine)
    with pytest.raises(FileExistsError, match="README.md"):
        report.save(mine, model_card=True)
    assert (mine / "README.md").read_text() == "my card"


# ---- permissions --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_honour_the_umask(tmp_path, tiny, word_text, capsys, umask):
    dense, _ = tiny
    old = os.umask(umask)
    try:
        files.atomic_write_text(tmp_path / "plain.txt", "x")
        out = tmp_path / "out"
        assert run_cli(capsys, *prune_argv(dense, word_text, out))[0] == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(out) == 0o777 & ~umask
    for name in ("config.json", "modeling_dip_ext.py", "report.json", "report.md", "widths.png", OUTPUT_MARKER,
                 "model.safetensors"):
        assert mode(out / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "out-work" / "calibration.safetensors") == 0o666 & ~umask
    os.umask(umask)
    try:  # the Python API's save of a compacted model, outside any command
        dip_ext.from_pretrained(out).save_pretrained(tmp_path / "api")
    finally:
        os.umask(old)
    for name in ("config.json", "modeling_dip_ext.py", "model.safetensors"):
        assert mode(tmp_path / "api" / name) == 0o666 & ~umask, name



# ---- ready to publish ---------------------------------------------------------------------------------------

def _text_files(folder: Path) -> dict:
    return {p.name: p.read_text() for p in folder.iterdir() if p.suffix in (".json", ".md", ".py", ".txt")}


def test_prune_output_is_ready_to_publish(capsys, tmp_path, tiny, word_text):
    dense, _ = tiny
    out = tmp_path / "published"
    argv = prune_argv(dense, word_text, out, "--eval-windows", 1, "--eval-text", word_text, "--eval-seq-len", 16,
                      "--recover", "distill", "--recover-steps", 1, "--val-windows", 2)
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "base_model" not in card  # a local base
    assert "## Measured quality" in card and f"| file:{text_path(word_text).name} |" in card
    report = json.loads((out / "report.json").read_text())
    columns = "| text | dense | pruned |" + (" recovered |" if report["perplexity_recovered"] else "")
    assert columns + "\n" in card and "dip_ext.from_pretrained" in card
    for name, text in _text_files(out).items():
        assert str(tmp_path) not in text and str(Path.home()) + "/" not in text, name
    assert report["model"] == "dense" and report["calibration"] == f"file:{text_path(word_text).name}"
    assert not (out / "work").exists() and str(out) in stdout  # the terminal still names the real folder


def test_recover_output_is_ready_to_publish(capsys, tmp_path, tiny, word_text):
    dense, pruned = tiny
    out = tmp_path / "recovered"
    code, _, err = run_cli(capsys, *recover_argv(pruned, dense, word_text, out, "--eval-windows", 1, "--eval-text",
                                                 word_text, "--eval-seq-len", 16))
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "after `distill` recovery" in card and "| text | dense | pruned | recovered |" in card
    for name, text in _text_files(out).items():
        assert str(tmp_path) not in text, name


def test_loading_without_dip_ext_says_how_to_install_it(tmp_path, tiny):
    """transformers would advise `pip install dip_ext`, a name no registry serves; the shim says what works."""
    _, pruned = tiny
    code = ("import sys; sys.modules['dip_ext'] = None\n"  # dip_ext cannot be imported in this process
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(pruned)!r}, trust_remote_code=True)\n")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "pip install --no-build-isolation <dip_ext source folder>" in proc.stderr, proc.stderr[-2000:]
    assert "Run `pip install dip_ext`" not in proc.stderr
