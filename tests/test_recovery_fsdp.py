"""Recovery with the dense teacher sharded by FSDP2 (gloo, 2 CPU processes, tiny random Llama).

The workers run THIS file as a script (``python tests/test_recovery_fsdp.py SCENARIO OUT``, launched as in
tests/test_distributed.py). Every rank holds the whole student and one shard of the teacher, so each teacher forward
is a collective that both ranks run in step. Compared with one process holding the whole teacher and running the
same global batch (4 windows, micro-batches of 1): both ranks end bit-identical to each other, and equal to the
one-process run to rounding (the two ranks' gradients are summed after the backward, in another order).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

STEPS = 3


def options(**kw):
    from test_recovery import config

    return config(**{**dict(recover_steps=STEPS, recover_batch=4, recover_hidden_weight=0.1), **kw})


def distill_and_save(out: Path, tag: str, student, teacher) -> None:
    """Recovers ``student`` toward ``teacher``; writes its weights and its losses / held-out curve under ``tag``."""
    from safetensors.torch import save_file
    from test_recovery import windows

    from dip_ext.recovery import recover

    result = recover(student, teacher, windows(8, 1), windows(3, 2), options(), progress=False,
                     work_dir=out / ("work-single" if tag == "single" else "work-fsdp"))
    save_file({n: p.detach().contiguous() for n, p in student.named_parameters()}, str(out / f"{tag}.safetensors"))
    curve = [(c["step"], c["val_loss"]) for c in result.curve]
    (out / f"{tag}.json").write_text(json.dumps({"losses": result.distillation["losses"], "curve": curve}))


def refusals(student, sharded, dense, rank: int) -> dict:
    """The message of each call a sharded teacher must refuse before any work (None: it did not refuse)."""
    from test_recovery import windows

    from dip_ext import Pruner, PruneConfig
    from dip_ext.config import EvalConfig
    from dip_ext.distributed import Placement
    from dip_ext.recovery import recover
    from dip_ext.recovery.distill import distill
    from dip_ext.recovery.reconstruct import reconstruct
    from dip_ext.sharding import replicate_from_main

    train, val = windows(8, 1), windows(3, 2)
    calls = {
        "uneven batch": lambda: recover(student, sharded, train, val, options(recover_batch=3), progress=False),
        "uneven micro-batches": lambda: distill(student, sharded, train, val,
                                                options(recover_batch=6, recover_micro_batch=2), progress=False),
        "reconstruct": lambda: recover(student, sharded, train, val, options(recover="reconstruct"), progress=False),
        "auto": lambda: recover(student, sharded, train, val, options(recover="auto"), progress=False),
        "reconstruct()": lambda: reconstruct(student, sharded, train, options(), progress=False),
        "teacher dtype": lambda: recover(student, sharded, train, val, options(recover_teacher_dtype="bfloat16"),
                                         progress=False),
        "sharded student": lambda: distill(student, sharded, train, val, options(), progress=False,
                                           placement=Placement("fsdp", rank, 2)),
        "pruner auto": lambda: Pruner(sharded, None, PruneConfig(method="oneshot"), recovery=options(recover="auto"),
                                      calibration_tokens=train, evaluation=EvalConfig(eval_windows=0),
                                      full_model=dense if rank == 0 else None, progress=False),
        "pruner calibration_self": lambda: Pruner(sharded, None, PruneConfig(method="oneshot", calibration_self=0.5),
                                                  recovery=options(), calibration_tokens=train,
                                                  evaluation=EvalConfig(eval_windows=0),
                                                  full_model=dense if rank == 0 else None, progress=False),
        "replicate nothing": lambda: replicate_from_main(None, "cpu"),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def replicate(out: Path, rank: int) -> dict:
    """Rank 0's compacted model (tied embeddings) replicated to both ranks; each writes its copy and its logits."""
    from safetensors.torch import save_file
    from test_recovery import pair, windows

    from dip_ext.sharding import replicate_from_main

    mine = pair(tie_word_embeddings=True)[0].train()
    replica = replicate_from_main(mine if rank == 0 else None, "cpu")
    with torch.no_grad():
        logits = replica(input_ids=windows(2, 5)).logits
    state = {n: t.detach().contiguous() for n, t in [*replica.named_parameters(), *replica.named_buffers()]}
    save_file({**state, "logits": logits}, str(out / f"replica.rank{rank}.safetensors"))
    return {"type": type(replica).__name__, "tied": replica.lm_head.weight is replica.model.embed_tokens.weight,
            "same object": replica is mine, "training": replica.training}


