"""The dip-ext command line: help, one-line usage errors (exit 2), info, and end-to-end pruning of tiny Llama /
OPT / Phi folders (with an offline word-level tokenizer and a file: text); one slow run on the real SmolLM2."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PhiConfig, PhiForCausalLM

import dip_ext
from dip_ext import zoo
from dip_ext.prune import prune_and_compact

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")

VOCAB = 64
PRUNE_OPTIONS = ("--model", "--method", "--ratio", "--ratio-of", "--calibration", "--calibration-windows",
                 "--seq-len", "--steps", "--multiple-of", "--seed", "--out", "--overwrite", "--resume", "--device",
                 "--dtype", "--eval-windows", "--eval-text", "--no-speed", "--quiet")


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield one_thread


@pytest.fixture(autouse=True)
def _cache(request, tmp_path, monkeypatch):
    if request.node.get_closest_marker("slow") is None:  # the slow test uses the real cache (model, texts)
        monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))


FAMILIES = {  # 256 positions: the CLI scores perplexity on windows of up to 256 tokens
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "opt": lambda: OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=256, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phi": lambda: PhiForCausalLM(PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, word_tokenizer):
    """A Hugging Face folder (config, safetensors, tokenizer) per family."""
    out = {}
    for family, make in FAMILIES.items():
        torch.manual_seed(0)
        model = make().eval()
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        word_tokenizer.save_pretrained(path)
        out[family] = path
    return out


def tiny_prune_args(folder, word_text, out, *extra):
    """A quick ``dip-ext prune`` of a tiny model: no recovery unless ``extra`` asks for it (a later flag wins)."""
    return ("prune", "--model", folder, "--calibration", word_text, "--seq-len", 16, "--calibration-windows", 4,
            "--eval-text", word_text, "--eval-windows", 1, "--eval-seq-len", 16, "--no-speed", "--quiet", "--out", out,
            "--recover", "off", *extra)


# ------------------------------------------------------------------------------------- help and usage

def test_help(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(c in out for c in ("prune", "eval", "info"))
    code, out, _ = run_cli(capsys, "prune", "--help")
    assert code == 0
    for option in PRUNE_OPTIONS:
        assert option in out, option
    assert all(m in out for m in ("hypernetwork", "oneshot", "dependent", "decoder_linear", "total", "file:PATH"))
    code, out, _ = run_cli(capsys, "eval", "--help")
    assert code == 0
    for option in ("--model", "--text", "--seq-len", "--max-windows", "--device", "--dtype"):
        assert option in out, option


@pytest.mark.parametrize("argv, match", [
    (("prune", "--ratio", "1.5"), "ratio must be a finite number in (0, 1)"),
    (("prune", "--ratio", "0"), "ratio must be a finite number in (0, 1)"),
    (("prune", "--ratio", "-0.2"), "ratio must be a finite number in (0, 1)"),
    (("prune", "--ratio", "abc"), "invalid float value"),
    (("prune", "--method", "magic"), "invalid choice"),
    (("prune", "--method", "hypernetwork", "--steps", "-1"), "steps must be an integer >= 0"),
    (("prune", "--calibration-windows", "0"), "must be an integer >= 1"),
    (("prune", "--multiple-of", "x"), "invalid int value"),
    (("prune", "--ratio-of", "params"), "invalid choice"),
    (("prune", "--dtype", "int8"), "invalid choice"),
    (("prune", "--bogus"), "unrecognized arguments"),
    (("prune", "--method", "hypernetwork", "--lr", "0"), "lr must be a finite number > 0"),
    (("prune", "--method", "hypernetwork", "--lam", "inf"), "lam must be a finite number >= 0"),
    (("prune", "--method", "hypernetwork", "--margin", "-1"), "margin must be a finite number > 0"),
    (("prune", "--distill", "yes"), "unrecognized arguments"),
    (("prune", "--refit-damping", "0"), "refit_damping must be a finite number > 0"),
    (("prune", "--refit", "yes"), "invalid choice"),
    (("prune", "--method", "hypernetwork", "--val-every", "0"), "val_every must be an integer >= 1"),
    (("prune", "--method", "hypernetwork", "--batch-size", "0"), "batch_size must be an integer >= 1"),
    (("prune", "--method", "hypernetwork", "--decay-steps", "0"), "decay_steps must be an integer >= 1"),
    (("prune", "--lr-schedule", "linear"), "invalid choice"),
    (("frobnicate",), "invalid choice"),
    ((), "required"),
])
def test_bad_argument_is_one_line_exit_2(capsys, argv, match):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dip-ext") and match in err, err


@pytest.mark.parametrize("extra, match", [
    (("--calibration", "c4"), "unknown text 'c4'"),
    (("--calibration", "file:/nonexistent/t.txt"), "does not exist"),
    (("--eval-text", "c4"), "unknown text 'c4'"),
    (("--model", "/nonexistent/model"), "does not exist"),
    (("--fsdp",), "launch with torchrun"),
    (("--method", "hypernetwork", "--lr-schedule", "cosine-tail"), "needs decay_steps"),
    (("--method", "hypernetwork", "--lr-schedule", "cosine-tail", "--decay-steps", "300", "--steps", "200"), "must not exceed steps (200)"),
    (("--method", "hypernetwork", "--decay-steps", "50"), "only for lr_schedule 'cosine-tail'"),
])
def test_bad_input_after_parsing_is_one_line_exit_2(capsys, tmp_path, word_text, extra, match):
    argv = ["prune", "--calibration", word_text, "--eval-text", word_text, "--out", tmp_path / "out", *extra]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "out").exists()


def test_eval_bad_input_is_one_line_exit_2(capsys, folders, monkeypatch):
    code, _, err = run_cli(capsys, "eval", "--model", folders["opt"], "--text", "c4", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "unknown text 'c4'" in err, err

    import transformers

    def offline(*args, **kwargs):  # what from_pretrained raises for a hub id without network
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    code, _, err = run_cli(capsys, "eval", "--model", "nobody-here/no-model", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "could not load 'nobody-here/no-model'" in err, err


def test_bad_argument_subprocess():
    proc = subprocess.run([sys.executable, "-m", "dip_ext", "prune", "--ratio", "2"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "ratio must be a finite number in (0, 1)" in proc.stderr, proc.stderr


def test_existing_output_folder(capsys, tmp_path, word_text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "prune", "--calibration", word_text, "--out", out)
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err and "exists" in err
    code, _, err = run_cli(capsys, "prune", "--calibration", word_text, "--out", out, "--overwrite", "--resume")
    assert code == 2 and "contradict" in err
    assert (out / "keep.txt").read_text() == "mine"  # refused without touching it


def test_info(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, "info", "--no-assets")
    assert code == 0 and json.loads(out) == {"build": json.loads(json.dumps(dip_ext.build_info()))}
    # the offline assets: what is there, and for what is missing, what to run
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    code, out, _ = run_cli(capsys, "info")
    assets = json.loads(out)["offline assets"]
    assert code == 0 and assets["default model"].startswith("missing:") and zoo.PIP_COMMAND in assets["default model"]
    assert set(assets) == {"default model", "text wiki", "text ptb", "text shakespeare"}


# ------------------------------------------------------------------------------------------ end to end

@pytest.mark.parametrize("family", FAMILIES)
def test_prune_end_to_end(capsys, folders, word_text, tmp_path, family):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *tiny_prune_args(folders[family], word_text, out, "--method", "oneshot",
                                                         "--ratio", "0.3"))
    assert code == 0, err
    assert "saved the compacted model" in stdout and err == ""  # --quiet: no progress bars
    for name in ("config.json", "model.safetensors", "tokenizer.json", "report.json", "report.md", "widths.png"):
        assert (out / name).is_file(), name
    report = dip_ext.PruneReport.load(out)
    assert report.method == "oneshot" and report.ratio == 0.3 and report.model == folders[family].name
    shown = f"file:{Path(word_text[5:]).name}"  # the report in the folder names no local path
    assert report.calibration == shown and report.configs.prune.calibration == shown
    assert report.windows["calibration"] == report.configs.prune.calibration_windows == 4
    assert all(math.isfinite(getattr(report, k)[shown]) for k in ("perplexity_before", "perplexity_after"))
    assert report.budget["kept_decoder_linear"] == report.params_after.decoder_linear < \
        report.params_before.decoder_linear

    # the saved output == the same pruning in-process
    reloaded = dip_ext.from_pretrained(out)
    assert dip_ext.is_compacted(reloaded)
    model, tok = zoo.resolve_model(folders[family])
    model, same = prune_and_compact(model, tok, ratio=0.3, calibration=word_text, method="oneshot", seq_len=16,
                                    calibration_windows=4, eval_texts=(), measure_speed=False, progress=False,
                                    recover="off")
    assert same.masks == report.masks
    ids = torch.randint(3, 3 + 17, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)

    # dip-ext eval on the output prints the perplexity of the reloaded model
    code, stdout, err = run_cli(capsys, "eval", "--model", out, "--text", word_text, "--seq-len", 16,
                                "--max-windows", 2, "--quiet")
    assert code == 0, err
    got = json.loads(stdout)
    expect = dip_ext.eval.perplexity(reloaded, tok, word_text, seq_len=16, max_windows=2, progress=False)
    assert got["text"] == word_text and got["perplexity"] == pytest.approx(expect, rel=1e-6)


def test_overwrite_replaces(capsys, folders, word_text, tmp_path):
    out = tmp_path / "out"
    assert run_cli(capsys, *tiny_prune_args(folders["llama"], word_text, out, "--method", "dependent"))[0] == 0
    # a file dip_ext did not write is never deleted: --overwrite refuses the folder while it is there
    (out / "notes.txt").write_text("mine")
    again = tiny_prune_args(folders["llama"], word_text, out, "--method", "oneshot", "--ratio", "0.5", "--overwrite")
    code, _, err = run_cli(capsys, *again)
    assert code == 2 and err.count("\n") == 1 and "notes.txt" in err and "did not write" in err, err
    assert (out / "notes.txt").read_text() == "mine"
    assert dip_ext.PruneReport.load(out).method == "dependent"
    (out / "notes.txt").unlink()
    code, _, err = run_cli(capsys, *again)
    assert code == 0, err
    report = dip_ext.PruneReport.load(out)
    assert report.method == "oneshot" and report.ratio == 0.5
    assert dip_ext.param_report(dip_ext.from_pretrained(out)).removed_decoder_linear >= 0.5 - 1e-3


def test_resume_continues_hypernetwork(capsys, folders, word_text, tmp_path, monkeypatch):
    """--steps 2, then --resume --steps 4 gives what one --steps 4 run gives, and runs only what was left: no
    calibration window again, two training steps (counted as forwards of the loaded model) and the validation
    at the last step (3 held-out windows: one forward)."""
    forwards = []
    resolve = zoo.resolve_model

    def counting(*args, **kwargs):
        model, tok = resolve(*args, **kwargs)
        model.register_forward_hook(lambda *_: forwards.append(1))
        return model, tok

    monkeypatch.setattr(zoo, "resolve_model", counting)
    hn = ("--method", "hypernetwork", "--ratio", "0.4", "--eval-windows", "0", "--val-windows", "3", "--refit", "off")
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert run_cli(capsys, *tiny_prune_args(folders["llama"], word_text, out, *hn, "--steps", "2"))[0] == 0
    assert len(forwards) == 4 + 2 + 2  # 4 calibration windows, 2 steps of one window, validation at steps 0, 2
    two = dip_ext.PruneReport.load(out)
    forwards.clear()
    code, _, err = run_cli(capsys, *tiny_prune_args(folders["llama"], word_text, out, *hn, "--steps", "4", "--resume"))
    assert code == 0, err
    assert len(forwards) == 2 + 1
    assert run_cli(capsys, *tiny_prune_args(folders["llama"], word_text, ref, *hn, "--steps", "4"))[0] == 0
    resumed, fresh = (dip_ext.PruneReport.load(d) for d in (out, ref))
    # resuming with other calibration windows would mix two runs: refused in one line
    code, _, err = run_cli(capsys, *tiny_prune_args(folders["llama"], word_text, out, *hn, "--steps", "4",
                                                    "--resume", "--calibration-windows", "6"))
    assert code == 2 and err.count("\n") == 1 and "calibration_windows: checkpoint 4 vs now 6" in err, err
    assert two.configs.method_options.steps == 2 and resumed.configs.method_options.steps == 4
    assert resumed.windows["val"] == 3 and resumed.selection.start_step == 2 and resumed.resumed
    assert resumed.masks == fresh.masks
    assert dip_ext.from_pretrained(out).config.disp_masks == dip_ext.from_pretrained(ref).config.disp_masks
    assert resumed.configs.method_options.to_dict() == {"steps": 4, "val_every": 50, "batch_size": 1, "lr": 1e-3,
                                                  "lam": 16.0, "distill": False, "margin": 3.0,
                                                  "lr_schedule": "constant", "decay_steps": None,
                                                  "weight_decay": 0.05, "temperature": 0.4, "offset": 3.0,
                                                  "checkpoint_every": 50}


def test_hypernetwork_options_reach_the_run(capsys, folders, word_text, tmp_path):
    args = ("--method", "hypernetwork", "--ratio", "0.4", "--eval-windows", "0", "--val-windows", "2", "--steps", "3",
            "--distill", "--margin", "1.5", "--lr", "0.01", "--val-every", "1", "--lr-schedule", "cosine",
            "--refit", "auto")
    code, _, err = run_cli(capsys, *tiny_prune_args(folders["llama"], word_text, tmp_path / "out", *args))
    assert code == 0, err
    report = dip_ext.PruneReport.load(tmp_path / "out")
    assert report.configs.method_options.to_dict() == {"steps": 3, "val_every": 1, "batch_size": 1, "lr": 0.01,
                                                 "lam": 16.0, "distill": True, "margin": 1.5,
                                                 "lr_schedule": "cosine", "decay_steps": None,
                                                 "weight_decay": 0.05, "temperature": 0.4, "offset": 3.0,
                                                 "checkpoint_every": 50}
    assert [s for s, _ in report.selection.val_history] == [0, 1, 2, 3]
    # the refit (auto) chose among its candidates on the same 2 held-out windows
    refit = report.refit
    assert refit.mode == "auto" and len(refit.candidates) == 7
    assert refit.val_loss[1] == min(c.val_loss for c in refit.candidates)


def test_refit_option_reaches_the_run(capsys, folders, word_text, tmp_path):
    args = ("--method", "oneshot", "--ratio", "0.4", "--eval-windows", "0", "--refit", "on", "--refit-damping", "0.5")
    code, stdout, err = run_cli(capsys, *tiny_prune_args(folders["llama"], word_text, tmp_path / "out", *args))
    assert code == 0, err
    report = dip_ext.PruneReport.load(tmp_path / "out")
    refit = report.refit
    assert refit.mode == "on" and refit.damping == 0.5 and refit.structures == ["mlp_mid"]
    assert refit.weights > 0 and refit.passes == 1 and "refit" in report.seconds
    assert "Refit (on):" in stdout
    args = ("--method", "oneshot", "--ratio", "0.4", "--eval-windows", "0", "--refit", "off")
    code, stdout, err = run_cli(capsys, *tiny_prune_args(folders["llama"], word_text, tmp_path / "off", *args))
    assert code == 0 and dip_ext.PruneReport.load(tmp_path / "off").refit is None


# ---------------------------------------------------------------------------------------- integration

@pytest.mark.slow
def test_prune_default_model_end_to_end(capsys, tmp_path, one_thread):
    """The README's main job on the real SmolLM2-135M: one-shot, 20 %, small calibration; output reloads."""
    torch.set_num_threads(one_thread)
    try:
        zoo.resolve_model(None)  # converts the GGUF once if needed: not part of the timed run
    except ImportError as e:
        pytest.skip(f"default model not installed: {e}")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code, stdout, err = run_cli(capsys, "prune", "--recover", "off", "--method", "oneshot", "--ratio", "0.2",
                                "--calibration-windows", 8,
                                "--eval-windows", 2, "--seq-len", 128, "--no-speed", "--out", out, "--quiet")
    seconds = time.perf_counter() - t0
    assert code == 0, err
    report = dip_ext.PruneReport.load(out)
    ppl = report.perplexity_after
    assert set(ppl) == {"wiki", "ptb", "shakespeare"} and all(math.isfinite(v) for v in ppl.values())
    assert report.budget["removed_fraction_decoder_linear"] == pytest.approx(0.2, abs=2e-3)
    model, tok = zoo.resolve_model(out)
    assert dip_ext.is_compacted(model)
    again = dip_ext.eval.perplexity(model, tok, "ptb", seq_len=128, max_windows=1, progress=False)
    assert math.isfinite(again)
    with capsys.disabled():
        print(f"\n[dip-ext prune SmolLM2 oneshot 20 %] {seconds:.1f} s wall; perplexity before "
              f"{report.perplexity_before} after {ppl}; stages {report.seconds}")


def test_info_selftest_on_cpu(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, "info", "--no-assets", "--selftest", "--device", "cpu")
    assert code == 0 and "PASS" in out and "FAIL" not in out
    # a kernel that disagrees with its reference fails the self-test and the command
    from dip_ext import ops

    monkeypatch.setattr(ops, "scatter_add_", lambda residual, idx, y, **kw: residual)
    code, out, _ = run_cli(capsys, "info", "--no-assets", "--selftest", "--device", "cpu")
    assert code == 1 and "FAIL" in out
