"""KV-group pruning: an optional ``kv_groups`` set per layer (a KV head with the query heads that share it).

Compacted ≡ masked dense reference (fp32, 1e-5) for every family, with a layer keeping a strict subset of the groups,
a layer keeping none (its attention removed), uneven group counts across layers (GQA), MQA's one group kept or
dropped; KV-cache decode, greedy generate with the dynamic and the static cache, save / reload; the masks' forms
(dict, config bitmask) and their errors; parameter counts and the KV-cache bytes per token against what the compacted
model stores and caches; calibration scores of the groups and one-shot selection with a parameter budget and a
KV-cache target; bad input; torch.compile, a peft LoRA and the benchmark's decode session on a model with groups
pruned. Tiny random configs, CPU.
"""

import copy
import warnings
import json
from typing import Optional

import pytest
import torch
from helpers import (assert_lora_merges_exactly, assert_rel_close, decode_with_cache, dims_of, make_word_tokenizer,
                     perturb_norms_and_biases, random_masks, run_cli, tiny_llama, write_word_text)
from test_families_opt_phi import opt_config
from test_families_widths import CASES, VOCAB
from test_families_widths import make_model as make_width_model
from transformers import AutoModelForCausalLM, OPTForCausalLM

import dip_ext
from dip_ext import DispMasks, MaskError, ModelDims
from dip_ext.calibration import run_calibration
from dip_ext.families import adapter_for
from dip_ext.masks import ALL_STRUCTURES, KV_GROUPS, STRUCTURES
from dip_ext.params import decoder_linear_params, dense_linear_params, kv_cache_bytes
from dip_ext.selection.budget import Budget
from dip_ext.selection.oneshot import oneshot_masks

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated",
                                        "ignore:Initializing zero-element tensors is a no-op")

