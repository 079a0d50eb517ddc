"""Data-parallel mask learning under torch.distributed (gloo, 2 CPU processes, tiny random Llama).

The worker processes run THIS file as a script (``python tests/test_distributed.py SCENARIO OUT``) with the
environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so they go
through ``dip_ext.distributed.init_from_env`` exactly as under ``torchrun``. Each process pays the
torch + transformers import (several seconds on the 2-core CI machine), so the 2-rank runs are shared by the
tests through module fixtures: one uninterrupted run, one run where rank 1 fails at step 3, one resume.

Tolerance, measured: the 2-rank hypernetwork ends with EXACTLY the masks of a one-process run of the same
global batch (2 windows) and seed, and the same kept ratio at every step. The numbers agree only to
rounding, because the two ranks' gradients are averaged after the backward instead of inside it: per-step LM
losses to 1e-5 relative, mask logits to 8e-6 absolute (on logits up to 7.6; AdamW's g / sqrt(v) magnifies the
rounding of near-zero gradients, so single GRU weights differ by up to 1.3e-4), calibration sums to float64
rounding (1e-10 relative asserted). Both ranks hold bit-identical results. A mask could differ from the
one-process run only where a logit + offset lies within ~1e-5 of the export threshold.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import tiny_llama

STEPS, CKPT_EVERY, FAIL_AT, SEED, LR = 5, 2, 3, 7, 0.05


def tiny_blocks():
    return torch.randint(0, 64, (7, 16), generator=torch.Generator().manual_seed(1))  # 7: an uneven last round


def tiny_val_blocks():
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2))  # 3: uneven across 2 ranks


def _train(model, blocks, out: Path, *, batch_size, resume=False, callback=None, log=None, report=None):
    from dip_ext.calibration import run_calibration
    from dip_ext.selection.budget import Budget
    from dip_ext.selection.hypernetwork import HypernetworkConfig, Trainer

    calib = run_calibration(model, blocks, progress=False, checkpoint=out / "calibration.safetensors",
                            checkpoint_every=3)
    config = HypernetworkConfig(steps=STEPS, lr=LR, batch_size=batch_size, checkpoint_every=CKPT_EVERY, val_every=2)
    trainer = Trainer(model, blocks, Budget.for_model(model, 0.5), config, seed=SEED, checkpoint_dir=out / "hnet",
                      resume=resume, progress=False, callback=callback, val_windows=tiny_val_blocks())
    masks, summary = trainer.run()
    log.extend(dataclasses.asdict(e) for e in trainer.log)
    report["val_history"] = [list(h) for h in summary.val_history]
    return calib, masks


def _save_grams(model, masks, path: Path) -> None:
    """The refit's input statistics under the learned masks (3 windows per forward: 2 + 1 batches over the
    two ranks, so a sharded run pads one rank with a filler forward)."""
    from safetensors.torch import save_file

    from dip_ext.refit import collect_input_grams

    grams = collect_input_grams(model, masks, tiny_blocks(), batch_size=3, progress=False)
    save_file({f"{i}.{s}": g for (i, s), g in grams.items()}, str(path))


def _load_grams(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def worker(scenario: str, out: Path) -> None:
    """One rank of a 2-process job; writes rank<R>.json (+ its calibration result) into ``out``."""
    from dip_ext import distributed as D

    torch.set_num_threads(1)
    assert D.init_from_env() and D.world_size() == 2
    r = D.rank()

    def fail(entry):
        if scenario == "fail" and r == 1 and entry.step == FAIL_AT:
            raise RuntimeError(f"injected failure at step {FAIL_AT}")

    log, report = [], {}
    with D.fail_fast():
        model = tiny_llama()
        if scenario == "fsdp":  # rank 0 holds the model, every rank a shard of it
            from dip_ext.sharding import shard_frozen_model

            model = shard_frozen_model(model if r == 0 else None, model.config, "cpu", torch.float32)
            assert D.is_sharded(model)
        calib, masks = _train(model, tiny_blocks(), out, batch_size=1, resume=scenario == "resume",
                              callback=fail, log=log, report=report)
        calib.save(out / f"calibration.rank{r}.safetensors")
        _save_grams(model, masks, out / f"grams.rank{r}.safetensors")
        (out / f"rank{r}.json").write_text(json.dumps({"masks": masks.to_dict(), "log": log,
                                                       "val_history": report["val_history"]}))
        D.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, nproc: int = 2, timeout: float = 150.0, script: str = __file__):
    """Runs ``nproc`` workers of ``script`` (``python SCRIPT SCENARIO OUT``; default: this file) like torchrun does
    (same env vars; once one fails the others get 15 s, then are killed). Returns ``(exit codes, stderr texts)``."""
    port = _free_port()
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DIP_EXT_DIST_TIMEOUT="60",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, script, scenario, str(out)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    deadline, failed_at = time.monotonic() + timeout, None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 15):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    return [p.returncode for p in procs], [p.stderr.read() for p in procs]


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------- the tests
import pytest  # noqa: E402

from dip_ext import distributed as D  # noqa: E402
from dip_ext.calibration import CalibrationResult  # noqa: E402
from dip_ext.families import adapter_for  # noqa: E402
from dip_ext.masks import DispMasks  # noqa: E402
from dip_ext.selection.hypernetwork import CHECKPOINT_NAME, HyperNetwork  # noqa: E402
from dip_ext.selection.hypernetwork import read_checkpoint as _read_checkpoint  # noqa: E402

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _results(out: Path):
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    calibs = [CalibrationResult.load(out / f"calibration.rank{r}.safetensors") for r in range(2)]
    return ranks, calibs


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    codes, errs = launch("full", out)
    assert codes == [0, 0], errs
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference: the same seed and the same global batch (2 windows per step)."""
    out = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)
    log, report = [], {}
    calib, masks = _train(tiny_llama(), tiny_blocks(), out, batch_size=2, log=log, report=report)
    return out, calib, masks, log, report


