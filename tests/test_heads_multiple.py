"""``heads_multiple_of``: with KV groups pruned, every layer keeps a multiple of that many groups or all of them (so
tensor parallelism over that many ranks can split each layer's heads), by one-shot, the hypernetwork export and the
width fitter alike; the budget is still met; contradictory or bad values are refused."""

import pytest
import torch
from helpers import perturb_norms_and_biases, run_cli, tiny_llama

from dip_ext import PruneConfig, Pruner, RefitConfig
from dip_ext.config import EvalConfig
from dip_ext.masks import KV_GROUPS
from dip_ext.selection.budget import Budget, fit_layer_widths
from dip_ext.selection.kv_target import kv_target_drops, most_groups_kept
from dip_ext.selection.hypernetwork.export import export_masks

GROUPS = 4  # KV heads per layer of the model below (8 query heads)
LAYERS = 4
WINDOWS = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(3))
NO_EVAL = EvalConfig(eval_windows=0, speed=False)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield one_thread


#: per layer, KV groups whose heads barely reach the output (their o_proj columns scaled by 1e-3): one-shot drops
#: them first, so layers keep odd group counts without the step
WEAK = ((0,), (1, 2, 3), (2,), ())


def make_model(seed: int = 0, weak: bool = True):
    model = perturb_norms_and_biases(tiny_llama(seed, num_attention_heads=8, num_key_value_heads=GROUPS,
                                                num_hidden_layers=LAYERS))
    cols = model.config.hidden_size // GROUPS  # o_proj columns of one group's query heads
    with torch.no_grad():
        for layer, groups in zip(model.model.layers, WEAK if weak else ((),) * LAYERS):
            for g in groups:
                layer.self_attn.o_proj.weight[:, g * cols:(g + 1) * cols] *= 1e-3
    return model


def group_counts(masks) -> list[int]:
    return [w[KV_GROUPS] for w in masks.widths()]


def oneshot(model, **config):
    pruner = Pruner(model, None, PruneConfig(method="oneshot", val_windows=0, seq_len=16, prune_heads=True, **config),
                    refit=RefitConfig(refit="off"), evaluation=NO_EVAL, calibration_tokens=WINDOWS, progress=False)
    return pruner, pruner.select().masks


@pytest.mark.parametrize("ratio,kv_ratio", [(0.3, None), (0.5, None), (0.4, 0.2), (0.6, 0.45)])
def test_oneshot_keeps_a_multiple_of_groups_per_layer_and_meets_the_budget(ratio, kv_ratio):
    _, plain = oneshot(make_model(), ratio=ratio, kv_ratio=kv_ratio)
    # the case is one where rounding matters: some layer keeps an odd count without the option
    assert any(c % 2 for c in group_counts(plain)), group_counts(plain)
    pruner, masks = oneshot(make_model(), ratio=ratio, kv_ratio=kv_ratio, heads_multiple_of=2)
    counts = group_counts(masks)
    assert all(c % 2 == 0 for c in counts), counts
    budget = pruner.budget
    assert budget.heads_multiple_of == 2
    assert budget.kept_linear(masks.widths()) <= budget.target_linear
    if kv_ratio is not None:
        assert sum(counts) <= budget.kv_groups_kept
    # the kept groups of a layer are still among its best-scored ones: the same as the plain selection's where the
    # plain count was already even
    for c, p, m, pm in zip(counts, group_counts(plain), masks.layers, plain.layers):
        if c == p:
            assert torch.equal(m[KV_GROUPS], pm[KV_GROUPS])


def test_oneshot_under_a_kv_target_keeps_as_many_groups_as_the_target_allows():
    """The target's drops land on the step: rounding them down afterwards removed 2 groups more than asked."""
    pruner, masks = oneshot(make_model(), ratio=0.6, kv_ratio=0.45, heads_multiple_of=2)
    assert pruner.budget.kv_groups_kept == 8 and sum(group_counts(masks)) == 8, group_counts(masks)


def test_kv_target_drops_step_down_cheapest_first_then_give_back_what_fits():
    # slot 0: 3 KV groups, slot 1: a non-KV set (never dropped here), slot 2: 4 KV groups; step 2, at most 5 kept
    scores = torch.tensor([10.0, 0.1, 9.0, 0.0, 0.0, 5.0, 2.0, 4.0, 3.0])
    slot = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    kv_slots = torch.tensor([True, False, True])
    # slot 0 steps 3 -> 2 (mean 0.1), slot 2 steps 4 -> 2 (mean 2.5, not slot 0's 2 -> 0 at 9.5): 4 kept; slot 0's
    # third group (+1) fits under 5 again and is given back
    dropped = kv_target_drops(scores, slot, kv_slots, cap=5, step=2)
    assert dropped.tolist() == [False, False, False, False, False, False, True, False, True]
    # step 1: the lowest-scored groups over all layers, ties to the higher index
    dropped = kv_target_drops(torch.tensor([1.0, 1.0, 0.0, 2.0, 1.0]), torch.tensor([0, 0, 1, 2, 2]), kv_slots, cap=2)
    assert dropped.tolist() == [False, True, False, False, True]


def test_a_step_wider_than_a_layer_keeps_it_whole_or_removes_its_attention():
    _, masks = oneshot(make_model(), ratio=0.4, heads_multiple_of=8)
    assert set(group_counts(masks)) <= {0, GROUPS}, group_counts(masks)


