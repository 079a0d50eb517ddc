"""Integration on the real Gemma3-270M (fp32, CPU): the converted model matches its GGUF's metadata and the
parameter counts worked out by hand, full masks ≡ dense, a 20 % one-shot prune runs end to end and reloads
through both loaders, and the compacted model generates the masked reference's text. Skipped (with the pip
command) when the package that carries the weights is not installed."""

import copy
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

import dip_ext
from dip_ext import DispMasks, zoo
from dip_ext.zoo_gguf import GEMMA3_PACKAGE, GEMMA3_PIP_COMMAND

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec(GEMMA3_PACKAGE) is None,
                                 reason=f"Gemma3-270M is not installed ({GEMMA3_PIP_COMMAND})")]

DIMS = dip_ext.ModelDims(18, 640, 2048)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma():
    return zoo.resolve_model("gemma3-270m")


def test_converted_model_matches_gguf_and_hand_counts(gemma):
    model, tokenizer = gemma
    checked = zoo.check_against_gguf(model, zoo.gemma3_gguf_path())
    assert checked["block_count"] == 18 and checked["attention.key_length"] == 256 and checked["vocab"] == 262144
    # by hand: per layer q 640·1024, k and v 640·256, o 1024·640, gate and up 640·2048, down 2048·640
    per_layer = 640 * (1024 + 2 * 256) + 1024 * 640 + 3 * 640 * 2048
    embedding = 262144 * 640  # tied with lm_head: stored once
    norms = 18 * (4 * 640 + 2 * 256) + 640
    rep = dip_ext.param_report(model)
    assert rep.decoder_linear == 18 * per_layer == 100_270_080
    assert rep.total == embedding + 18 * per_layer + norms == 268_098_176
    assert tokenizer(PROMPT).input_ids[0] == tokenizer.bos_token_id


def test_full_masks_equal_dense(gemma):
    dense, tokenizer = gemma
    ids = tokenizer("The residual stream keeps its full width while every block reads its own subset.",
                    return_tensors="pt").input_ids
    compacted = dip_ext.compact(copy.deepcopy(dense), DispMasks.full(DIMS))
    with torch.no_grad():
        ref, out = dense(ids).logits, compacted(ids).logits
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_oneshot_20_percent_end_to_end_reloads_and_generates_the_reference(gemma, tmp_path):
    dense, tokenizer = gemma
    model, report = dip_ext.prune_and_compact(copy.deepcopy(dense), tokenizer, ratio=0.2, method="oneshot",
                                              calibration_windows=8, seq_len=128, val_windows=0, refit="off",
                                              recover="off",
                                              eval_windows=2, eval_texts=("wiki",), measure_speed=False,
                                              progress=False)
    rep = dip_ext.param_report(model)
    assert 0.19 <= rep.removed_decoder_linear <= 0.21
    assert rep.dense_total == 268_098_176 and rep.total < rep.dense_total
    assert torch.isfinite(torch.tensor(report.perplexity_after["wiki"]))
    masks = model.disp_masks
    prompt = tokenizer(PROMPT, return_tensors="pt")
    kw = dict(max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(**prompt, **kw)
        out = model.generate(**prompt, **kw)
    assert torch.equal(out, ref)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(prompt.input_ids).logits
        for loaded in (dip_ext.from_pretrained(tmp_path),
                       AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)):
            assert type(loaded) is type(model)
            assert torch.equal(loaded.eval()(prompt.input_ids).logits, expected)
