"""Self-generated recovery data under torch.distributed (gloo, 2 CPU processes, tiny random Llama, word tokenizer).

The workers run THIS file as a script (``python tests/test_recovery_self_text_distributed.py SCENARIO OUT``) with the
environment torchrun gives them (``test_distributed.launch``). With a shared work folder, rank 0 samples and writes
every batch; rank 1 waits at the barrier and reads them, never generating (its ``generate`` raises). Both ranks end
with the windows one process samples alone, and a second distributed run reads the cache on both ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SEQ, WINDOWS = 16, 6


def sample(work_dir=None, forbid_generate: bool = False):
    """The self-generated windows of the tiny teacher (the same seed, prompts and options in every process)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_word_tokenizer, tiny_llama

    from dip_ext.recovery import RecoveryConfig
    from dip_ext.recovery.self_text import self_text_windows

    tokenizer = make_word_tokenizer()
    teacher = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=64)
    if forbid_generate:
        def no_generate(*args, **kwargs):
            raise AssertionError("this rank generated: only rank 0 may, the others read what it wrote")
        teacher.generate = no_generate
    text = torch.randint(3, len(tokenizer), (10, SEQ), generator=torch.Generator().manual_seed(0))
    config = RecoveryConfig(recover="distill", recover_data="self", recover_self_batch=4, recover_self_prompt_len=4)
    return self_text_windows(teacher, tokenizer, text, WINDOWS, config, work_dir=work_dir, progress=False)


def worker(scenario: str, out: Path) -> None:
    from safetensors.torch import save_file

    from dip_ext import distributed as D

    torch.set_num_threads(1)
    assert D.init_from_env() and D.world_size() == 2
    with D.fail_fast():
        # first run: only rank 0 may generate; again: the cache is complete, so no rank may
        got = sample(out / "work", forbid_generate=scenario == "again" or D.rank() != 0)
        save_file({"windows": got.windows}, str(out / f"{scenario}.rank{D.rank()}.safetensors"))
        (out / f"{scenario}.rank{D.rank()}.json").write_text(json.dumps({"generated": got.generated_tokens}))
        D.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------- the tests
import pytest  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_rank_zero_generates_the_others_read_and_every_rank_gets_the_one_process_windows(tmp_path):
    from safetensors.torch import load_file
    from test_distributed import launch

    torch.set_num_threads(1)
    alone = sample().windows  # no work folder: one process samples everything itself
    for scenario in ("first", "again"):
        codes, errs = launch(scenario, tmp_path, script=__file__)
        assert codes == [0, 0], errs
        for r in range(2):
            windows = load_file(str(tmp_path / f"{scenario}.rank{r}.safetensors"))["windows"]
            assert torch.equal(windows, alone), (scenario, r)
        generated = [json.loads((tmp_path / f"{scenario}.rank{r}.json").read_text())["generated"] for r in range(2)]
        assert generated == ([generated[0], 0] if scenario == "first" else [0, 0]) and (
            scenario == "again" or generated[0] > 0)
    assert len(list((tmp_path / "work").glob("self-text-*/b*.safetensors"))) >= 2