def fill_topk_cache(out: Path, rank: int, teacher) -> None:
    """Both ranks fill one top-k cache folder with uneven shares (rank 0: three windows, rank 1: one), so rank 1 must
    join rank 0's extra teacher forwards; then a top-k distillation toward the sharded teacher."""
    from test_recovery import VOCAB, pair, windows

    from dip_ext.recovery import recover
    from dip_ext.recovery.teacher_cache import TeacherTopK

    cache = TeacherTopK.for_teacher(out / "topk", teacher, windows(8, 1), 5, 1.0)
    filled = cache.fill(teacher, [0, 1, 2] if rank == 0 else [3], progress=False)
    student = pair()[0]
    result = recover(student, teacher, windows(8, 1), windows(3, 2),
                     options(recover_hidden_weight=0.0, recover_teacher_topk=VOCAB - 1), progress=False,
                     work_dir=out / "topk-run")
    (out / f"topk.rank{rank}.json").write_text(json.dumps({"filled": filled, "folder": cache.folder.name,
                                                            "losses": result.distillation["losses"]}))


def worker(scenario: str, out: Path) -> None:
    from test_recovery import pair

    from dip_ext import distributed as D
    from dip_ext.model_state import model_digest
    from dip_ext.sharding import shard_frozen_model

    torch.set_num_threads(1)
    assert D.init_from_env() and D.world_size() == 2 and scenario == "distill"
    r = D.rank()
    with D.fail_fast():
        student, dense = pair()
        sharded = shard_frozen_model(dense if r == 0 else None, dense.config, "cpu", torch.float32)
        before = model_digest(student)
        report = {"refusals": refusals(student, sharded, dense, r)}
        report["student untouched"] = model_digest(student) == before
        report["replica"] = replicate(out, r)
        (out / f"checks.rank{r}.json").write_text(json.dumps(report))
        distill_and_save(out, f"rank{r}", student, sharded)
        fill_topk_cache(out, r, sharded)
        D.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------- the tests
import pytest  # noqa: E402
from test_distributed import launch, torchrun_cli  # noqa: E402
from test_distributed import _cli_folder as cli_folder  # noqa: E402
from test_recovery import pair  # noqa: E402

import dip_ext  # noqa: E402
from dip_ext.cli import main  # noqa: E402
from dip_ext.recovery.checks import check_lockstep_batch  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    codes, errs = launch("distill", out, script=__file__)
    assert codes == [0, 0], errs
    return out


