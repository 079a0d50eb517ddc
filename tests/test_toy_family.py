"""A family declared outside dip_ext (``toy_moe_family.py``) with a structure no built-in family has, whole
``experts``, and layers that differ (even layers: the five DISP sets; odd layers: ``experts`` instead of
``mlp_mid``), registered with :func:`dip_ext.families.register_family`.

It proves that a new structure needs no edit outside its family file and the registry: the package's code holds
no string naming it, and yet masks, the masked reference, compaction (≡ the masked reference in fp32, also with
KV groups, an empty expert set and a removed attention), parameter counts (against the modules), calibration scores
(against Σ(∂L/∂m)² computed directly), one-shot and hypernetwork selection (budget met, experts never rounded to
``multiple_of``), ``prune_and_compact``, save / load and the masks' config form all work on it.
"""

import ast
import copy
from pathlib import Path

import pytest
import torch
from helpers import assert_rel_close, perturb_norms_and_biases
from toy_moe_family import EXPERTS, FAMILY, ToyMoEConfig, ToyMoEForCausalLM

import dip_ext
from dip_ext import DispMasks
from dip_ext.calibration import run_calibration
from dip_ext.families import adapter_for, llama, register_family, unregister_family
from dip_ext.masking import apply_masks
from dip_ext.params import decoder_linear_params
from dip_ext.selection.budget import Budget
from dip_ext.selection.oneshot import oneshot_masks

VOCAB, SEQ = 64, 12
BLOCKS = torch.randint(0, VOCAB, (6, SEQ), generator=torch.Generator().manual_seed(11))


@pytest.fixture(autouse=True, scope="module")
def registered(one_thread):
    register_family(FAMILY)
    yield
    unregister_family(FAMILY.adapter.name)


def make_toy(seed: int = 0) -> ToyMoEForCausalLM:
    config = ToyMoEConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_experts=4,
                          expert_size=16, attn_implementation="eager")
    torch.manual_seed(seed)
    return perturb_norms_and_biases(ToyMoEForCausalLM(config).eval())


