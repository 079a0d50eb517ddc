"""Data-parallel distillation under torch.distributed (gloo, 2 CPU processes, tiny random Llama).

The workers run THIS file as a script (``python tests/test_recovery_distributed.py OUT``) with the environment
torchrun gives them, as in tests/test_distributed.py. Each rank holds the whole student and takes every other window
of each step's global batch; the gradients are summed over the ranks. Compared with one process running the same
global batch (2 windows) and seed: both ranks end bit-identical to each other, and equal to the one-process run to
rounding (the gradient of a window is the same; only the order of the two windows' sum differs).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

STEPS = 4


def run(out: Path, tag: str):
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from test_recovery import config, pair, windows

    from dip_ext.recovery import recover

    student, teacher = pair()
    work = out / ("work-single" if tag == "single" else "work-dp")  # the ranks share one work folder
    result = recover(student, teacher, windows(8, 1), windows(3, 2), config(recover_steps=STEPS), progress=False,
                     work_dir=work)
    save_file({n: p.detach().contiguous() for n, p in student.named_parameters()}, str(out / f"{tag}.safetensors"))
    curve = [(c["step"], c["val_loss"]) for c in result.curve]  # seconds differ by nature
    (out / f"{tag}.json").write_text(json.dumps({"losses": result.distillation["losses"], "curve": curve}))


def worker(out: Path) -> None:
    from dip_ext import distributed as D

    torch.set_num_threads(1)
    assert D.init_from_env() and D.world_size() == 2
    with D.fail_fast():
        run(out, f"rank{D.rank()}")
        D.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------- the tests
import pytest  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file

    codes, errs = _launch(tmp_path)
    assert codes == [0, 0], errs
    torch.set_num_threads(1)
    run(tmp_path, "single")
    single = json.loads((tmp_path / "single.json").read_text())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert [s for s, _ in ranks[0]["losses"]] == [s for s, _ in single["losses"]] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(ranks[0]["losses"] + ranks[0]["curve"], single["losses"] + single["curve"]):
        assert a == pytest.approx(b, rel=1e-5)
    w0, w1, ws = (load_file(str(tmp_path / f"{t}.safetensors")) for t in ("rank0", "rank1", "single"))
    for name in ws:
        assert torch.equal(w0[name], w1[name]), name
        torch.testing.assert_close(w0[name], ws[name], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "work-dp" / "distill.safetensors").is_file()  # rank 0 wrote the checkpoint


def _launch(out: Path):
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DIP_EXT_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 300
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    return [p.returncode for p in procs], [p.stderr.read() for p in procs]
