"""Calibration pass, budgets, one-shot / dependent selection and prune_and_compact on tiny random Llama, OPT and Phi.

Token blocks are random ids (no tokenizer, no network) except where a ``file:`` text is the point of the test; the
hypernetwork has its own tests (test_hypernetwork.py) and appears here only through prune_and_compact.
"""

import copy
import json
from dataclasses import astuple

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                          PhiConfig, PhiForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from helpers import perturb_norms_and_biases

import dip_ext
from dip_ext import STRUCTURES, DispMasks
from dip_ext.calibration import STAT_POINTS, CalibrationResult, run_calibration
from dip_ext.families import adapter_for
from dip_ext.prune import PruneReport, prune_and_compact
from dip_ext.selection import method_names
from dip_ext.windows import split_calibration
from dip_ext.selection.budget import RATIO_OF, Budget, check_ratio
from dip_ext.selection.oneshot import dependent_masks, oneshot_masks

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op"),
              pytest.mark.usefixtures("fresh_cache")]

VOCAB = 64
SEQ = 16
HIDDEN_SETS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
BLOCKS = torch.randint(0, VOCAB, (6, SEQ), generator=torch.Generator().manual_seed(1))
SELECT = {"oneshot": oneshot_masks, "dependent": dependent_masks}


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(  # q/k norms over head_dim
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(  # sandwich norms, MQA, window
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64, pad_token_id=0)),
    "opt": lambda: OPTForCausalLM(OPTConfig(  # pre-LN, biases, ReLU, MLP on 2-D [tokens, d] inputs
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=VOCAB - 1)),
    "phi": lambda: PhiForCausalLM(PhiConfig(  # parallel block, partial rotary
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=VOCAB - 1,
        partial_rotary_factor=0.5)),
}


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return perturb_norms_and_biases(FAMILIES[family]().eval())  # non-trivial norms so scores differ between sets