#: every family of test_families_widths.py, plus OPT (6 heads, each its own KV group; sdpa attention)
FAMILIES = list(CASES) + ["opt-6-heads"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def make_model(name: str, seed: int = 0, attn: Optional[str] = None):
    """A family's tiny model; ``attn``: the attention implementation (default: eager, OPT sdpa)."""
    if name == "opt-6-heads":
        torch.manual_seed(seed)
        model = OPTForCausalLM(opt_config(48, 80, 6, 3, tie_word_embeddings=False,
                                          attn_implementation=attn or "sdpa")).eval()
        return perturb_norms_and_biases(model, bias_std=0.1)
    if attn is None:
        return make_width_model(name, seed)
    model_cls, config = CASES[name]
    config = copy.deepcopy(config)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return perturb_norms_and_biases(model_cls(config).eval(), bias_std=0.1)


def kept_groups(num_groups: int) -> list[list[int]]:
    """Per layer (3 layers): a strict subset of the groups (MQA: its one group), none, and another count."""
    if num_groups == 1:
        return [[0], [], [0]]
    if num_groups == 2:
        return [[1], [], [0, 1]]
    return [[1, num_groups - 1], [], list(range(0, num_groups, 2))]


def with_groups(masks: DispMasks, groups) -> DispMasks:
    """``masks``' five sets with these kept groups per layer."""
    return DispMasks([{**{s: layer[s] for s in STRUCTURES}, KV_GROUPS: torch.tensor(g, dtype=torch.long)}
                      for layer, g in zip(masks.layers, groups)])


def plain_masks(model, seed: int = 0) -> DispMasks:
    """Random sets without groups (layer 2 without MLP channels, every layer with an attention)."""
    return random_masks(dims_of(model), seed, 0.6, empty={2: ["mlp_mid"]})


def group_masks(model, seed: int = 0) -> DispMasks:
    """:func:`plain_masks` with the groups of :func:`kept_groups`: layer 1 keeps no group, so its attention is
    removed although its random ``attn_out`` is not empty."""
    return with_groups(plain_masks(model, seed), kept_groups(dims_of(model).kv_groups))


def without_groups(masks: DispMasks) -> DispMasks:
    return DispMasks([{s: layer[s] for s in STRUCTURES} for layer in masks.layers])


def attention_linears(attn):
    """(q, k, v, output projection) of a (compacted) attention module of any family."""
    out = next(getattr(attn, n) for n in ("o_proj", "out_proj", "dense") if hasattr(attn, n))
    return attn.q_proj, attn.k_proj, attn.v_proj, out


def token_ids(shape, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB - 1, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compacted_models():
    """name -> (dense, masks, compacted), built once per family."""
    cache = {}

    def get(name):
        if name not in cache:
            dense = make_model(name)
            masks = group_masks(dense)
            cache[name] = (dense, masks, dip_ext.compact(copy.deepcopy(dense), masks))
        return cache[name]

    return get


# ---- compacted ≡ masked reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_compacted_equals_masked_reference_with_cache(name, compacted_models):
    dense, masks, compacted = compacted_models(name)
    adapter = adapter_for(dense)
    shapes = adapter.shapes(dense.config)
    groups = kept_groups(shapes.kv_heads)
    assert plain_masks(dense)[1]["attn_out"].numel() > 0
    assert masks[1]["attn_out"].numel() == 0  # no group kept: the attention is removed at construction
    layers = adapter.decoder_layers(compacted)
    assert layers[1].self_attn is None
    for i in (0, 2):
        q, k, v, o = attention_linears(layers[i].self_attn)
        assert k.out_features == v.out_features == len(groups[i]) * shapes.group_kv
        assert q.out_features == o.in_features == len(groups[i]) * shapes.group_q
        assert o.out_features == masks[i]["attn_out"].numel()

    ids, nxt = token_ids((2, 11)), token_ids((2, 3), seed=2)
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = decode_with_cache(dense, ids, nxt)
            whole = dense(torch.cat([ids, nxt], 1)).logits
        with dip_ext.apply_masks(dense, plain_masks(dense)):
            every_head = dense(ids).logits
        unmasked = dense(ids).logits
        out = decode_with_cache(compacted, ids, nxt)
    assert_rel_close(out, ref)
    assert_rel_close(out, whole)  # cached decode ≡ one pass over the whole sequence
    assert (unmasked - ref[:, :ids.shape[1]]).abs().max() > 1e-3  # the reference really is pruned
    assert (every_head - ref[:, :ids.shape[1]]).abs().max() > 1e-3  # ... and its groups really are dropped


@pytest.mark.parametrize("name", FAMILIES)
def test_other_attention_implementation_with_left_padding(name):
    """sdpa (OPT: eager) with a left-padded row: prefill and cached decode ≡ the masked reference."""
    dense = make_model(name, seed=1, attn="eager" if name.startswith("opt") else "sdpa")
    masks = group_masks(dense, seed=1)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    ids, nxt = token_ids((2, 9), seed=10), token_ids((2, 3), seed=11)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0
    ids[0, :3] = dense.config.pad_token_id
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = decode_with_cache(dense, ids, nxt, attn)
        out = decode_with_cache(compacted, ids, nxt, attn)
    keep = torch.cat([attn, torch.ones_like(nxt)], 1).bool()
    assert_rel_close(out[keep], ref[keep])


@pytest.mark.parametrize("name", ["llama-wide-heads-gqa", "opt-6-heads"])
def test_every_group_kept_equals_dense_and_no_group_anywhere_keeps_only_mlps(name):
    dense = make_model(name)
    dims = dims_of(dense)
    ids = token_ids((2, 7))
    full = dip_ext.compact(copy.deepcopy(dense), DispMasks.full(dims, heads=True))
    assert full.disp_masks.prunes_heads
    with torch.no_grad():
        assert_rel_close(full(ids).logits, dense(ids).logits)
    none = with_groups(DispMasks.full(dims), [[]] * dims.num_layers)
    compacted = dip_ext.compact(copy.deepcopy(dense), none)
    assert all(layer.self_attn is None for layer in adapter_for(dense).decoder_layers(compacted))
    with torch.no_grad():
        with dip_ext.apply_masks(dense, none):
            ref = decode_with_cache(dense, ids, token_ids((2, 2), seed=3))
        assert_rel_close(decode_with_cache(compacted, ids, token_ids((2, 2), seed=3)), ref)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_reference(name, cache, compacted_models):
    dense, masks, compacted = compacted_models(name)
    ids = token_ids((2, 6), seed=4)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
              pad_token_id=dense.config.pad_token_id, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(ids, **kw)  # the reference: transformers' default (dynamic) cache
        out = compacted.generate(ids, **kw, **({"cache_implementation": "static"} if cache == "static" else {}))
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert_rel_close(a, b)
    if cache == "dynamic":  # what the compacted layers' keys / values hold: the kept groups' heads only
        with torch.no_grad():
            past = compacted(ids, use_cache=True).past_key_values
        shapes = adapter_for(dense).shapes(dense.config)
        for i, g in enumerate(kept_groups(shapes.kv_heads)):
            if g:
                for t in (past.layers[i].keys, past.layers[i].values):  # [batch, heads, tokens (window), head_dim]
                    assert (t.shape[0], t.shape[1], t.shape[3]) == (2, len(g), shapes.group_kv)


# ---- save / reload ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_save_and_reload(tmp_path, name, compacted_models):
    dense, masks, compacted = compacted_models(name)
    compacted.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["disp_masks"]
    assert saved[KV_GROUPS] == dims_of(dense).kv_groups and all(KV_GROUPS in layer for layer in saved["layers"])
    ids = token_ids((2, 8), seed=5)
    impl = dict(attn_implementation=compacted.config._attn_implementation)  # not saved in config.json
    with torch.no_grad():
        expected = compacted(ids).logits
        for loaded in (dip_ext.from_pretrained(tmp_path, **impl),
                       AutoModelForCausalLM.from_pretrained(tmp_path, **impl),  # dip_ext is imported
                       AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, **impl)):
            assert type(loaded) is type(compacted)
            assert loaded.disp_masks == masks and loaded.disp_masks.prunes_heads
            assert torch.equal(loaded(ids).logits, expected)
            assert decoder_linear_params(loaded) == decoder_linear_params(compacted)


# ---- the masks' forms and errors ----------------------------------------------------------------------------------

def test_masks_round_trip_with_and_without_groups():
    dims = ModelDims(3, 48, 40, 2)
    masks = with_groups(random_masks(dims, 3), [[1], [], [0, 1]])
    assert masks.prunes_heads and masks.structures == ALL_STRUCTURES
    assert [w[KV_GROUPS] for w in masks.widths()] == [1, 0, 2]
    assert masks[1]["attn_out"].numel() == 0
    as_dict = masks.to_dict()
    assert all(list(layer) == list(ALL_STRUCTURES) for layer in as_dict["layers"])
    assert DispMasks.from_dict(json.loads(json.dumps(as_dict))) == masks
    config = json.loads(json.dumps(masks.to_config(dims)))
    assert config[KV_GROUPS] == 2
    back = DispMasks.from_config(config)
    assert back == masks and back.prunes_heads
    assert DispMasks.from_config(as_dict) == masks  # from_config also reads the dict form
    dense = masks.to_masks(dims)
    assert [m[KV_GROUPS].tolist() for m in dense] == [[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    assert DispMasks.from_masks(dense) == masks

    plain = without_groups(masks)
    assert not plain.prunes_heads and plain.structures == STRUCTURES and plain != masks
    config = plain.to_config(dims)
    assert KV_GROUPS not in config and all(KV_GROUPS not in layer for layer in config["layers"])
    for back in (DispMasks.from_config(json.loads(json.dumps(config))), DispMasks.from_dict(plain.to_dict())):
        assert back == plain and not back.prunes_heads
        assert all(KV_GROUPS not in w for w in back.widths())


@pytest.mark.parametrize("order", ["first-with", "first-without"])
def test_mixing_layers_with_and_without_groups_is_refused(order):
    dims = ModelDims(2, 8, 8, 2)
    layers = [dict(layer) for layer in DispMasks.full(dims).layers]
    layers[0 if order == "first-with" else 1][KV_GROUPS] = torch.tensor([0])
    masks = DispMasks(layers)  # the index sets are fine on their own: the model's space decides
    with pytest.raises(MaskError) as e:
        masks.validate(dims)
    message = str(e.value)
    held = "[0]" if order == "first-with" else "[1]"
    assert f"in layers {held}" in message and "[0, 1]" in message and KV_GROUPS in message, message
    assert "in every declaring layer or in none" in message and "\n" not in message


def test_group_out_of_range_is_named_on_compact():
    dense = make_model("llama-wide-heads-gqa")  # 2 KV groups
    masks = with_groups(DispMasks.full(dims_of(dense)), [[0], [0, 2], [1]])
    with pytest.raises(MaskError, match=r"layer 1 kv_groups: index 2 is out of range for width 2"):
        dip_ext.compact(copy.deepcopy(dense), masks)
    with pytest.raises(MaskError, match=r"layer 1 kv_groups: mask must have shape \[2\]"):
        dip_ext.apply_masks(dense, [{KV_GROUPS: torch.ones(3)} if i == 1 else {} for i in range(3)])


def test_validate_refuses_groups_for_dims_without_groups():
    masks = with_groups(DispMasks.full(ModelDims(2, 8, 8, 2)), [[0], [1]])
    for call in (masks.validate, masks.to_config, masks.to_masks):
        with pytest.raises(MaskError, match="declares no KV groups"):
            call(ModelDims(2, 8, 8))
    with pytest.raises(ValueError, match=r"not optional structures of this model's family \(optional: none\)"):
        DispMasks.full(ModelDims(2, 8, 8), heads=True)
    # a config whose group bitmask does not match its declared group count
    config = masks.to_config(ModelDims(2, 8, 8, 2))
    config[KV_GROUPS] = 1
    with pytest.raises(MaskError, match="layer 1 kv_groups: bitmask does not match width 1"):
        DispMasks.from_config(config)


# ---- parameters and KV-cache bytes --------------------------------------------------------------------------------

def cached_bytes_per_token(model, ids) -> tuple[int, list[int]]:
    """KV-cache bytes per token of ``model`` measured from a forward's cache (layers with an attention), and the
    per-layer figures (0 for a removed attention)."""
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
    per_layer = []
    for layer, entry in zip(adapter_for(model).decoder_layers(model), past.layers):
        if layer.self_attn is None:
            per_layer.append(0)
            continue
        per_layer.append(sum(t[0, :, 0].numel() * t.element_size() for t in (entry.keys, entry.values)))
    return sum(per_layer), per_layer


@pytest.mark.parametrize("name", FAMILIES)
def test_param_counts_and_kv_cache_bytes(name, compacted_models):
    dense, masks, compacted = compacted_models(name)
    widths = masks.widths()
    assert decoder_linear_params(compacted) == dense_linear_params(compacted.config, widths)
    assert dip_ext.param_report(compacted).decoder_linear == decoder_linear_params(compacted)
    assert dip_ext.param_report(compacted).structures == ALL_STRUCTURES
    stored = sum(p.numel() for layer in adapter_for(compacted).decoder_layers(compacted) for m in layer.modules()
                 if isinstance(m, torch.nn.Linear) for p in m.parameters())
    assert stored == decoder_linear_params(compacted)
    # with every head kept the same sets store more (the groups really are counted)
    assert dense_linear_params(compacted.config, plain_masks(dense).widths()) > decoder_linear_params(compacted)

    ids = token_ids((2, 3), seed=6)  # shorter than every sliding window
    measured, per_layer = cached_bytes_per_token(compacted, ids)
    assert measured == kv_cache_bytes(compacted.config, widths, itemsize=4)
    assert kv_cache_bytes(dense.config, itemsize=4) == cached_bytes_per_token(dense, ids)[0]
    assert kv_cache_bytes(compacted.config, itemsize=4) == kv_cache_bytes(dense.config, itemsize=4)
    shapes = adapter_for(dense).shapes(dense.config)
    assert per_layer == [2 * len(g) * shapes.group_kv * 4 if i != 1 else 0
                         for i, g in enumerate(kept_groups(shapes.kv_heads))]
    assert kv_cache_bytes(dense.config, widths, itemsize=2) == measured // 2


def test_kv_cache_bytes_in_bf16(compacted_models):
    from dip_ext.model_state import weight_itemsize

    _, masks, compacted = compacted_models("llama-wide-heads-gqa")
    half = copy.deepcopy(compacted).to(torch.bfloat16)
    assert weight_itemsize(half) == 2
    measured, _ = cached_bytes_per_token(half, token_ids((1, 4), seed=12))
    # (1 + 2 groups kept in layers 0 and 2) · (key, value) · head_dim 16 · 2 bytes
    assert measured == kv_cache_bytes(half.config, masks.widths()) == (1 + 2) * 2 * 16 * 2
    assert kv_cache_bytes(half.config) == 3 * 2 * 2 * 16 * 2  # dense: 3 layers, 2 KV heads of 16, key + value


def test_param_count_by_hand_llama_gqa():
    """d 48, ffn 40, 4 heads of 16 over 2 KV heads, no biases: a group is 2 query heads (32 q rows / o columns)
    and one KV head (16 k rows, 16 v rows)."""
    dense = make_model("llama-wide-heads-gqa")
    masks = group_masks(dense)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    total = 0
    for i, w in enumerate(masks.widths()):
        g = w[KV_GROUPS]
        attn = w["attn_in"] * g * (32 + 16 + 16) + g * 32 * w["attn_out"] if g and w["attn_out"] else 0
        mlp = 2 * w["mlp_in"] * w["mlp_mid"] + w["mlp_mid"] * w["mlp_out"] if w["mlp_mid"] else 0
        total += attn + mlp
    assert decoder_linear_params(compacted) == dense_linear_params(dense.config, masks.widths()) == total


# ---- calibration and selection ------------------------------------------------------------------------------------

SEL_LAYERS = 4


@pytest.fixture(scope="module")
def selection():
    """A tiny GQA Llama (4 heads over 2 KV heads, 4 layers) and its calibration over random windows."""
    model = perturb_norms_and_biases(tiny_llama(0, num_hidden_layers=SEL_LAYERS))
    blocks = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(7))
    return model, blocks, run_calibration(model, blocks, progress=False)


def assert_group_scores(model, blocks, calib):
    """The score of a group: Σ_windows (∂L/∂m)² of its mask at the attention output projection's input."""
    dims = dims_of(model)
    assert all(layer[KV_GROUPS].shape == (dims.kv_groups,) and layer[KV_GROUPS].dtype == torch.float64
               for layer in calib.scores)
    masks = [{KV_GROUPS: torch.ones(dims.kv_groups, requires_grad=True)} for _ in range(dims.num_layers)]
    expected = torch.zeros(dims.num_layers, dims.kv_groups, dtype=torch.float64)
    with dip_ext.apply_masks(model, masks):
        for ids in blocks:
            loss = model(input_ids=ids[None], labels=ids[None]).loss
            grads = torch.autograd.grad(loss, [m[KV_GROUPS] for m in masks])
            expected += torch.stack(grads).double() ** 2
    got = torch.stack([layer[KV_GROUPS] for layer in calib.scores])
    assert (got > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-12)


def test_calibration_scores_groups(selection):
    assert_group_scores(*selection)


def test_calibration_scores_opt_heads():
    """OPT: every head is its own group."""
    torch.manual_seed(0)
    model = perturb_norms_and_biases(OPTForCausalLM(opt_config()).eval(), bias_std=0.1)  # 4 heads, 2 layers
    blocks = token_ids((2, 8), seed=13)
    assert_group_scores(model, blocks, run_calibration(model, blocks, progress=False))


@pytest.mark.parametrize("name", ["gemma3-mqa-window-softcap", "gemma3-gqa-bias-untied"])
def test_gemma3_groups_are_scored_by_column(name):
    """Gemma3 normalises the attention output, so the block is blind to a common scale of a layer's heads: with one
    KV group (MQA) the group's own mask gradient vanishes and the group would look free to drop. Its score is the
    sum over its columns of Σ_windows (∂L/∂m_c)², a mask per column of the attention output projection's input."""
    model = make_model(name)
    blocks = token_ids((3, 10), seed=17)
    calib = run_calibration(model, blocks, progress=False)
    dims, q_out = dims_of(model), adapter_for(model).shapes(model.config).q_out
    per_column = [{KV_GROUPS: torch.ones(q_out, requires_grad=True)} for _ in range(dims.num_layers)]
    per_group = [{KV_GROUPS: torch.ones(dims.kv_groups, requires_grad=True)} for _ in range(dims.num_layers)]
    expected = torch.zeros(dims.num_layers, dims.kv_groups, dtype=torch.float64)
    joint = torch.zeros(dims.num_layers, dims.kv_groups, dtype=torch.float64)
    for masks, out in ((per_column, expected), (per_group, joint)):
        with dip_ext.apply_masks(model, masks):
            for ids in blocks:
                loss = model(input_ids=ids[None], labels=ids[None]).loss
                grads = torch.stack(torch.autograd.grad(loss, [m[KV_GROUPS] for m in masks])).double()
                out += (grads ** 2).view(dims.num_layers, dims.kv_groups, -1).sum(-1)
    got = torch.stack([layer[KV_GROUPS] for layer in calib.scores])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-12)
    assert (got > 0).all()
    if dims.kv_groups == 1:  # what the column scores are for: a whole-layer group's own gradient is ~0
        assert (joint < 1e-6 * got).all(), (joint, got)


def marginal_costs_fit(budget: Budget, widths, dims: ModelDims, frozen=()) -> bool:
    """True when no single unit can be added back to any set that is not full (``frozen``: sets not to raise;
    nor the attention sets of a layer without groups, which cost nothing) without breaking the budget: the
    selection gave back all it could."""
    kept = float(budget.kept_linear(widths))
    for i, w in enumerate(widths):
        for s, n in w.items():
            headless = s in ("attn_in", "attn_out") and w.get(KV_GROUPS) == 0
            if n < dims.size(s) and s not in frozen and not headless:
                raised = [dict(x) for x in widths]
                raised[i][s] += 1
                if float(budget.kept_linear(raised)) <= budget.target_linear:
                    return False
    return kept <= budget.target_linear


def assert_top_groups_per_layer(masks: DispMasks, calib):
    for layer, scores in zip(masks.layers, calib.scores):
        kept, k = layer[KV_GROUPS], layer[KV_GROUPS].numel()
        order = torch.argsort(scores[KV_GROUPS], descending=True, stable=True)
        assert sorted(kept.tolist()) == sorted(order[:k].tolist())


def one_worthless_group_per_layer(calib):
    """A copy of ``calib`` where layer i's group i % 2 has score 0 and the other a high score: a selection with
    heads drops the worthless ones first, layer i then keeps group 1 - i % 2."""
    calib = copy.deepcopy(calib)
    for i, layer in enumerate(calib.scores):
        layer[KV_GROUPS] = torch.tensor([1e3, 0.0] if i % 2 else [0.0, 1e3], dtype=torch.float64)
    return calib


ALTERNATE = [[1], [0], [1], [0]]  # the groups kept with :func:`one_worthless_group_per_layer`


@pytest.mark.parametrize("scores", ["calibrated", "one-worthless-group-per-layer"])
def test_oneshot_with_heads_meets_the_parameter_budget(selection, scores):
    model, _, calib = selection
    if scores != "calibrated":
        calib = one_worthless_group_per_layer(calib)
    dims = dims_of(model)
    budget = Budget.for_model(model, 0.4, heads=True)
    assert budget.heads and budget.kv_groups_kept is None and budget.space == dims.space()
    assert all(budget.space.names(i) == ALL_STRUCTURES for i in range(dims.num_layers))
    masks = oneshot_masks(calib, budget, 1)
    assert masks.prunes_heads
    widths = masks.widths()
    assert budget.kept_linear(widths) <= budget.target_linear
    assert marginal_costs_fit(budget, widths, dims)  # within one unit's cost of the target
    assert_top_groups_per_layer(masks, calib)
    if scores != "calibrated":
        assert [layer[KV_GROUPS].tolist() for layer in masks.layers] == ALTERNATE
    assert oneshot_masks(calib, budget, 1) == masks  # deterministic
    # the compacted model stores what the budget counted
    compacted = dip_ext.compact(copy.deepcopy(model), masks)
    assert decoder_linear_params(compacted) == budget.kept_linear(widths)


@pytest.mark.parametrize("multiple_of", [1, 8])
@pytest.mark.parametrize("ratio, kv_ratio, groups_kept", [(0.3, 0.5, 4), (0.5, 0.75, 2)])
def test_oneshot_with_a_kv_target(selection, multiple_of, ratio, kv_ratio, groups_kept):
    model, _, calib = selection
    dims = dims_of(model)
    budget = Budget.for_model(model, ratio, kv_ratio=kv_ratio)
    assert budget.heads and budget.kv_ratio == kv_ratio and budget.kv_groups_kept == groups_kept  # of 4 · 2
    masks = oneshot_masks(calib, budget, multiple_of)
    widths = masks.widths()
    assert budget.kept_linear(widths) <= budget.target_linear
    kept = sum(w[KV_GROUPS] for w in widths)
    assert kept <= budget.kv_groups_kept
    dense_bytes = kv_cache_bytes(model.config)
    assert kv_cache_bytes(model.config, widths) <= (1 - kv_ratio) * dense_bytes
    described = budget.describe(widths)
    assert described["kv_cache_bytes_per_token_dense"] == dense_bytes
    assert described["kv_cache_bytes_per_token_kept"] == kv_cache_bytes(model.config, widths)
    # the groups of lowest score over all layers go first; each layer keeps its best
    scores = torch.stack([layer[KV_GROUPS] for layer in calib.scores]).reshape(-1)
    lowest = torch.argsort(scores, stable=True)[:scores.numel() - budget.kv_groups_kept]
    kept_flat = torch.stack([masks.to_masks(dims)[i][KV_GROUPS] for i in range(SEL_LAYERS)]).reshape(-1)
    assert (kept_flat[lowest] == 0).all()
    assert_top_groups_per_layer(masks, calib)
    if multiple_of == 1:
        assert marginal_costs_fit(budget, widths, dims, frozen=(KV_GROUPS,))
    else:
        for w in widths:
            for s in STRUCTURES:
                assert w[s] % 8 == 0 or w[s] == dims.size(s), (s, w)
    assert oneshot_masks(calib, budget, multiple_of) == masks  # deterministic


@pytest.mark.parametrize("kv_ratio", [None, 0.5])
def test_kv_group_counts_are_not_rounded_to_multiple_of(selection, kv_ratio):
    """With one worthless group per layer (and, with a 50 % KV target, a target of one group per layer) every
    layer keeps one group of two, which a multiple of 8 must not round (to 0 or 2)."""
    model, _, calib = selection
    calib = one_worthless_group_per_layer(calib)
    budget = Budget.for_model(model, 0.3, heads=True, kv_ratio=kv_ratio)
    dims = dims_of(model)
    for multiple_of in (1, 8):
        masks = oneshot_masks(calib, budget, multiple_of)
        assert [layer[KV_GROUPS].tolist() for layer in masks.layers] == ALTERNATE, multiple_of
        widths = masks.widths()
        assert budget.kept_linear(widths) <= budget.target_linear
        assert all(w[s] % multiple_of == 0 or w[s] == dims.size(s) for w in widths for s in STRUCTURES)


def test_kept_groups_follow_the_scores(selection):
    """Raising one group's score above every other keeps it; sinking it drops it (KV target of one group a layer)."""
    model, _, calib = selection
    budget = Budget.for_model(model, 0.2, kv_ratio=0.5)
    for high, low in ((0, 1), (1, 0)):
        probe = copy.deepcopy(calib)
        probe.scores[2][KV_GROUPS] = torch.zeros(2, dtype=torch.float64)
        probe.scores[2][KV_GROUPS][high] = 1e6
        probe.scores[2][KV_GROUPS][low] = 0.0
        kept = oneshot_masks(probe, budget)[2][KV_GROUPS].tolist()
        assert high in kept and low not in kept


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_budget_refuses_bad_kv_ratio(selection):
    model = selection[0]
    for bad in (0, 1.5, 1, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"kv_ratio must be in \(0, 1\)"):
            Budget.for_model(model, 0.3, kv_ratio=bad)


def test_budget_refuses_a_kv_target_that_removes_more_than_the_ratio(selection):
    """Dropping the groups a KV target asks for removes at least their parameters: a ratio below that cannot be met."""
    model = selection[0]
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    n_rep = config.num_attention_heads // config.num_key_value_heads
    group = config.hidden_size * (n_rep + 2) * head_dim + n_rep * head_dim * config.hidden_size  # q/k/v rows, o cols
    dense = Budget.for_model(model, 0.3).dense_linear
    assert Budget.for_model(model, 0.3, kv_ratio=0.5).kv_groups_kept == 4  # 4 of 8 groups dropped
    floor = 4 * group / dense
    with pytest.raises(ValueError, match=rf"kv_ratio 0.5 alone removes {100 * floor:.1f} % of the decoder-linear "
                                         r"parameters, more than the 5.0 % that ratio 0.05 asks for"):
        Budget.for_model(model, 0.05, kv_ratio=0.5)
    Budget.for_model(model, floor + 0.01, kv_ratio=0.5)  # just above it: met


def test_oneshot_refuses_a_calibration_without_group_scores(selection):
    model, _, calib = selection
    probe = copy.deepcopy(calib)
    for layer in probe.scores:
        del layer[KV_GROUPS]
    with pytest.raises(ValueError, match="calibration scores"):
        oneshot_masks(probe, Budget.for_model(model, 0.3, heads=True))


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    """A tiny Llama folder (4 heads over 2 KV heads) with the word tokenizer, and a file: text."""
    folder = tmp_path_factory.mktemp("kv_cli")
    tiny_llama(0, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(
        folder / "model")
    make_word_tokenizer().save_pretrained(folder / "model")
    return folder / "model", write_word_text(folder)


def prune_args(model, text, out, *extra):
    return ("prune", "--model", model, "--calibration", text, "--seq-len", 16, "--calibration-windows", 4,
            "--eval-text", text, "--eval-windows", 1, "--eval-seq-len", 16, "--no-speed", "--quiet", "--out", out,
            "--recover", "off", *extra)


@pytest.mark.parametrize("extra, match", [
    (("--kv-ratio", "1.5"), "kv_ratio must be"),
    (("--kv-ratio", "0"), "kv_ratio must be"),
    (("--method", "dependent", "--prune-heads"), "does not prune KV groups"),
    (("--method", "dependent", "--kv-ratio", "0.5"), "does not prune KV groups"),
    (("--ratio", "0.05", "--kv-ratio", "0.9"), "alone removes"),
])
def test_cli_bad_kv_options_are_one_line_exit_2(capsys, tmp_path, cli_folder, monkeypatch, extra, match):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    model, text = cli_folder
    code, out, err = run_cli(capsys, *prune_args(model, text, tmp_path / "out", *extra))
    assert code == 2 and err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "out").exists()


def test_cli_prunes_groups_end_to_end(capsys, tmp_path, cli_folder, monkeypatch):
    monkeypatch.setenv("DIP_EXT_CACHE", str(tmp_path / "cache"))
    model, text = cli_folder
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *prune_args(model, text, out, "--method", "oneshot", "--ratio", "0.3",
                                               "--kv-ratio", "0.5"))
    assert code == 0, err
    loaded = dip_ext.from_pretrained(out)
    masks = loaded.disp_masks
    assert masks.prunes_heads and sum(w[KV_GROUPS] for w in masks.widths()) <= 2
    dense = AutoModelForCausalLM.from_pretrained(model)
    assert kv_cache_bytes(loaded.config, masks.widths()) <= 0.5 * kv_cache_bytes(dense.config)


