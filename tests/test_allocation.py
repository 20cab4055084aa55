"""The parameter target is met within ±1 point of total parameters."""

import pytest
from testing_utils import tiny_llama

from optimum_prune import AutoPruner, PrunerConfig, count_parameters


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("round_to", [1, 8])
def test_target_met(ratio, round_to):
    model = tiny_llama(num_hidden_layers=2, intermediate_size=512)
    before = count_parameters(model)
    pruner = AutoPruner.from_model(model, PrunerConfig(pruning_ratio=ratio, importance="magnitude", round_to=round_to))
    pruned = pruner.prune()
    achieved = 1 - count_parameters(pruned) / before
    assert abs(achieved - ratio) <= 0.01, achieved
    if round_to > 1:
        assert pruned.config.intermediate_size % round_to == 0


def test_target_met_with_hidden_channels():
    model = tiny_llama(num_hidden_layers=2, intermediate_size=512)
    before = count_parameters(model)
    config = PrunerConfig(
        pruning_ratio=0.3,
        importance="magnitude",
        structures=["attention_heads", "mlp_channels", "hidden_channels"],
        round_to=4,
    )
    pruned = AutoPruner.from_model(model, config).prune()
    assert abs(1 - count_parameters(pruned) / before - 0.3) <= 0.01
    assert pruned.config.hidden_size % 4 == 0 and pruned.config.hidden_size < 48


def test_zero_ratio_keeps_everything():
    model = tiny_llama()
    before = count_parameters(model)
    pruner = AutoPruner.from_model(model, PrunerConfig(pruning_ratio=0.0, importance="magnitude"))
    assert count_parameters(pruner.prune()) == before
    assert pruner.plan.kept == {}