@pytest.fixture(scope="module")
def models():
    return {f: make_model(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def calibs(models):
    return {f: run_calibration(m, BLOCKS, progress=False) for f, m in models.items()}


def norm_weights(model, layer: int):
    """The norm weights feeding layer ``layer``'s attention (Llama/Phi input_layernorm, OPT self_attn_layer_norm)."""
    block = adapter_for(model).decoder_layers(model)[layer]
    norm = getattr(block, "input_layernorm", None) or block.self_attn_layer_norm
    return norm.weight


# ------------------------------------------------------------------------------------------- budget

def _groups(num_layers: int, dependent: bool):
    """The (layer, set) slots that shrink together when one dimension is dropped."""
    if dependent:
        return ([[(i, s) for i in range(num_layers) for s in HIDDEN_SETS]]
                + [[(i, "mlp_mid")] for i in range(num_layers)])
    return [[(i, s)] for i in range(num_layers) for s in STRUCTURES]


def _restore_costs(budget, widths, dependent: bool, step: int = 1) -> list:
    """Decoder-linear parameters that restoring ``step`` more dimensions of each not-full group would add."""
    kept = budget.kept_linear(widths)
    costs = []
    for group in _groups(len(widths), dependent):
        i, s = group[0]
        room = budget.space.size(i, s) - widths[i][s]
        if room == 0:
            continue
        w = [dict(x) for x in widths]
        for i, s in group:
            w[i][s] += min(step, room)
        costs.append(budget.kept_linear(w) - kept)
    return costs


@pytest.mark.parametrize("method", SELECT)
@pytest.mark.parametrize("ratio_of", RATIO_OF)
@pytest.mark.parametrize("family", FAMILIES)
def test_selection_hits_budget(models, calibs, family, ratio_of, method):
    """Kept decoder-linear parameters <= target, and the unused budget (target - kept) is smaller than the cost
    of restoring one dropped dimension of the costliest group (a set; for `dependent`, the shared hidden subset
    of every layer, or one layer's mlp_mid): greedy stops within one dimension of the target."""
    model, calib = models[family], calibs[family]
    for ratio in (0.1, 0.3, 0.5, 0.7):
        budget = Budget.for_model(model, ratio, ratio_of)
        masks = SELECT[method](calib, budget)
        masks.validate(budget.space)
        widths = masks.widths()
        kept = budget.kept_linear(widths)
        assert kept <= budget.target_linear, (ratio, kept, budget.target_linear)
        slack = budget.target_linear - kept
        costs = _restore_costs(budget, widths, method == "dependent")
        assert costs and slack < max(costs), (ratio, slack, costs)
        if method == "dependent":  # the shared subset is one set of indices: every hidden set has its width
            assert len({w[s] for w in widths for s in HIDDEN_SETS}) == 1


@pytest.mark.parametrize("method", SELECT)
@pytest.mark.parametrize("family", FAMILIES)
def test_selection_multiple_of(models, calibs, family, method):
    """multiple_of=4: every width a multiple of 4, still <= target, and no group could take 4 more dims."""
    model, calib = models[family], calibs[family]
    for ratio_of, ratio in (("decoder_linear", 0.3), ("total", 0.5), ("decoder_linear", 0.7)):
        budget = Budget.for_model(model, ratio, ratio_of)
        masks = SELECT[method](calib, budget, multiple_of=4)
        widths = masks.widths()
        assert all(w[s] % 4 == 0 for w in widths for s in STRUCTURES), widths
        assert budget.kept_linear(widths) <= budget.target_linear
        slack = budget.target_linear - budget.kept_linear(widths)
        costs = _restore_costs(budget, widths, method == "dependent", step=4)
        assert all(c > slack for c in costs), (slack, costs)


@pytest.mark.parametrize("family", FAMILIES)
def test_dependent_uses_one_shared_subset(models, calibs, family):
    calib = calibs[family]
    masks = dependent_masks(calib, Budget.for_model(models[family], 0.7))
    shared = masks[0]["attn_in"]
    assert 0 < shared.numel() < calib.space.hidden
    for layer in masks.layers:
        for s in HIDDEN_SETS:
            assert torch.equal(layer[s], shared)


@pytest.mark.parametrize("family", FAMILIES)
def test_oneshot_sets_are_independent(models, calibs, family):
    """On a random model the per-set Fisher scores differ, so DISP picks different subsets per set and layer."""
    masks = oneshot_masks(calibs[family], Budget.for_model(models[family], 0.5))
    subsets = {tuple(layer[s].tolist()) for layer in masks.layers for s in HIDDEN_SETS}
    assert len(subsets) > 1


def test_selection_follows_scores(models, calibs):
    """Raising one dimension's score above all others keeps it; zeroing it drops it (at 50 %)."""
    model, calib = models["llama"], calibs["llama"]
    budget = Budget.for_model(model, 0.5)
    probe = copy.deepcopy(calib)
    probe.scores[1]["mlp_mid"][7] = 1e9
    assert 7 in oneshot_masks(probe, budget)[1]["mlp_mid"].tolist()
    probe.scores[1]["mlp_mid"][7] = 0.0
    assert 7 not in oneshot_masks(probe, budget)[1]["mlp_mid"].tolist()
    probe.tied_hidden[5] = 0.0
    assert 5 not in dependent_masks(probe, budget)[0]["attn_in"].tolist()
    probe.tied_hidden[5] = 1e9
    assert 5 in dependent_masks(probe, budget)[0]["attn_in"].tolist()


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2, "abc", None, float("nan")])
def test_budget_bad_ratio(models, ratio):
    with pytest.raises(ValueError, match="ratio"):
        Budget.for_model(models["llama"], ratio)
    with pytest.raises(ValueError, match="ratio"):
        check_ratio(ratio)


def test_budget_bad_ratio_of_and_total_too_large(models):
    model = models["llama"]
    with pytest.raises(ValueError, match="ratio_of"):
        Budget.for_model(model, 0.3, "params")
    rep = dip_ext.param_report(model)
    too_much = (rep.dense_decoder_linear / rep.dense_total + 1) / 2  # more than all decoder linears hold
    with pytest.raises(ValueError, match="decoder-linear"):
        Budget.for_model(model, too_much, "total")
    b = Budget.for_model(model, 0.3, "total")  # the same ratio is fine of the decoder linears
    assert b.target_linear == round(rep.dense_decoder_linear - 0.3 * rep.dense_total)


def test_budget_on_compacted_model_refused(models, calibs):
    model = copy.deepcopy(models["llama"])
    dip_ext.compact(model, oneshot_masks(calibs["llama"], Budget.for_model(model, 0.3)))
    with pytest.raises(ValueError, match="already compacted"):
        Budget.for_model(model, 0.3)


# -------------------------------------------------------------------------------------- calibration