def test_distillation_toward_a_sharded_teacher_equals_one_process_with_the_whole_teacher(fsdp_run, tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    distill_and_save(tmp_path, "single", *pair())
    single = json.loads((tmp_path / "single.json").read_text())
    ranks = [json.loads((fsdp_run / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert [s for s, _ in ranks[0]["losses"]] == [s for s, _ in single["losses"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in ranks[0]["curve"]] == [s for s, _ in single["curve"]]
    for (_, a), (_, b) in zip(ranks[0]["losses"] + ranks[0]["curve"], single["losses"] + single["curve"]):
        assert a == pytest.approx(b, rel=1e-5)
    w0, w1, ws = (load_file(str(p)) for p in (fsdp_run / "rank0.safetensors", fsdp_run / "rank1.safetensors",
                                               tmp_path / "single.safetensors"))
    assert w0.keys() == ws.keys()
    for name in ws:
        assert torch.equal(w0[name], w1[name]), name
        torch.testing.assert_close(w0[name], ws[name], rtol=1e-4, atol=1e-5)
    assert (fsdp_run / "work-fsdp" / "distill.safetensors").is_file()  # rank 0 wrote the checkpoint


def test_a_sharded_teacher_fills_a_top_k_cache_in_step_and_trains_from_it(fsdp_run, tmp_path):
    from test_recovery import VOCAB, windows

    from dip_ext.recovery import recover
    from dip_ext.recovery.teacher_cache import TeacherTopK

    torch.set_num_threads(1)
    ranks = [json.loads((fsdp_run / f"topk.rank{r}.json").read_text()) for r in range(2)]
    assert [r["filled"] for r in ranks] == [3, 1]
    student, dense = pair()
    local = TeacherTopK.for_teacher(tmp_path, dense, windows(8, 1), 5, 1.0)
    assert local.folder.name == ranks[0]["folder"] == ranks[1]["folder"]  # the key does not depend on placement
    local.fill(dense, range(4), progress=False)
    shared = TeacherTopK(fsdp_run / "topk" / ranks[0]["folder"], windows(8, 1), 5, 1.0)
    got, want = shared.targets([0, 1, 2, 3]), local.targets([0, 1, 2, 3])
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-5, atol=1e-5)
    # top-(vocab - 1) targets from the sharded teacher train as the whole live teacher does in one process
    single = recover(student, dense, windows(8, 1), windows(3, 2), options(recover_hidden_weight=0.0), progress=False)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert [x for _, x in ranks[0]["losses"]] == pytest.approx([x for _, x in single.distillation["losses"]],
                                                               rel=1e-4)


def test_a_sharded_teacher_refuses_what_it_cannot_run_before_any_work(fsdp_run):
    checks = [json.loads((fsdp_run / f"checks.rank{r}.json").read_text()) for r in range(2)]
    assert checks[0]["refusals"] == checks[1]["refusals"]  # every rank refuses alike: none waits for another
    got = checks[0]["refusals"]
    for name in ("uneven batch", "uneven micro-batches"):
        assert "--recover-batch" in got[name] and "world size 2" in got[name] and "--recover-micro-batch" in got[name]
    assert "--recover-batch 4" in got["uneven batch"] and "--recover-batch 8" in got["uneven micro-batches"]
    for name in ("reconstruct", "auto", "reconstruct()", "pruner auto"):
        assert "use --recover distill with --fsdp" in got[name], name
    assert "--dtype" in got["teacher dtype"] and "sharded (FSDP) student" in got["sharded student"]
    assert "rank 0 must pass the model" in got["replicate nothing"]
    refused = got["pruner calibration_self"]
    assert refused == "calibration_self needs a whole dense model to write text: run it without FSDP"
    assert checks[0]["student untouched"] and checks[1]["student untouched"]


def test_replicated_model_is_rank_0s_on_every_rank(fsdp_run):
    from safetensors.torch import load_file

    checks = [json.loads((fsdp_run / f"checks.rank{r}.json").read_text())["replica"] for r in range(2)]
    assert checks[0] == {"type": "DipExtLlamaForCausalLM", "tied": True, "same object": True, "training": True}
    assert checks[1] == {**checks[0], "same object": False}
    r0, r1 = (load_file(str(fsdp_run / f"replica.rank{r}.safetensors")) for r in range(2))
    assert r0.keys() == r1.keys() and "model.rotary_emb.inv_freq" in r0
    assert all(torch.equal(r0[k], r1[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], r1[k])]


@pytest.mark.parametrize("batch, micro, world, ok", [(4, 1, 2, True), (4, 2, 2, True), (4, 8, 2, True),
                                                     (8, 2, 4, True), (3, 1, 2, False), (6, 2, 2, False),
                                                     (2, 1, 4, False)])
def test_lockstep_batch_rule(batch, micro, world, ok):
    if ok:
        check_lockstep_batch(batch, micro, world)
        return
    with pytest.raises(ValueError, match="--recover-batch") as e:
        check_lockstep_batch(batch, micro, world)
    check_lockstep_batch(int(str(e.value).split("e.g. --recover-batch ")[1].rstrip(")")), micro, world)


def test_recover_fsdp_without_torchrun_is_a_one_line_error(capsys, tmp_path):
    assert main(["recover", "--model", str(tmp_path), "--fsdp", "--recover", "distill"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--fsdp" in err and "torchrun" in err


@pytest.mark.slow  # two torchrun launches of the CLI and one in-process run: ~2 min on the 2-core CI machine
def test_prune_fsdp_with_distillation_and_recover_fsdp_under_torchrun(tmp_path, fresh_cache):
    folder, text = cli_folder(tmp_path)
    prune = ["prune", "--model", str(folder), "--calibration", text, "--seq-len", "16", "--calibration-windows", "6",
             "--method", "oneshot", "--no-speed", "--quiet", "--eval-text", text, "--eval-windows", "2",
             "--recover", "distill", "--recover-steps", "2", "--recover-batch", "2", "--recover-val-every", "1",
             "--recover-lr", "1e-2", "--eval-seq-len", "16", "--val-windows", "0", "--refit", "off",
             "--recover-data", "text", "--no-recover-autocast", "--recover-teacher-dtype", "same"]  # as sharded, fp32
    sharded = torchrun_cli(tmp_path, *prune, "--fsdp", "--out", str(tmp_path / "fsdp"))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout.count("saved the compacted model") == 1  # rank 0 alone reports and saves
    torch.set_num_threads(1)
    # One process, the whole dense model as teacher.
    assert main([*prune, "--out", str(tmp_path / "single")]) == 0
    got, want = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("fsdp", "single"))
    assert got["masks"] == want["masks"]
    losses = [[loss for _, loss in r["recovery"]["distillation"]["losses"]] for r in (got, want)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    ids = torch.randint(3, 13, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = [dip_ext.from_pretrained(tmp_path / d)(input_ids=ids).logits for d in ("fsdp", "single")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    # The saved model recovered again, its dense teacher sharded across the ranks.
    again = torchrun_cli(tmp_path, "recover", "--model", str(tmp_path / "fsdp"), "--teacher", str(folder), "--fsdp",
                         "--out", str(tmp_path / "again"), "--calibration", text, "--seq-len", "16",
                         "--val-windows", "4", "--recover", "distill", "--recover-steps", "2", "--recover-batch", "2",
                         "--eval-text", text, "--eval-windows", "2", "--eval-seq-len", "16", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("saved the recovered model") == 1
    record = json.loads((tmp_path / "again" / "recovery.json").read_text())
    shown = "file:" + Path(text[len("file:"):]).name  # a saved record names no local path
    assert math.isfinite(record["perplexity_dense"][shown]) and len(record["recovery"]["distillation"]["losses"]) == 2
    dip_ext.from_pretrained(tmp_path / "again")