def random_masks(space, seed: int = 0, keep: float = 0.6, empty=None) -> DispMasks:
    """Every unit of every structure of ``space`` kept with probability ``keep``; ``empty[i]``: sets of layer i
    that keep nothing."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, structures in enumerate(space.layers):
        layer = {s.name: (torch.rand(s.size, generator=g) < keep).nonzero().flatten() for s in structures}
        for name in (empty or {}).get(i, ()):
            layer[name] = torch.empty(0, dtype=torch.long)
        layers.append(layer)
    return DispMasks(layers)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


def test_the_family_declares_its_space():
    model = make_toy()
    adapter = adapter_for(model)
    assert adapter is FAMILY.adapter
    space = adapter.space(model.config)
    assert space.names(0) == ("attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out", "kv_groups")
    assert space.names(1) == ("attn_in", "attn_out", "mlp_in", EXPERTS, "mlp_out", "kv_groups")
    assert space.size(1, EXPERTS) == 4 and space.size(0, "mlp_mid") == 48
    assert space.structure(1, EXPERTS).whole_units and not space.structure(1, EXPERTS).optional


def test_no_package_code_names_the_new_structure():
    """No string constant of dip_ext's code (docstrings aside) is "experts": nothing outside the family file and
    the registry knows the structure."""
    root = Path(dip_ext.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{path.name}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and EXPERTS in node.value.lower()]
    assert not found, found


@pytest.mark.parametrize("heads", [False, True])
def test_compacted_equals_masked_reference(heads):
    """Layer 1 keeps no expert (its MLP removed), layer 2 no attention output, layer 3 every expert."""
    dense = make_toy(seed=1)
    space = adapter_for(dense).space(dense.config).select(["kv_groups"] if heads else [])
    masks = random_masks(space, seed=2, empty={1: [EXPERTS], 2: ["attn_out"]})
    masks.layers[3][EXPERTS] = torch.arange(4)
    if heads:
        masks.layers[0]["kv_groups"] = torch.tensor([1])
    with apply_masks(dense, masks):
        reference = logits(dense, IDS)
    compacted = dip_ext.compact(copy.deepcopy(dense), masks)
    assert compacted.model.layers[1].mlp is None and compacted.model.layers[2].self_attn is None
    assert len(compacted.model.layers[3].mlp.experts) == 4
    assert_rel_close(logits(compacted, IDS), reference)
    budget = Budget.for_model(dense, 0.3)
    assert decoder_linear_params(compacted) == budget.kept_linear(masks.widths())


def test_parameter_counts_match_the_dense_modules():
    dense = make_toy()
    budget = Budget.for_model(dense, 0.3)
    assert budget.dense_linear == decoder_linear_params(dense)
    assert budget.kept_linear(adapter_for(dense).space(dense.config).required().full_widths()) == budget.dense_linear


def test_calibration_scores_the_experts():
    """The experts' scores equal Σ_windows (∂L/∂m)² of a mask on the router's probabilities, computed here."""
    model = make_toy(seed=4)
    calib = run_calibration(model, BLOCKS, progress=False)
    assert EXPERTS not in calib.scores[0] and "mlp_mid" not in calib.scores[1]
    expected = []
    for i in (1, 3):
        m = torch.ones(4, requires_grad=True)
        total = torch.zeros(4, dtype=torch.float64)
        with apply_masks(model, [{EXPERTS: m} if j == i else {} for j in range(4)]):
            for w in BLOCKS:
                ids = w.unsqueeze(0)
                (g,) = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, m)
                total += g.double() ** 2
        expected.append(total)
    for i, want in zip((1, 3), expected):
        got = calib.scores[i][EXPERTS]
        assert got.shape == (4,) and got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-12), (got, want)


@pytest.mark.parametrize("multiple_of", [1, 8])
def test_oneshot_meets_the_budget_in_whole_experts(multiple_of):
    model = make_toy(seed=5)
    calib = run_calibration(model, BLOCKS, progress=False)
    budget = Budget.for_model(model, 0.4)
    masks = oneshot_masks(calib, budget, multiple_of)
    masks.validate(budget.space)
    widths = masks.widths()
    assert budget.kept_linear(widths) <= budget.target_linear
    assert any(w[EXPERTS] < 4 for w in widths if EXPERTS in w)  # experts compete for the budget
    for w in widths:
        assert all(w[s] % multiple_of == 0 or w[s] == 32 for s in ("attn_in", "attn_out", "mlp_in", "mlp_out"))


@pytest.mark.parametrize("method", ["oneshot", "hypernetwork"])
def test_prune_and_compact_save_and_load(method, tmp_path):
    model = make_toy(seed=6)
    dense = copy.deepcopy(model)
    trains = {"steps": 3} if method == "hypernetwork" else {}
    out, report = dip_ext.prune_and_compact(
        model, None, ratio=0.4, calibration=BLOCKS, method=method, eval_texts=(), val_windows=0,
        measure_speed=False, progress=False, seq_len=SEQ, refit="off", recover="off", **trains)
    masks = report.masks
    assert any(EXPERTS in layer for layer in masks.layers)
    assert report.budget["kept_decoder_linear"] == decoder_linear_params(out)
    assert report.budget["kept_decoder_linear"] <= Budget.for_model(dense, 0.4).target_linear
    with apply_masks(dense, masks):
        assert_rel_close(logits(out, IDS), logits(dense, IDS))
    out.save_pretrained(tmp_path / "toy")
    loaded = dip_ext.from_pretrained(tmp_path / "toy", attn_implementation="eager")
    assert loaded.disp_masks == masks
    assert torch.equal(logits(loaded, IDS), logits(out, IDS))


def test_masks_config_form_stores_the_space():
    model = make_toy()
    space = adapter_for(model).space(model.config)
    masks = random_masks(space.required(), seed=7)
    data = masks.to_config(space)
    assert data["format"] == "dip_ext.bitmask-hex.v2"
    assert DispMasks.from_config(data) == masks


def test_masks_that_do_not_fit_the_space_are_refused():
    model = make_toy()
    space = adapter_for(model).space(model.config)
    masks = random_masks(space.required(), seed=8)
    wrong = DispMasks([dict(layer) for layer in masks.layers])
    wrong.layers[1]["mlp_mid"] = torch.arange(3)  # an odd layer has no MLP channels
    with pytest.raises(dip_ext.MaskError, match=r"layer 1: .*unknown \['mlp_mid'\]"):
        wrong.validate(space)
    del masks.layers[3][EXPERTS]
    with pytest.raises(dip_ext.MaskError, match=r"layer 3: .*missing \['experts'\]"):
        dip_ext.compact(model, masks)


def test_the_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_family(FAMILY)
    with pytest.raises(ValueError, match="already registered"):
        register_family(llama.FAMILY)
    with pytest.raises(ValueError, match="built-in|no registered"):
        unregister_family("llama")


def test_a_family_that_miscounts_or_misses_a_mask_point_is_told(monkeypatch):
    model = make_toy()
    adapter = FAMILY.adapter
    counts = adapter.linear_params

    def without_experts(config, widths, layer=0):
        out = counts(config, widths, layer)
        return {**out, "mlp": 0} if EXPERTS in widths else out

    monkeypatch.setattr(adapter, "linear_params", without_experts)
    with pytest.raises(ValueError, match="every budget would be wrong"):
        Budget.for_model(model, 0.3)
    monkeypatch.setattr(adapter, "linear_params", lambda config, widths, layer=0: 0)
    with pytest.raises(ValueError, match="returns a dict of parameter counts"):
        Budget.for_model(model, 0.3)
    monkeypatch.undo()
    points = adapter.dense_mask_points

    def no_expert_point(layer):
        return {s: p for s, p in points(layer).items() if s != EXPERTS}

    monkeypatch.setattr(adapter, "dense_mask_points", no_expert_point)
    with pytest.raises(ValueError, match=r"layer 1 declares \['experts'\] .* no mask point"):
        apply_masks(model, None)


def test_family_classes_declared_in_the_wrong_order_are_refused():
    from toy_moe_family import DipExtToyMoEModel, ToyMoEForCausalLM

    from dip_ext.families.hf_classes import DipExtForCausalLM

    class Reversed(ToyMoEForCausalLM, DipExtForCausalLM):
        config_class = FAMILY.config
        disp_adapter = FAMILY.adapter
        disp_base_model = DipExtToyMoEModel

    with pytest.raises(TypeError, match="the mixin first"):
        type(FAMILY).of(Reversed)


def test_loading_an_unregistered_family_says_how(tmp_path):
    model = make_toy()
    masks = DispMasks.full(adapter_for(model).space(model.config))
    dip_ext.compact(model, masks).save_pretrained(tmp_path / "toy")
    unregister_family(FAMILY.adapter.name)
    try:
        with pytest.raises(dip_ext.UnsupportedModelError, match="register_family"):
            dip_ext.from_pretrained(tmp_path / "toy")
    finally:
        register_family(FAMILY)
    remote = (tmp_path / "toy" / "modeling_dip_ext.py").read_text()
    assert "from toy_moe_family import" in remote