def assert_same_calibration(a: CalibrationResult, b: CalibrationResult) -> None:
    assert a.space == b.space and a.windows == b.windows and a.losses == b.losses and a.blocks_sha == b.blocks_sha
    for la, lb in zip(a.scores, b.scores, strict=True):
        for s in STRUCTURES:
            assert torch.equal(la[s], lb[s]), s
    assert torch.equal(a.tied_hidden, b.tied_hidden)
    assert a.stats.keys() == b.stats.keys()
    for p in a.stats:
        for sa, sb in zip(a.stats[p], b.stats[p], strict=True):
            assert sa.count == sb.count and torch.equal(sa.sum, sb.sum) and torch.equal(sa.sumsq, sb.sumsq), p


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_scores_and_stats(models, calibs, family):
    model, res = models[family], calibs[family]
    dims = adapter_for(model).dims(model.config)
    assert res.space == adapter_for(model).space(model.config) and res.windows == BLOCKS.shape[0] and len(res.losses) == BLOCKS.shape[0]
    assert all(0 < loss < 20 for loss in res.losses)
    assert len(res.scores) == dims.num_layers
    for layer in res.scores:
        for s in STRUCTURES:
            t = layer[s]
            assert t.shape == (dims.size(s),) and t.dtype == torch.float64
            assert torch.isfinite(t).all() and (t >= 0).all() and t.sum() > 0
    assert res.tied_hidden.shape == (dims.hidden,) and (res.tied_hidden >= 0).all()
    q_out = model.config.num_attention_heads * (model.config.hidden_size // model.config.num_attention_heads)
    widths = {"attn_in": dims.hidden, "attn_proj_in": q_out, "mlp_in": dims.hidden, "mlp_mid": dims.ffn}
    assert set(res.stats) == set(STAT_POINTS)
    for point, per_layer in res.stats.items():
        assert len(per_layer) == dims.num_layers
        for st in per_layer:
            assert st.count == BLOCKS.numel(), (point, st.count)  # OPT's MLP sees [tokens, d]: counted too
            assert st.sum.shape == (widths[point],) and (st.sumsq >= 0).all() and st.sumsq.sum() > 0
    if family == "opt":  # fc2's input is a ReLU output: the hook sits after the activation
        assert all((st.sum >= 0).all() for st in res.stats["mlp_mid"])


def test_calibration_restores_model_state(models):
    model = make_model("opt")
    model.train()
    model.lm_head.weight.requires_grad_(True)
    model.model.decoder.layers[0].fc1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    run_calibration(model, BLOCKS[:2], progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_calibration_without_stats(models, calibs):
    res = run_calibration(models["phi"], BLOCKS, stats=False, progress=False)
    assert res.stats == {}
    ref = calibs["phi"]
    for la, lb in zip(res.scores, ref.scores):
        for s in STRUCTURES:
            assert torch.equal(la[s], lb[s])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_checkpoint_resume_after_partial_run(models, calibs, family, tmp_path):
    """First k windows with a checkpoint, then all windows with the same file == one uninterrupted run."""
    ckpt = tmp_path / "calib.safetensors"
    part = run_calibration(models[family], BLOCKS[:2], progress=False, checkpoint=ckpt)
    assert part.windows == 2 and CalibrationResult.load(ckpt).windows == 2
    resumed = run_calibration(models[family], BLOCKS, progress=False, checkpoint=ckpt)
    assert_same_calibration(resumed, calibs[family])
    assert_same_calibration(CalibrationResult.load(ckpt), calibs[family])
    with pytest.raises(ValueError, match="windows"):  # a checkpoint beyond the blocks given
        run_calibration(models[family], BLOCKS[:3], progress=False, checkpoint=ckpt)


def test_checkpoint_of_other_windows_refused(models, tmp_path):
    """Resuming on windows that do not start with the checkpoint's (another text or window count) is refused."""
    ckpt = tmp_path / "calib.safetensors"
    run_calibration(models["llama"], BLOCKS[:2], progress=False, checkpoint=ckpt)
    for other in (BLOCKS.flip(0), BLOCKS[:, :-1], (BLOCKS + 1) % VOCAB):
        with pytest.raises(ValueError, match="other token windows"):
            run_calibration(models["llama"], other, progress=False, checkpoint=ckpt)
    assert CalibrationResult.load(ckpt).windows == 2  # left as it was


def test_checkpoint_resume_after_interrupt(models, calibs, tmp_path):
    """KeyboardInterrupt in window 3 (checkpoints every 2 windows): the rerun continues from window 2."""
    model = models["llama"]
    ckpt = tmp_path / "calib.safetensors"
    calls = []

    def interrupt(module, args, output):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    handle = model.lm_head.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_calibration(model, BLOCKS, progress=False, checkpoint=ckpt, checkpoint_every=2)
    finally:
        handle.remove()
    assert CalibrationResult.load(ckpt).windows == 2
    assert not any(m._forward_pre_hooks for m in model.modules())  # the stats hooks went away
    assert not any(p.requires_grad is False for p in model.parameters())
    resumed = run_calibration(model, BLOCKS, progress=False, checkpoint=ckpt, checkpoint_every=2)
    assert_same_calibration(resumed, calibs["llama"])


def test_save_load_round_trip(calibs, tmp_path):
    for family, res in calibs.items():
        path = tmp_path / family / "c.safetensors"
        res.save(path)
        assert not list(path.parent.glob("*.tmp"))
        assert_same_calibration(CalibrationResult.load(path), res)
        # selection from the reloaded result is the same
        assert CalibrationResult.load(path).space == res.space


def test_corrupt_or_foreign_checkpoint(models, calibs, tmp_path):
    model = models["llama"]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    truncated = tmp_path / "truncated.safetensors"
    calibs["llama"].save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    for bad in (garbage, truncated):
        with pytest.raises(ValueError, match="not a readable calibration file"):
            CalibrationResult.load(bad)
        with pytest.raises(ValueError, match="not a readable calibration file"):
            run_calibration(model, BLOCKS, progress=False, checkpoint=bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a dip_ext calibration file"):
        run_calibration(model, BLOCKS, progress=False, checkpoint=foreign)
    other = tmp_path / "other.safetensors"
    calibs["opt"].save(other)
    with pytest.raises(ValueError, match="another model"):
        run_calibration(model, BLOCKS, progress=False, checkpoint=other)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("family", FAMILIES)
def test_non_finite_activations_name_the_layer(family, value):
    model = make_model(family)
    with torch.no_grad():
        norm_weights(model, 1)[3] = value
    with pytest.raises(ValueError, match=r"non-finite calibration activations at layer 1 \(attn_in\)"):
        run_calibration(model, BLOCKS[:2], progress=False)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_non_finite_names_where_it_started(family):
    """inf in layer 0's MLP norm: every later point is non-finite too, the error names the first one."""
    model = make_model(family)
    block = adapter_for(model).decoder_layers(model)[0]
    norm = block.post_attention_layernorm if family == "llama" else block.final_layer_norm
    with torch.no_grad():
        norm.weight[0] = float("inf")
    with pytest.raises(ValueError, match=r"at layer 0 \(mlp_in\)"):
        run_calibration(model, BLOCKS[:1], progress=False)


@pytest.mark.parametrize("blocks, match", [
    (torch.empty(0, SEQ, dtype=torch.long), "empty: no token windows"),
    (torch.zeros(3, 1, dtype=torch.long), "at least 2 tokens per window"),
    (torch.zeros(SEQ, dtype=torch.long), "LongTensor"),
    (torch.zeros(2, SEQ), "LongTensor"),
    ([[1, 2, 3]], "LongTensor"),
])
def test_calibration_bad_blocks(models, blocks, match):
    with pytest.raises(ValueError, match=match):
        run_calibration(models["llama"], blocks, progress=False)


# -------------------------------------------------------------------------------- prune_and_compact

def _prune(model, method, **kw):
    trains = {"steps": 3} if method == "hypernetwork" else {}  # an option of a method that trains
    kw = {"ratio": 0.4, "calibration": BLOCKS, "method": method, **trains, "eval_texts": (), "val_windows": 0,
          "measure_speed": False, "progress": False, "seq_len": SEQ, "refit": "off", "recover": "off", **kw}
    return prune_and_compact(model, kw.pop("tokenizer", None), **kw)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_and_compact(family, method, tmp_path):
    model = make_model(family)
    dense = copy.deepcopy(model)
    before = dip_ext.param_report(model)
    out, report = _prune(model, method)
    assert out is model and isinstance(report, PruneReport) and dip_ext.is_compacted(model)

    # prune_and_compact == compact(dense copy, the masks it reports)
    masks = report.masks
    assert masks == DispMasks.from_config(model.config.disp_masks)
    ref = dip_ext.compact(dense, masks)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)

    # the report agrees with what the model stores
    after = dip_ext.param_report(model)
    # by default KV groups compete in the LLaMA-style families (two KV heads per layer here), for the methods that
    # prune them
    heads = family in ("llama", "qwen3") and method in ("oneshot", "hypernetwork")
    assert report.configs.prune.prune_heads is heads
    budget = Budget.for_model(dense_model := make_model(family), 0.4, heads=heads)
    assert (report.params_before.total, report.params_before.decoder_linear) == (before.total, before.decoder_linear)
    assert report.params_after == after
    pa = report.budget
    assert pa["kept_decoder_linear"] == after.decoder_linear <= budget.target_linear
    assert pa["removed_decoder_linear"] == before.decoder_linear - after.decoder_linear
    assert pa["removed_fraction_decoder_linear"] == pytest.approx(after.removed_decoder_linear)
    assert pa["removed_fraction_total"] == pytest.approx(pa["removed_decoder_linear"] / before.total)
    assert report.widths == after.widths == masks.widths() and report.full_widths == after.full_widths
    assert report.method == method and report.ratio == 0.4 and report.ratio_of == "decoder_linear"
    assert (report.selection.steps if report.selection else 0) == (3 if method == "hypernetwork" else 0)
    assert report.calibration == "<token ids %dx%d>" % tuple(BLOCKS.shape)
    assert report.windows["calibration"] == BLOCKS.shape[0]
    assert {"calibration pass", "selection", "compaction"} <= set(report.seconds)
    if method != "hypernetwork":  # the one-shot and dependent paths are the selection functions themselves
        calib = run_calibration(dense_model, BLOCKS, progress=False)
        assert masks == SELECT[method](calib, budget)

    report.save(tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["masks"] == report.masks.to_dict() and saved["budget"] == pa
    assert saved["params_after"] == after.to_dict() and saved["configs"]["prune"]["fields"]["method"] == method
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"{after.decoder_linear:,}" in md and "Kept widths per layer" in md
    assert (tmp_path / "r" / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_with_file_texts_and_tokenizer(word_tokenizer, word_text):
    """Calibration and evaluation from a file: text through a tokenizer; the text path equals its token blocks."""
    from dip_ext import data

    tok, name = word_tokenizer, word_text
    model = make_model("llama")
    dense = copy.deepcopy(model)
    _, report = _prune(model, "oneshot", tokenizer=tok, calibration=name, calibration_windows=4,
                       eval_texts=(name,), eval_windows=2, eval_seq_len=SEQ, measure_speed=True)
    assert report.calibration == name and report.windows["calibration"] == 4
    for ppl in (report.perplexity_before[name], report.perplexity_after[name]):
        assert 1 < ppl < 10 * VOCAB
    assert report.tokens_per_second_before > 0 and report.tokens_per_second_after > 0
    speed = report.speed  # interleaved pairs: the median and the spread of the per-pair speed-ups
    assert len(speed.ratios) >= 1 and speed.speedup_min <= speed.speedup <= speed.speedup_max
    assert speed.pruned_tokens_per_second == report.tokens_per_second_after
    assert f"perplexity {name}" in report.to_markdown() and "interleaved pairs" in report.to_markdown()
    blocks = data.get_blocks(tok, name, "calibration", SEQ, 4)
    _, by_blocks = _prune(dense, "oneshot", calibration=blocks)
    assert by_blocks.masks == report.masks


def test_prune_work_dir_resume(tmp_path):
    """With work_dir the calibration checkpoint is kept; resume reuses it, a fresh run starts over."""
    work = tmp_path / "work"
    _, first = _prune(make_model("llama"), "hypernetwork", work_dir=work)
    assert (work / "calibration.safetensors").is_file() and (work / "hypernetwork").is_dir()
    _, again = _prune(make_model("llama"), "hypernetwork", work_dir=work, resume=True)
    assert again.masks == first.masks
    _, fresh = _prune(make_model("llama"), "hypernetwork", work_dir=work)  # not resume: starts over, same seed
    assert fresh.masks == first.masks


def test_split_calibration():

    blocks = torch.arange(40).view(20, 2)  # row k starts with 2k: rows are recognisable
    calib, train, val, sources = astuple(split_calibration(blocks, 5, 4))
    assert sources is None  # one text
    rows = lambda t: (t[:, 0] // 2).tolist()  # noqa: E731
    assert rows(val) == [2, 7, 12, 17]  # evenly spaced, mid-stride
    assert rows(train) == [k for k in range(20) if k not in (2, 7, 12, 17)]
    assert set(rows(calib)) <= set(rows(train)) and len(rows(calib)) == 5 and rows(calib)[0] == 0
    calib0, train0, val0, _ = astuple(split_calibration(blocks, 5, 0))  # no validation: make_blocks' spread windows
    assert val0 is None and torch.equal(train0, blocks) and rows(calib0) == [0, 5, 10, 14, 19]
    with pytest.warns(UserWarning, match="too few to hold out"):
        assert split_calibration(blocks[:3], 2, 3).val is None
    with pytest.warns(UserWarning, match="besides the validation windows"):
        split_calibration(blocks, 19, 4)


def test_prune_hypernetwork_holds_out_validation_windows():
    _, report = _prune(make_model("llama"), "hypernetwork", val_windows=2)
    assert report.windows == {"calibration": BLOCKS.shape[0] - 2, "train": BLOCKS.shape[0] - 2, "val": 2}
    sel = report.selection
    assert sel.steps == 3 and [h[0] for h in sel.val_history] == [0, 3]
    assert sel.best_val_loss == min(h[1] for h in sel.val_history)
    assert f"The masks of step {sel.best_step} are kept" in report.to_markdown()


@pytest.mark.parametrize("kw, err, match", [
    (dict(val_windows=-1), ValueError, "val_windows"),
    (dict(ratio=0), ValueError, "ratio"),
    (dict(ratio=1), ValueError, "ratio"),
    (dict(ratio=1.5), ValueError, "ratio"),
    (dict(ratio=-0.1), ValueError, "ratio"),
    (dict(ratio_of="params"), ValueError, "ratio_of"),
    (dict(method="magic"), ValueError, "unknown method"),
    (dict(method="hypernetwork", steps=-1), ValueError, "steps"),
    (dict(multiple_of=0), ValueError, "multiple_of"),
    (dict(refit="yes"), ValueError, "refit must be one of auto, on, off"),
    (dict(refit=True), ValueError, "refit must be one of"),
    (dict(refit="on", refit_damping=0), ValueError, "damping"),
    (dict(refit="on", refit_damping=float("nan")), ValueError, "damping"),
    (dict(calibration="c4"), ValueError, "unknown text 'c4'"),
    (dict(calibration="file:EMPTY"), ValueError, "empty"),
    (dict(calibration="file:MISSING"), FileNotFoundError, "does not exist"),
    (dict(calibration=torch.empty(0, SEQ, dtype=torch.long)), ValueError, "empty: no token windows"),
    (dict(calibration="ptb", tokenizer=None), ValueError, "its tokenizer cannot be found: pass tokenizer="),
    (dict(eval_texts=("wiki",), tokenizer=None), ValueError, "tokenizer"),
])
def test_prune_bad_input(kw, err, match, tmp_path, word_tokenizer):
    (tmp_path / "empty.txt").write_text("  \n\n")
    if isinstance(kw.get("calibration"), str):
        kw["calibration"] = kw["calibration"].replace("EMPTY", str(tmp_path / "empty.txt")).replace(
            "MISSING", str(tmp_path / "missing.txt"))
    kw.setdefault("tokenizer", word_tokenizer)
    model = make_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=match):
        _prune(model, kw.pop("method", "oneshot"), **kw)
    assert not dip_ext.is_compacted(model)  # refused before touching the model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_prune_already_compacted_refused():
    model = make_model("phi")
    _prune(model, "oneshot")
    with pytest.raises(ValueError, match="already compacted"):
        _prune(model, "oneshot")


# ---- refit (dip_ext.refit) -------------------------------------------------------------------------------------

def _inputs_by_hand(model, masks, blocks):
    """Every refit point's inputs [tokens, width] in the masked model, captured by hooks of this test's own."""
    adapter = adapter_for(model)
    seen: dict = {}
    hooks = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for s in ("attn_in", "mlp_in", "mlp_mid"):
            module = adapter.mask_points(layer)[s][0][0]
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, key=(i, s): seen.setdefault(key, []).append(args[0].detach().reshape(
                    -1, args[0].shape[-1]).double())))
    with dip_ext.apply_masks(model, masks), torch.no_grad():
        model(input_ids=blocks)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_is_the_weighted_ridge_least_squares_solution(models, calibs, family):
    from dip_ext.refit import refit_pruned_inputs

    dense = models[family]
    masks = oneshot_masks(calibs[family], Budget.for_model(dense, 0.4))
    model = copy.deepcopy(dense)
    info = refit_pruned_inputs(model, masks, BLOCKS, damping=0.3, batch_size=4, progress=False,
                               structures=("attn_in", "mlp_in", "mlp_mid"))
    xs = _inputs_by_hand(dense, masks, BLOCKS)
    adapter = adapter_for(dense)
    layers_d, layers_r = adapter.decoder_layers(dense), adapter.decoder_layers(model)
    refitted = 0
    for (i, s), x in xs.items():
        keep = masks[i][s]
        for (mod_d, _), (mod_r, _) in zip(adapter.mask_points(layers_d[i])[s], adapter.mask_points(layers_r[i])[s]):
            w, got = mod_d.weight.detach().double(), mod_r.weight.detach().double()
            drop = torch.ones(w.shape[1], dtype=torch.bool)
            drop[keep] = False
            assert torch.equal(got[:, drop], w[:, drop])  # columns compaction drops are not touched
            if keep.numel() in (0, w.shape[1]):
                assert torch.equal(got, w)
                continue
            # the ridge least-squares problem written out row-stacked and solved by lstsq
            # tokens weighted by 1/|x|^2; all-zero rows (Phi's zero pad embedding, layer-normed) count for nothing
            a = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            delta = 0.3 * float((a[:, keep] ** 2).sum(0).mean())
            lhs = torch.cat([a[:, keep], delta ** 0.5 * torch.eye(keep.numel(), dtype=torch.float64)])
            rhs = torch.cat([a @ w.T, delta ** 0.5 * w[:, keep].T])
            want = torch.linalg.lstsq(lhs, rhs).solution.T
            torch.testing.assert_close(got[:, keep], want, rtol=1e-4, atol=1e-5)
            # and it beats the weights it started from on the weighted error it minimises
            err = lambda v: float(((a @ w.T - a[:, keep] @ v.T) ** 2).sum())  # noqa: E731
            assert err(got[:, keep]) < err(w[:, keep])
            refitted += 1
    assert refitted == info.weights > 0 and info.tokens == BLOCKS.numel()
    # everything else is the dense model's
    refit_names = {n for n, p in model.named_parameters() if not torch.equal(p, dense.get_parameter(n))}
    assert refit_names and all(n.endswith("weight") for n in refit_names)


def test_refit_in_groups_of_layers_and_data_shape_checks(models, calibs):
    from dip_ext.refit import refit_pruned_inputs

    dense = models["llama"]
    masks = oneshot_masks(calibs["llama"], Budget.for_model(dense, 0.4))
    one, grouped = copy.deepcopy(dense), copy.deepcopy(dense)
    every = ("attn_in", "mlp_in", "mlp_mid")
    refit_pruned_inputs(one, masks, BLOCKS, progress=False, structures=every)
    info = refit_pruned_inputs(grouped, masks, BLOCKS, progress=False, max_gram_bytes=1, structures=every)
    assert info.passes == dense.config.num_hidden_layers
    # layer 0 sees the same inputs either way; later groups see the earlier ones refitted already
    for (n, p), q in zip(one.named_parameters(), grouped.parameters()):
        if n.startswith("model.layers.0."):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(p, q, rtol=0.05, atol=0.05)
    assert any(not torch.equal(p, q) for p, q in zip(one.parameters(), grouped.parameters()))
    for bad, err, match in [(dict(damping=-1.0), ValueError, "damping"), (dict(batch_size=0), ValueError, "batch_size"),
                            (dict(blocks=BLOCKS.float()), ValueError, "LongTensor"),
                            (dict(structures="mlp_mid"), ValueError, "structures"),
                            (dict(structures=("attn_out",)), ValueError, "structures"),
                            (dict(masks=masks.to_dict()), TypeError, "DispMasks")]:
        args = {"masks": masks, "blocks": BLOCKS, **bad}
        with pytest.raises(err, match=match):
            refit_pruned_inputs(copy.deepcopy(dense), args.pop("masks"), args.pop("blocks"), progress=False, **args)
    with pytest.raises(dip_ext.MaskError):
        refit_pruned_inputs(copy.deepcopy(models["opt"]), masks, BLOCKS, progress=False)  # other widths


@pytest.mark.parametrize("family", ["llama", "phi", "qwen3", "gemma3"])
def test_prune_and_compact_with_refit(family, tmp_path):
    from dip_ext.refit import refit_pruned_inputs

    model = make_model(family)
    dense = copy.deepcopy(model)
    _, report = _prune(model, "oneshot", refit="on", refit_damping=0.2)
    masks = report.masks
    refit_pruned_inputs(dense, masks, BLOCKS, damping=0.2, progress=False)  # the MLP's last projection
    ref = dip_ext.compact(dense, masks)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert report.refit.damping == 0.2 and report.refit.weights > 0
    assert report.refit.structures == ["mlp_mid"] and report.refit.mode == "on"
    assert "refit" in report.seconds and "Refit (on):" in report.to_markdown()
    # the compacted, refitted model saves and loads like any other
    model.save_pretrained(tmp_path / "m")
    back = dip_ext.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_choose_refit_keeps_the_best_candidate_or_none(models, calibs, monkeypatch):
    from dip_ext import refit as R

    dense = models["llama"]
    masks = oneshot_masks(calibs["llama"], Budget.for_model(dense, 0.4))
    val = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(9))
    model = copy.deepcopy(dense)
    info = R.choose_refit(model, masks, BLOCKS, val, progress=False)
    cands = info.candidates
    assert [(c.structures, c.damping) for c in cands[1:]] == [(list(s), d) for s, d in R.CANDIDATES]
    assert cands[0].structures is None and cands[0].val_loss == pytest.approx(R.masked_loss(dense, masks, val))
    best = min(cands, key=lambda c: c.val_loss)
    assert info.val_loss == (cands[0].val_loss, best.val_loss) and info.structures == best.structures
    # the model holds exactly the chosen refit, and every candidate's loss is what that refit gives
    for c in cands[1:]:
        ref = copy.deepcopy(dense)
        R.refit_pruned_inputs(ref, masks, BLOCKS, damping=c.damping, structures=c.structures, progress=False)
        assert R.masked_loss(ref, masks, val) == pytest.approx(c.val_loss, rel=1e-5)
        if c is best:
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # when no candidate beats the masks alone, the weights are given back untouched
    losses = iter([1.0] + [2.0] * len(R.CANDIDATES))
    monkeypatch.setattr(R, "masked_loss", lambda *a, **k: next(losses))
    model = copy.deepcopy(dense)
    info = R.choose_refit(model, masks, BLOCKS, val, progress=False)
    assert info.structures is None and info.weights == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), dense.parameters()))
    with pytest.raises(ValueError, match="no candidates"):
        R.choose_refit(model, masks, BLOCKS, val, candidates=(), progress=False)
    # statistics too large to hold at once: the default refit, group by group, unscored
    model, ref = copy.deepcopy(dense), copy.deepcopy(dense)
    with pytest.warns(UserWarning, match="do not fit max_gram_bytes"):
        info = R.choose_refit(model, masks, BLOCKS, val, max_gram_bytes=1000, progress=False)
    R.refit_pruned_inputs(ref, masks, BLOCKS, max_gram_bytes=1000, progress=False)
    assert info.val_loss is None and not info.candidates and info.structures == ["mlp_mid"] and info.passes > 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    with pytest.raises(ValueError, match="val_blocks"):
        R.choose_refit(model, masks, BLOCKS, val[:0], progress=False)


def test_prune_and_compact_refit_auto_holds_out_validation_for_oneshot():
    from dip_ext.refit import refit_pruned_inputs

    model = make_model("opt")
    dense = copy.deepcopy(model)
    blocks = torch.randint(0, VOCAB, (10, SEQ), generator=torch.Generator().manual_seed(4))
    _, report = _prune(model, "oneshot", calibration=blocks, val_windows=3, refit="auto")
    refit = report.refit
    assert report.windows["val"] == 3 and report.windows["calibration"] == 7
    assert refit.mode == "auto" and len(refit.candidates) == 7
    masks = report.masks
    if refit.structures is not None:
        rest = split_calibration(blocks, None, 3).train
        refit_pruned_inputs(dense, masks, rest, damping=refit.damping, structures=refit.structures,
                            progress=False)
    ref = dip_ext.compact(dense, masks)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