def test_helpers_without_process_group():
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0 and D.is_main()
    t = torch.arange(3.0)
    D.all_reduce_sum_([t, None])
    assert torch.equal(t, torch.arange(3.0))
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_object(5) == [5]
    D.barrier()
    D.check_same(1, "x")
    with pytest.raises(KeyError):  # alone, a failure is an ordinary exception
        with D.fail_fast():
            raise KeyError("k")


def test_sharding_needs_a_process_group():
    from dip_ext.sharding import shard_frozen_model

    model = tiny_llama()
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        shard_frozen_model(model, model.config, "cpu", torch.float32)
    assert not D.is_sharded(model)


def test_init_from_env_needs_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env() is False and not D.is_distributed()
    monkeypatch.setenv("DIP_EXT_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="DIP_EXT_DIST_TIMEOUT"):
        D._timeout()


def test_two_ranks_identical_and_match_one_process(full_run, single):
    (r0, r1), (c0, c1) = _results(full_run)
    # Both ranks: the same masks, the same (globally averaged) loss log, bit-identical calibration sums.
    assert r0["masks"] == r1["masks"]
    assert r0["log"] == [{**e, "seconds": r0["log"][i]["seconds"]} for i, e in enumerate(r1["log"])]
    for layer0, layer1 in zip(c0.scores, c1.scores):
        assert all(torch.equal(layer0[s], layer1[s]) for s in layer0)
    # Against one process with the same global batch and seed.
    s_out, s_calib, s_masks, s_log, s_report = single
    assert DispMasks.from_dict(r0["masks"]) == s_masks
    assert [e["step"] for e in r0["log"]] == list(range(1, STEPS + 1))
    for a, b in zip(r0["log"], s_log):
        assert a["kept_ratio"] == b["kept_ratio"]
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
    # Validation (3 windows dealt 2 + 1 over the ranks) at steps 0, 2, 4 and the last: the one-process losses.
    assert [h[0] for h in r0["val_history"]] == [0, 2, 4, STEPS] == [h[0] for h in s_report["val_history"]]
    assert [h[1] for h in r0["val_history"]] == pytest.approx([h[1] for h in s_report["val_history"]], rel=1e-5)
    assert c0.windows == s_calib.windows == 7 and c0.losses == pytest.approx(s_calib.losses, rel=1e-6)
    for layer0, layer_s in zip(c0.scores, s_calib.scores):
        for s in layer0:
            torch.testing.assert_close(layer0[s], layer_s[s], rtol=1e-10, atol=0)
    torch.testing.assert_close(c0.tied_hidden, s_calib.tied_hidden, rtol=1e-10, atol=0)
    for point, per_layer in c0.stats.items():
        for st, st_s in zip(per_layer, s_calib.stats[point]):
            assert st.count == st_s.count
            torch.testing.assert_close(st.sumsq, st_s.sumsq, rtol=1e-10, atol=0)
    # Rank 0's final checkpoint: the same hypernetwork as the one-process run, to float32 rounding.
    t2, meta2 = _read_checkpoint(full_run / "hnet" / CHECKPOINT_NAME)
    t1, meta1 = _read_checkpoint(s_out / "hnet" / CHECKPOINT_NAME)
    assert meta2["step"] == meta1["step"] == STEPS and meta2["fingerprint"] == meta1["fingerprint"]
    logits = []
    for t in (t1, t2):
        h = HyperNetwork(adapter_for(tiny_llama()).dims(tiny_llama().config))
        h.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("hnet.")})
        with torch.no_grad():
            logits.append(torch.cat([layer[s] for layer in h() for s in layer]))
    # Measured 8e-6 on logits up to 7.6 (AdamW's g / sqrt(v) magnifies rounding on near-zero gradients:
    # single GRU weights differ by up to 1.3e-4, the logits far less).
    assert float((logits[0] - logits[1]).abs().max()) < 1e-4
    # The refit's statistics: identical on both ranks, the one-process sums to rounding.
    g0, g1 = (_load_grams(full_run / f"grams.rank{r}.safetensors") for r in range(2))
    _save_grams(tiny_llama(), s_masks, s_out / "grams.safetensors")
    gs = _load_grams(s_out / "grams.safetensors")
    assert g0.keys() == g1.keys() == gs.keys() and len(gs) > 0
    for k in gs:
        assert torch.equal(g0[k], g1[k])
        torch.testing.assert_close(g0[k], gs[k], rtol=1e-5, atol=1e-6)  # fp32 forwards, other batches