def _random_logits(model, seed):
    g = torch.Generator().manual_seed(seed)
    space = Budget.for_model(model, 0.4, heads=True).space
    return [{s: torch.randn(space.structure(i, s).size, generator=g) for s in space.names(i)}
            for i in range(space.num_layers)]


@pytest.mark.parametrize("multiple_of", [1, 4])
@pytest.mark.parametrize("kv_ratio", [None, 0.5])
def test_hypernetwork_export_rounds_groups_to_the_step(multiple_of, kv_ratio):
    model = make_model()
    found_odd = False
    for seed in range(4):
        logits = _random_logits(model, seed)
        plain, _ = export_masks(logits, Budget.for_model(model, 0.4, heads=True, kv_ratio=kv_ratio),
                                multiple_of=multiple_of)
        found_odd |= any(c % 2 for c in group_counts(plain))
        budget = Budget.for_model(model, 0.4, heads=True, kv_ratio=kv_ratio, heads_multiple_of=2)
        masks, info = export_masks(logits, budget, multiple_of=multiple_of)
        counts = group_counts(masks)
        assert all(c % 2 == 0 for c in counts), (seed, counts)
        assert budget.kept_linear(masks.widths()) <= budget.target_linear
        assert info.kept_kv_groups == sum(counts)
        if kv_ratio is not None:
            assert sum(counts) <= budget.kv_groups_kept
        if multiple_of > 1:
            assert all(w[s] % multiple_of == 0 or w[s] == budget.space.structure(i, s).size
                       for i, w in enumerate(masks.widths()) for s in w if s != KV_GROUPS)
    assert found_odd  # without the step some export kept an odd count: the rounding was exercised


@pytest.mark.parametrize("kv_ratio", [0.5, 0.6])
def test_hypernetwork_export_under_a_kv_target_keeps_as_many_groups_as_the_target_allows(kv_ratio):
    model = make_model()
    for seed in range(3):
        budget = Budget.for_model(model, 0.4, heads=True, kv_ratio=kv_ratio, heads_multiple_of=2)
        assert budget.kv_groups_kept % 2 == 0
        masks, _ = export_masks(_random_logits(model, seed), budget)
        assert sum(group_counts(masks)) == budget.kv_groups_kept, (seed, group_counts(masks))


def test_width_fitter_rounds_groups_down_to_the_step():
    model = make_model()
    budget = Budget.for_model(model, 0.4, heads=True, heads_multiple_of=2)
    full = budget.space.full_widths()
    widths = [{**w, KV_GROUPS: c} for w, c in zip(full, (1, 3, 4, 2))]
    widths = [{s: (n if s == KV_GROUPS else n // 2) for s, n in w.items()} for w in widths]
    fitted = fit_layer_widths(budget, widths, 1)
    assert [w[KV_GROUPS] for w in fitted] == [0, 2, 4, 2]
    assert budget.kept_linear(fitted) <= budget.target_linear


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_budget_refuses_a_bad_step(value):
    with pytest.raises(ValueError, match="heads_multiple_of must be an integer >= 1"):
        Budget.for_model(make_model(), 0.4, heads=True, heads_multiple_of=value)


def test_config_refuses_a_step_with_heads_kept_whole():
    with pytest.raises(ValueError, match="heads_multiple_of 2 rounds pruned KV groups, but prune_heads is off"):
        PruneConfig(prune_heads=False, heads_multiple_of=2)
    PruneConfig(prune_heads=False, kv_ratio=0.3, heads_multiple_of=2)  # a KV target prunes groups anyway
    PruneConfig(heads_multiple_of=2)  # automatic: moot where the family keeps heads whole


def test_cli_refuses_a_step_with_heads_kept_whole_in_one_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "prune", "--model", "tiny-llama", "--no-prune-heads", "--heads-multiple-of",
                             "2", "--out", str(tmp_path / "o"))
    assert code == 2 and "heads_multiple_of 2 rounds pruned KV groups" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_most_groups_kept_spreads_the_cap_on_the_step():
    assert most_groups_kept([3, 3, 3], cap=7) == [3, 2, 2]
    assert most_groups_kept([4, 4, 4], cap=7, step=2) == [2, 2, 2]  # a fourth step of 2 would pass the cap
    assert most_groups_kept([3, 3, 3], cap=7, step=2) == [3, 2, 2]  # 2 -> 3 is a layer's last (whole) step
    assert most_groups_kept([1, 4], cap=9, step=2) == [1, 4]
    assert most_groups_kept([4, 4], cap=0, step=2) == [0, 0]


def test_a_kv_target_the_step_cannot_meet_within_the_ratio_is_refused():
    # 16 groups, kv_ratio 0.3 keeps at most 11: by one (3, 3, 3, 2), by whole layers of 4 only 8 (4, 4, 0, 0). A
    # ratio between what those keep is feasible at step 1 and refused at step 4, before any work
    model = make_model(weak=False)
    budget = Budget.for_model(model, 0.5, kv_ratio=0.3)
    widths = budget.space.full_widths()

    def kept(groups):
        for w, n in zip(widths, groups):
            w[KV_GROUPS] = n
        return float(budget.kept_ratio(widths))

    ratio = 1 - (kept([3, 3, 3, 2]) + kept([4, 4, 0, 0])) / 2
    assert Budget.for_model(model, ratio, kv_ratio=0.3).kv_groups_kept == 11
    with pytest.raises(ValueError, match="alone removes"):
        Budget.for_model(model, ratio, kv_ratio=0.3, heads_multiple_of=4)
