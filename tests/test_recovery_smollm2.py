"""Recovery on the real default model (SmolLM2-135M-Instruct, fp32, CPU): a short distillation of a randomly pruned
copy lowers its LM loss on held-out calibration windows."""

import copy

import pytest
import torch

import dip_ext
from dip_ext import STRUCTURES, DispMasks, zoo
from dip_ext.data import get_blocks
from dip_ext.eval import mean_window_loss
from dip_ext.recovery import RecoveryConfig, recover
from dip_ext.windows import split_calibration

pytestmark = pytest.mark.slow


def test_short_distillation_improves_held_out_loss():
    dense, tokenizer = zoo.load_default()
    dims = dip_ext.ModelDims(30, 576, 1536)
    g = torch.Generator().manual_seed(0)
    # 10 % of every set's dimensions dropped at random: a damaged model with room to recover
    masks = DispMasks([{s: torch.randperm(dims.size(s), generator=g)[:int(0.9 * dims.size(s))].sort().values
                        for s in STRUCTURES} for _ in range(dims.num_layers)])
    student = dip_ext.compact(copy.deepcopy(dense), masks)
    blocks = get_blocks(tokenizer, "wiki", "calibration", seq_len=128, n_blocks=40)
    windows = split_calibration(blocks, None, 4)
    before = mean_window_loss(student, windows.val)
    result = recover(student, dense, windows.train, windows.val,
                     RecoveryConfig(recover="distill", recover_steps=8, recover_batch=2, recover_lr=1e-4,
                                    recover_warmup=1, recover_val_every=4, recover_checkpoint_every=0),
                     progress=False)
    after = mean_window_loss(student, windows.val)
    assert result.chosen == ["distill"]
    assert after < before - 0.02, (before, after)