def test_fsdp_sharded_model_matches_data_parallel(full_run, tmp_path):
    """The frozen model sharded with FSDP2 over the 2 ranks (gloo, CPU): the same calibration, losses and masks
    as the 2-rank data-parallel run with a full copy per rank (forwards run in lockstep, including the uneven
    last calibration round and validation split)."""
    codes, errs = launch("fsdp", tmp_path)
    assert codes == [0, 0], errs
    (f0, f1), (fc0, fc1) = _results(tmp_path)
    (d0, _), (dc0, _) = _results(full_run)
    assert f0["masks"] == f1["masks"] == d0["masks"]
    # The checkpoint's weight digest: the sharded model's (parameters gathered whole) is the full copy's.
    fp_f = _read_checkpoint(tmp_path / "hnet" / CHECKPOINT_NAME)[1]["fingerprint"]
    fp_d = _read_checkpoint(full_run / "hnet" / CHECKPOINT_NAME)[1]["fingerprint"]
    assert fp_f["weights"] == fp_d["weights"] and fp_f == fp_d
    assert [e["lm_loss"] for e in f0["log"]] == pytest.approx([e["lm_loss"] for e in d0["log"]], rel=1e-5)
    assert [h[0] for h in f0["val_history"]] == [h[0] for h in d0["val_history"]]
    assert [h[1] for h in f0["val_history"]] == pytest.approx([h[1] for h in d0["val_history"]], rel=1e-5)
    assert fc0.windows == dc0.windows == 7 and fc0.losses == pytest.approx(dc0.losses, rel=1e-5)
    for layer_f, layer_d in zip(fc0.scores, dc0.scores):
        for s in layer_f:
            torch.testing.assert_close(layer_f[s], layer_d[s], rtol=1e-4, atol=1e-12)
    gf, gd = (_load_grams(d / "grams.rank0.safetensors") for d in (tmp_path, full_run))
    assert gf.keys() == gd.keys() and len(gf) > 0
    for k in gf:  # the filler forward of the rank with fewer batches added nothing
        torch.testing.assert_close(gf[k], gd[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two more 2-process launches: ~45 s on the 2-core CI machine
def test_failing_rank_stops_the_job_and_resume_matches(full_run, tmp_path):
    codes, errs = launch("fail", tmp_path)
    assert codes[1] == 1 and codes[0] != 0, (codes, errs)
    assert f"dip_ext: rank 1 failed: RuntimeError: injected failure at step {FAIL_AT}" in errs[1]
    assert "dip_ext: rank 0 failed" in errs[0]  # its peer vanished: rank 0 leaves too, it does not hang
    # What is on disk is complete and consistent: the checkpoint both ranks had reached, no temp files.
    ckpt = tmp_path / "hnet" / CHECKPOINT_NAME
    assert _read_checkpoint(ckpt)[1]["step"] == CKPT_EVERY * (FAIL_AT // CKPT_EVERY)
    assert sorted(p.name for p in (tmp_path / "hnet").iterdir()) == [CHECKPOINT_NAME]
    assert CalibrationResult.load(tmp_path / "calibration.safetensors").windows == 7
    assert not (tmp_path / "rank0.json").exists()
    codes, errs = launch("resume", tmp_path)
    assert codes == [0, 0], errs
    (r0, r1), _ = _results(tmp_path)
    (full0, _), _ = _results(full_run)
    assert r0["masks"] == r1["masks"] == full0["masks"]
    assert [e["step"] for e in r0["log"]] == list(range(CKPT_EVERY * (FAIL_AT // CKPT_EVERY) + 1, STEPS + 1))
    assert [e["lm_loss"] for e in r0["log"]] == [e["lm_loss"] for e in full0["log"][-len(r0["log"]):]]


def _cli_folder(root: Path) -> tuple[Path, str]:
    """A tiny Llama folder with a word-level tokenizer, and a file: calibration text over its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "one two three four five six seven eight nine ten".split()
    table = dict({"<unk>": 0, "<s>": 1, "</s>": 2}, **{w: 3 + i for i, w in enumerate(words)})
    core = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = root / "model"
    tiny_llama().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(folder)
    g = torch.Generator().manual_seed(3)
    text = root / "calib.txt"
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (400,), generator=g)))
    return folder, f"file:{text}"


def torchrun_cli(root: Path, *argv: str):
    """``torchrun --nproc_per_node=2 -m dip_ext ARGV`` (its cache in ``root``); the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "dip_ext", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", DIP_EXT_CACHE=str(root / "cache"), DIP_EXT_DIST_TIMEOUT="60")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _torchrun(root: Path, folder: Path, text: str, out: str, *extra):
    return torchrun_cli(root, "prune", "--model", str(folder), "--calibration", text, "--seq-len", "16",
                        "--calibration-windows", "6", "--eval-windows", "0", "--no-speed", "--quiet", "--out",
                        str(root / out), "--method", "hypernetwork", "--refit", "auto", "--recover", "off", *extra)


@pytest.mark.slow  # four torchrun launches of the CLI: ~100 s on the 2-core CI machine
def test_cli_under_torchrun_and_resume(tmp_path):
    folder, text = _cli_folder(tmp_path)
    full = _torchrun(tmp_path, folder, text, "full", "--steps", "4")
    assert full.returncode == 0, full.stderr[-3000:]
    assert full.stdout.count("saved the compacted model") == 1  # rank 0 alone reports and saves
    part = _torchrun(tmp_path, folder, text, "part", "--steps", "2")
    assert part.returncode == 0, part.stderr[-3000:]
    resumed = _torchrun(tmp_path, folder, text, "part", "--steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, meta = _read_checkpoint(tmp_path / "part-work" / "hypernetwork" / CHECKPOINT_NAME)
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["fingerprint"]["batch_size"] == 2
    sharded = _torchrun(tmp_path, folder, text, "fsdp", "--steps", "4", "--fsdp", "--eval-windows", "2",
                        "--eval-text", text)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("full", "part", "fsdp")]
    assert reports[0]["masks"] == reports[1]["masks"] == reports[2]["masks"]
    shown = "file:" + Path(text[len("file:"):]).name  # a saved report names no local path
    ppl = reports[2]["perplexity_before"][shown], reports[2]["perplexity_after"][shown]
    assert all(math.isfinite(v) and v > 1 for v in ppl)  # scored on the sharded model, then on the compacted one
    import dip_ext

    dip_ext.from_pretrained(tmp_path / "part")  # the saved model loads
