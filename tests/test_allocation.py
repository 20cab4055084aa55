"""The parameter target is met within ±1 point of total parameters."""

import math

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


def _kv_groups(model) -> list[int]:
    return [layer.self_attn.k_proj.out_features // model.config.head_dim for layer in model.model.layers]


def _pruned(ratio: float, **options):
    config = PrunerConfig(pruning_ratio=ratio, importance="magnitude", **options)
    return AutoPruner.from_model(tiny_llama(), config).prune()


@pytest.mark.parametrize("ratio", [0.1, 0.15, 0.2, 0.3, 0.4])
def test_head_rounding_up_keeps_the_ceiling_of_the_uniform_fraction(ratio):
    """The decoder layers are tiny_llama's only prunable weights, so the continuous kept fraction that meets the
    target is f = 1 - ratio x total / prunable; `head_rounding="up"` keeps ceil(4 f) of the 4 KV groups in every layer
    (FLAP's and LLM-Pruner's code remove int(r x heads)), and never fewer than the nearest rounding."""
    model = tiny_llama()
    total = count_parameters(model)
    prunable = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or ".mlp." in n)
    fraction = 1 - ratio * total / prunable
    up, nearest = _pruned(ratio, head_rounding="up"), _pruned(ratio)
    assert _kv_groups(up) == [math.ceil(4 * fraction - 1e-9)] * 3
    assert all(u >= n for u, n in zip(_kv_groups(up), _kv_groups(nearest)))
    assert abs(1 - count_parameters(up) / total - ratio) <= 0.01


def test_head_rounding_up_in_a_layer_range():
    """With `attention_layers`/`mlp_layers` the pruned layer keeps at least the nearest rounding's heads, the MLP
    channels absorb the difference, and the other layers stay whole."""
    total = count_parameters(tiny_llama())
    differs = False
    for ratio in (0.1, 0.15, 0.2):
        up = _pruned(ratio, head_rounding="up", attention_layers=[1], mlp_layers=[1])
        nearest = _pruned(ratio, attention_layers=[1], mlp_layers=[1])
        assert _kv_groups(up)[0] == _kv_groups(up)[2] == 4 and _kv_groups(up)[1] >= _kv_groups(nearest)[1]
        assert abs(1 - count_parameters(up) / total - ratio) <= 0.01
        differs |= _kv_groups(up) != _kv_groups(nearest)
    assert differs


@pytest.mark.parametrize(
    "options, message",
    [
        ({"head_rounding": "down"}, "`head_rounding` must be one of"),
        ({"head_rounding": "up", "global_ranking": True}, "the scores decide the widths"),
        ({"head_rounding": "up", "importance": "flap", "allocation": "flap"}, "the scores decide the widths"),
    ],
)
def test_head_rounding_refusals(options, message):
    with pytest.raises(ValueError, match=message):
        PrunerConfig(**{"importance": "magnitude", **options})
