"""The `obs` criterion: each unit scored by the error its removal leaves after its consumer is refit.

The elimination path is tested against explicit ridge refits; the statistics it reads (each consumer's input Gram
matrix) against the stacked activations of a hooked forward pass; the criterion against both together.
"""

import math

import pytest
import torch
from testing_utils import VOCAB, tiny_llama, tiny_opt

from optimum_prune import PrunerConfig
from optimum_prune.architectures import get_architecture
from optimum_prune.calibration import collect_statistics, prepare_calibration
from optimum_prune.groups import build_group_sets
from optimum_prune.importance import INPUT_GRAM, WEIGHTS, OBSImportance
from optimum_prune.refit_selection import elimination_costs


def _ridge_residual(x, y, columns, damping):
    """min ||Y - X_S W||^2 + lambda ||W||^2 over the columns S (lambda from the full problem's mean diagonal)."""
    lam = damping * x.square().sum(0).mean()
    if not columns:
        return float(y.square().sum())
    xs = x[:, sorted(columns)]
    w = torch.linalg.solve(xs.T @ xs + lam * torch.eye(len(columns), dtype=x.dtype), xs.T @ y)
    return float((y - xs @ w).square().sum() + lam * w.square().sum())


@pytest.mark.parametrize("per_unit", [1, 3])
def test_costs_are_the_explicit_elimination_path(per_unit):
    """Each unit's score is the residual increase when greedy elimination (by explicit refits, one unit per step for
    up to 32 units) removes it, made non-decreasing along the path; the targets are the Linear's own outputs."""
    generator = torch.Generator().manual_seed(per_unit)
    units, damping = 6, 0.02
    x = torch.randn(60, units * per_unit, generator=generator, dtype=torch.float64)
    x[:, 0] += 0.9 * x[:, -1]
    weight = torch.randn(4, units * per_unit, generator=generator, dtype=torch.float64)
    columns = torch.arange(units * per_unit).reshape(units, per_unit)
    y = x @ weight.T
    alive, expected, highest = list(range(units)), torch.zeros(units, dtype=torch.float64), 0.0
    while alive:
        kept = {u: [c for v in alive if v != u for c in columns[v].tolist()] for u in alive}
        now = _ridge_residual(x, y, [c for v in alive for c in columns[v].tolist()], damping)
        costs = {u: _ridge_residual(x, y, kept[u], damping) - now for u in alive}
        gone = min(alive, key=lambda u: (costs[u], u))
        highest = max(highest, costs[gone])
        expected[gone] = highest
        alive.remove(gone)
    got = elimination_costs(x.T @ x, weight, columns, damping)
    for unit in range(units):
        assert math.isclose(float(got[unit]), float(expected[unit]), rel_tol=1e-6, abs_tol=1e-9)


def _consumer_inputs(model, names, batches):
    """The stacked inputs of the Linears whose weights are `names`: {name: X [tokens, in]}."""
    found = {name: [] for name in names}
    modules = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    handles = [
        modules[name].register_forward_pre_hook(lambda mod, args, name=name: found[name].append(args[0]))
        for name in names
    ]
    with torch.no_grad():
        model(input_ids=batches)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(xs).flatten(0, -2).double() for name, xs in found.items()}


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
def test_scores_are_the_path_costs_of_each_consumers_input_gram(build):
    model = build()
    spec = get_architecture(model.config.model_type)
    group_sets = build_group_sets(model, spec, ["attention_heads", "mlp_channels"])
    names = sorted({s.name for gs in group_sets.values() for s in gs.slices})
    batches = prepare_calibration(torch.randint(0, VOCAB, (3000,)), None, 4, 16, seed=0)
    stats = collect_statistics(model, batches, {WEIGHTS, INPUT_GRAM}, param_names=names)
    criterion = OBSImportance(damping=0.05)
    for key, gs in group_sets.items():
        (consumer,) = [s for s in gs.slices if s.consumer and s.dim == 1]
        x = _consumer_inputs(model, [consumer.name], batches)[consumer.name]
        torch.testing.assert_close(stats.activation(consumer.name).gram, x.T @ x, rtol=1e-9, atol=1e-8)
        weight = stats.parameter(consumer.name)
        columns = consumer.unit_indices(weight.shape[1], gs.num_units).reshape(gs.num_units, -1)
        gram = x.T @ x
        if model.get_submodule(consumer.name.removesuffix(".weight")).bias is not None:
            record = stats.activation(consumer.name)  # refit with the bias: centred on the recorded means (OPT)
            torch.testing.assert_close(record.sum / record.count, x.mean(0), rtol=1e-5, atol=1e-6)
            mean = record.sum / record.count
            gram = gram - len(x) * torch.outer(mean, mean)
        expected = elimination_costs(gram, weight, columns, 0.05).float()
        torch.testing.assert_close(criterion.score(gs, stats), expected, rtol=1e-5, atol=0, msg=key)
    producers = [n for n in names if n.endswith(("q_proj.weight", "up_proj.weight", "fc1.weight"))]
    assert producers and all(stats.activation(n).gram is None for n in producers)  # consumers only: O(width^2)


def test_config_ranks_it_globally_on_raw_errors_and_refuses_bad_damping():
    config = PrunerConfig(importance="obs")
    assert (config.global_ranking, config.global_normalization, config.reconstruction) == (True, "none", None)
    with pytest.raises(ValueError, match="`damping` must be a number >= 0"):
        PrunerConfig(importance="obs", importance_kwargs={"damping": -1})
