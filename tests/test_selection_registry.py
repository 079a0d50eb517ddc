"""A selection method is one class implementing the protocol plus one ``register_method`` line: a tiny "random"
method defined here, registered and run through ``get_method(...).select(SelectionInputs(...), None)``, meets the
budget through the one budget fitter like the built-in methods."""

from __future__ import annotations

import pytest
import torch

from dip_ext.calibration import run_calibration
from dip_ext.masks import STRUCTURES, DispMasks
from dip_ext.selection import (Budget, SelectionInputs, SelectionResult, fit_multiple, get_method, method_names,
                               register_method, unregister_method)
from dip_ext.selection.slots import per_layer, slot_sizes, slots

transformers = pytest.importorskip("transformers")


class RandomMasks:
    """Random masks meeting the budget: from empty sets, whole chunks of random sets are added while any fits."""

    name = "random_test"
    options_class = None

    def uses_validation(self, options) -> bool:
        return False

    def select(self, inputs: SelectionInputs, options=None) -> SelectionResult:
        space = inputs.budget.space
        gen = torch.Generator().manual_seed(inputs.seed)
        sizes = slot_sizes(space)

        def widths(counts):
            return per_layer(counts.tolist(), space)

        def random_priority(counts, add):
            return torch.rand(counts.shape, generator=gen, dtype=torch.float64)

        counts = fit_multiple(inputs.budget, widths, torch.zeros_like(sizes), sizes, inputs.multiple_of,
                              random_priority)
        layers = [{} for _ in range(space.num_layers)]
        for (i, s), n, k in zip(slots(space), sizes.tolist(), counts.tolist()):
            layers[i][s] = torch.randperm(n, generator=gen)[:k].sort().values
        return SelectionResult(self.name, DispMasks(layers))


@pytest.fixture(scope="module")
def setup():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    return model, windows, run_calibration(model, windows, progress=False)


@pytest.fixture
def registered():
    register_method(RandomMasks)
    yield
    unregister_method(RandomMasks.name)


@pytest.mark.parametrize("multiple_of", [1, 8])
def test_a_method_in_one_class_runs_through_the_registry(setup, registered, multiple_of):
    model, windows, calib = setup
    assert "random_test" in method_names()
    budget = Budget.for_model(model, 0.4)
    inputs = SelectionInputs(model, budget, calib, windows, multiple_of=multiple_of, seed=3, progress=False)
    result = get_method("random_test").select(inputs, None)
    assert result.method == "random_test"
    widths = result.masks.widths()
    result.masks.validate(budget.space)
    assert budget.kept_linear(widths) <= budget.target_linear
    for i, w in enumerate(widths):
        for s in STRUCTURES:
            n = budget.space.size(i, s)
            assert w[s] % multiple_of == 0 or w[s] == n
            if w[s] < n:  # the fitter filled the budget: no further chunk fits
                more = [dict(x) for x in widths]
                more[i][s] += min(multiple_of, n - w[s])
                assert budget.kept_linear(more) > budget.target_linear
    assert result.masks == get_method("random_test").select(inputs, None).masks  # seeded
    # a built-in method through the same door, on the same inputs
    assert budget.kept_linear(get_method("oneshot").select(inputs, None).masks.widths()) <= budget.target_linear


def test_unregistered_and_malformed_methods_are_refused(registered):
    unregister_method("random_test")
    with pytest.raises(ValueError, match="unknown method 'random_test'"):
        get_method("random_test")
    register_method(RandomMasks)  # the fixture removes it again

    class NoSelect:
        name = "broken"
        options_class = None

        def uses_validation(self, options):
            return False
    with pytest.raises(TypeError, match="select"):
        register_method(NoSelect)
    with pytest.raises(ValueError, match="unknown method"):
        unregister_method("broken")