# ---- torch.compile and peft ---------------------------------------------------------------------------------------

def test_compile_matches_eager_and_reference():
    dense = make_model("llama-wide-heads-gqa", attn="sdpa")
    masks = group_masks(dense)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    torch._dynamo.reset()
    ids = token_ids((2, 9), seed=8)
    compiled = torch.compile(compacted, fullgraph=True, backend="aot_eager")  # fullgraph: a break would raise
    with torch.no_grad():
        expected = compacted(ids).logits
        got = compiled(ids).logits
        with dip_ext.apply_masks(dense, masks):
            ref = dense(ids).logits
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_rel_close(got, ref)


@pytest.mark.parametrize("name", ["llama-wide-heads-gqa", "opt-6-heads"])
def test_lora_merges_exactly(name):
    peft = pytest.importorskip("peft")
    dense = make_model(name)
    masks = group_masks(dense)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    ids = token_ids((2, 6), seed=9)
    with torch.no_grad():
        base = compacted(ids).logits
        with dip_ext.apply_masks(dense, masks):
            assert_rel_close(base, dense(ids).logits)
    assert_lora_merges_exactly(peft, compacted, ids)


def test_decode_session_matches_generate_and_holds_the_kept_groups(compacted_models):
    """The benchmark's capturable decode step (a StaticCache allocated from the config, filled per layer) on a
    model with groups pruned: greedy tokens ≡ the masked reference's generate; the cache holds the kept groups."""
    from dip_ext.decoding import DecodeSession

    dense, masks, compacted = compacted_models("llama-wide-heads-gqa")
    session = DecodeSession(compacted, batch=2, prompt_len=5, max_len=16, seed=3)
    with torch.no_grad():
        session.prefill()
        tokens = [session.ids.clone()]
        for _ in range(4):
            session.step()
            tokens.append(session.ids.clone())
        with dip_ext.apply_masks(dense, masks):
            ref = dense.generate(session.prompt, attention_mask=torch.ones_like(session.prompt), max_new_tokens=5,
                                 do_sample=False, pad_token_id=0)
    assert torch.equal(torch.cat(tokens, 1), ref[:, 5:])
    placeholder = 2 * 2 * 16 * 1 * 1 * 4  # layer 1: a zero key and value of one head of width 1 per position
    assert session.cache_bytes() == 2 * 16 * kv_cache_bytes(compacted.config, masks.widths(), itemsize=4) + placeholder


def test_heads_on_a_model_with_one_group_per_layer_warn():
    """With multi-query attention a group is a layer's whole attention: asking for heads warns; GQA does not."""
    with pytest.warns(UserWarning, match="one KV group per layer"):
        Budget.for_model(tiny_llama(0, num_key_value_heads=1), 0.3, heads=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Budget.for_model(tiny_llama(0), 0.3, kv_ratio=0.3)
