"""Choosing units by the error left after the refit (`reconstruction_selection="error"`, structured OBS).

The elimination's costs are tested against the residuals of explicit ridge refits of every candidate subset, its
choice against the greedy choice made from those explicit refits, and the whole run against what it promises: the
criterion's widths, the ridge solution on the kept columns, and the same weights from every engine and from the plan.
"""

import json
import math

import pytest
import torch
from testing_utils import VOCAB, load_eval, sharded_checkpoint, tiny_llama, tiny_opt

from optimum_prune import AutoPruner, PrunerConfig, PruningPlan
from optimum_prune.refit_selection import UnitChoice, choose_units, damped_gram, removal_costs
from optimum_prune.streaming import prune_streaming


SAMPLES, SEQ_LEN = 6, 16
DATA = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(5))


def _config(**kwargs):
    kwargs = {"importance": "wanda_sp", "pruning_ratio": 0.3, "reconstruction": True, **kwargs}
    kwargs.setdefault("reconstruction_selection", "error")
    return PrunerConfig(num_calibration_samples=SAMPLES, calibration_seq_len=SEQ_LEN, **kwargs)


def _problem(units=6, per_unit=2, out=5, tokens=80, intercept=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, units * per_unit, generator=generator, dtype=torch.float64)
    x[:, 1] += 0.8 * x[:, 4]  # correlated columns: what one unit loses another can make up
    y = x @ torch.randn(units * per_unit, out, generator=generator, dtype=torch.float64)
    y += 0.3 * torch.randn(tokens, out, generator=generator, dtype=torch.float64)
    if intercept:
        x = torch.cat([x, torch.ones(tokens, 1, dtype=x.dtype)], dim=1)
        y += 2.0
    columns = torch.arange(units * per_unit).reshape(units, per_unit)
    return x, y, columns


def _residual(x, y, keep_columns, damping, intercept):
    """The ridge objective's minimum over the columns `keep_columns` (and the intercept), from the closed form, with
    the damping of the full problem (the elimination keeps lambda fixed)."""
    n = x.shape[1] - int(intercept)
    lam = damping * (x[:, :n].square().sum(0)).mean()
    index = torch.tensor(sorted(keep_columns) + ([n] if intercept else []), dtype=torch.long)
    xs = x[:, index]
    damp = torch.full((len(index),), float(lam), dtype=x.dtype)
    if intercept:
        damp[-1] = 0
    w = torch.linalg.solve(xs.T @ xs + torch.diag(damp), xs.T @ y)
    return float((y - xs @ w).square().sum() + (damp.unsqueeze(1) * w.square()).sum())


@pytest.mark.parametrize("intercept", [False, True])
def test_removal_costs_are_the_residual_increase_of_the_explicit_refit(intercept):
    x, y, columns = _problem(intercept=intercept)
    n, damping = columns.numel(), 0.05
    gram = damped_gram(x.T @ x, n, damping)
    inverse = torch.linalg.inv(gram)
    costs = removal_costs(inverse, inverse @ (x.T @ y), columns)
    full = _residual(x, y, range(n), damping, intercept)
    for unit in range(len(columns)):
        rest = [c for c in range(n) if c not in columns[unit].tolist()]
        assert math.isclose(float(costs[unit]), _residual(x, y, rest, damping, intercept) - full, rel_tol=1e-6)


@pytest.mark.parametrize(("per_unit", "intercept"), [(1, False), (2, False), (3, True)])
def test_choice_is_greedy_backward_elimination_on_explicit_refits(per_unit, intercept):
    x, y, columns = _problem(units=7, per_unit=per_unit, intercept=intercept, seed=per_unit)
    damping = 0.01
    alive = list(range(len(columns)))
    while len(alive) > 3:  # one unit per step (7 units: ceil(7 / 32) = 1), each removal the cheapest refit
        costs = {
            u: _residual(x, y, [c for v in alive if v != u for c in columns[v].tolist()], damping, intercept)
            for u in alive
        }
        alive.remove(min(alive, key=lambda u: (costs[u], u)))
    choice = UnitChoice("mlp_channels.0", columns, keep=3)
    assert choose_units(x.T @ x, x.T @ y, choice, damping, intercept) == alive


def test_keeping_every_unit_removes_nothing():
    x, y, columns = _problem()
    choice = UnitChoice("mlp_channels.0", columns, keep=len(columns))
    assert choose_units(x.T @ x, x.T @ y, choice, 0.01, False) == list(range(len(columns)))


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [
        (tiny_llama, {}),
        (tiny_llama, {"importance": "taylor", "global_ranking": True}),
        (tiny_opt, {}),  # consumers with biases: an intercept in every problem
    ],
)
def test_error_selection_keeps_the_widths_and_refits_the_chosen_units(build, kwargs):
    by_criterion = AutoPruner.from_model(build(), _config(reconstruction_selection="criterion", **kwargs))
    by_criterion.prune(calibration_data=DATA)
    by_error = AutoPruner.from_model(build(), _config(**kwargs))
    by_error.prune(calibration_data=DATA)
    criterion, chosen = by_criterion.plan.kept, by_error.plan.kept
    assert {k: len(v) for k, v in chosen.items()} == {k: len(v) for k, v in criterion.items()}
    assert chosen != criterion  # on random weights the refit error disagrees with the criterion somewhere
    assert by_error.plan.reconstruction == {"damping": 0.01, "selection": "error", "target": "residual"}
    assert by_error.plan.format_version == 5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return sharded_checkpoint(tiny_llama(num_hidden_layers=4), tmp_path_factory.mktemp("selection") / "llama")


def _assert_same_weights(path, model):
    saved = load_eval(path).state_dict()
    assert saved.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-5, rtol=1e-5, msg=name)


def test_every_engine_and_the_plan_give_the_same_units_and_weights(llama_dir, tmp_path):
    config = _config(global_ranking=True)  # streaming scores layer by layer: a layer-local criterion
    pruner = AutoPruner.from_model(load_eval(llama_dir), config)
    pruner.prune(calibration_data=DATA)
    pruner.save_pretrained(tmp_path / "memory")
    report = prune_streaming(llama_dir, config, DATA, tmp_path / "streamed")
    assert report["plan"].kept == pruner.plan.kept
    _assert_same_weights(tmp_path / "streamed", pruner.model)
    saved = json.loads((tmp_path / "streamed" / "pruning_plan.json").read_text())
    assert saved["reconstruction"] == {"damping": 0.01, "selection": "error", "target": "residual"}
    assert saved["format_version"] == 5
    # The written plan (its kept units already chosen) reproduces the checkpoint from the calibration data.
    plan = PruningPlan.from_pretrained(tmp_path / "memory")
    again = AutoPruner.from_model(load_eval(llama_dir), config)
    again.apply_plan(plan, calibration_data=DATA)
    assert again.plan.kept == pruner.plan.kept
    _assert_same_weights(tmp_path / "memory", again.model)
    prune_streaming(llama_dir, config, DATA, tmp_path / "given", plan=plan)
    _assert_same_weights(tmp_path / "given", pruner.model)


def test_bad_selection_is_refused():
    with pytest.raises(ValueError, match="`reconstruction_selection` must be one of \\['criterion', 'error'\\]"):
        PrunerConfig(reconstruction_selection="obs")
    with pytest.raises(ValueError, match=r"`reconstruction\['selection'\]` must be one of"):
        PruningPlan("llama", 2, reconstruction={"damping": 0.01, "selection": "best"})
