"""Iterative pruning (`iterative_steps`): targets of the original model, re-scoring per step, one composed plan."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from testing_utils import input_ids, logits, tiny_llama

from optimum_prune import AutoPruner, PrunerConfig, count_parameters
from optimum_prune.pruner import Pruner


CALIBRATION = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))


def _config(**kwargs):
    kwargs = {
        "importance": "taylor",
        "pruning_ratio": 0.4,
        "num_calibration_samples": 4,
        "calibration_seq_len": 16,
        "reconstruction": False,  # iterative pruning cannot refit; the one-step path compared with it must not either
        **kwargs,
    }
    return PrunerConfig(**kwargs)


def _prune(model, **kwargs):
    pruner = AutoPruner.from_model(model, _config(**kwargs))
    pruner.prune(CALIBRATION)
    return pruner


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("global_ranking", [False, True])
def test_target_met(steps, global_ranking):
    model = tiny_llama()
    before = count_parameters(model)
    kwargs = {"global_ranking": True, "global_normalization": "none"} if global_ranking else {}
    pruner = _prune(model, iterative_steps=steps, **kwargs)
    removed = 1 - count_parameters(pruner.model) / before
    assert abs(removed - 0.4) <= 0.01, removed


def test_one_step_equals_normal_path():
    normal = _prune(tiny_llama(), global_ranking=True, global_normalization="none")
    iterative = AutoPruner.from_model(tiny_llama(), _config(global_ranking=True, global_normalization="none"))
    importance = iterative.config.build_importance()
    from optimum_prune.calibration import prepare_calibration

    batches = prepare_calibration(CALIBRATION, None, 4, 16, seed=0)
    iterative.plan = iterative._prune_iteratively(importance, batches)
    assert iterative.plan.kept == normal.plan.kept
    assert iterative.plan.unit_counts == normal.plan.unit_counts
    ids = input_ids()
    torch.testing.assert_close(logits(iterative.model, ids), logits(normal.model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("global_ranking", [False, True])
def test_composed_plan_reapplies_exactly(global_ranking):
    kwargs = {"global_ranking": True, "global_normalization": "none"} if global_ranking else {}
    pruner = _prune(tiny_llama(), iterative_steps=3, **kwargs)
    plan = pruner.plan
    assert plan.kept, "the plan prunes something"
    assert all(len(v) < plan.unit_counts[k] for k, v in plan.kept.items())
    replayed = plan.apply(tiny_llama())
    state, expected = replayed.state_dict(), pruner.model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    ids = input_ids()
    torch.testing.assert_close(logits(replayed, ids), logits(pruner.model, ids), atol=0, rtol=0)


def test_steps_rescore_the_current_model():
    """With `random` scores each of the N steps scores (and shrinks) the model once more."""
    calls = []
    original = Pruner._score

    def spy(self, importance, group_sets, *args, **kwargs):
        calls.append(sum(gs.num_units for gs in group_sets.values()))
        return original(self, importance, group_sets, *args, **kwargs)

    with mock.patch.object(Pruner, "_score", spy):
        pruner = AutoPruner.from_model(
            tiny_llama(), PrunerConfig(importance="random", pruning_ratio=0.4, iterative_steps=4)
        )
        pruner.prune()
    assert len(calls) == 4
    assert calls == sorted(calls, reverse=True) and calls[0] > calls[-1]  # each step scores a smaller model
    assert abs(1 - pruner.params_after / pruner.params_before - 0.4) <= 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"iterative_steps": 0}, "positive integer"),
        ({"iterative_steps": 2.0}, "positive integer"),
        ({"iterative_steps": True}, "positive integer"),
        ({"iterative_steps": 2, "structures": ["layers"]}, "only 'attention_heads' and 'mlp_channels'"),
        ({"iterative_steps": 2, "structures": ["hidden_channels"]}, "only 'attention_heads' and 'mlp_channels'"),
        ({"iterative_steps": 2, "streaming": True}, "streaming"),
        ({"iterative_steps": 2, "bias_compensation": True}, "bias compensation"),
    ],
)
def test_refused_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrunerConfig(importance="magnitude", **kwargs)


def test_flap_default_bias_compensation_refused():
    pruner = AutoPruner.from_model(tiny_llama(), _config(importance="flap", iterative_steps=2))
    with pytest.raises(ValueError, match="bias_compensation=False"):
        pruner.prune(CALIBRATION)
