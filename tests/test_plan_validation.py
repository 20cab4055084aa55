"""Strict plans: a tampered, hand-edited or wrong `pruning_plan.json` is refused with one clear ValueError, never
coerced, and a plan that does not fit the target model is refused before the first tensor is touched, on every path
that applies plans (`PruningPlan.apply`, `Pruner.apply_plan`, a dispatched model, `prune_streaming(plan=)` and the
CLI's `--streaming --plan`)."""

import copy
import json

import pytest
import torch
from testing_utils import sharded_checkpoint, tiny_llama, tiny_opt

from optimum_prune import AutoPruner, PrunerConfig, PruningPlan
from optimum_prune.commands.cli import main as cli_main
from optimum_prune.offload import is_dispatched
from optimum_prune.streaming import prune_streaming


# A valid plan for `tiny_llama()` (3 layers; 8 query heads in 4 KV groups; 80 MLP channels).
COUNTS = {
    **{f"query_heads.{i}": 8 for i in range(3)},
    **{f"mlp_channels.{i}": 80 for i in range(3)},
}
VALID = {
    "model_type": "llama",
    "num_layers": 3,
    "unit_counts": COUNTS,
    "kept": {"mlp_channels.0": list(range(0, 80, 2)), "mlp_channels.1": list(range(40))},
    "removed_layers": [],
    "bias_means": {},
    "format_version": 1,
}


def _tampered(**changes):
    data = copy.deepcopy(VALID)
    for key, value in changes.items():
        target = data
        *path, last = key.split("/")
        for part in path:
            target = target[part]
        target[last] = value
    return data


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"removed_layers": "12"}, r"`removed_layers` must be a list of integers, got str '12'"),
        ({"removed_layers": [2, 1]}, r"`removed_layers` must be sorted ascending"),
        ({"removed_layers": [1.0]}, r"`removed_layers` must hold integers only, got float 1.0"),
        ({"kept/mlp_channels.0": [0.5, 1.7, 2.0]}, r"`kept\['mlp_channels.0'\]` must hold integers only, got float"),
        ({"kept/mlp_channels.0": [1.0, 2.0]}, r"must hold integers only, got float 1.0 at position 0"),
        ({"kept/mlp_channels.0": [True, 3]}, r"must hold integers only, got bool True at position 0"),
        ({"kept/mlp_channels.0": "123"}, r"`kept\['mlp_channels.0'\]` must be a list of integers, got str '123'"),
        ({"kept/mlp_channels.0": [5, 3, 4]}, r"must be sorted ascending without duplicates; 3 follows 5"),
        ({"kept/mlp_channels.0": {"0": 1}}, r"must be a list of integers, got dict"),
        ({"num_layers": "3"}, r"`num_layers` must be an integer >= 1, got str '3'"),
        ({"num_layers": True}, r"`num_layers` must be an integer >= 1, got bool True"),
        ({"unit_counts/mlp_channels.0": 80.0}, r"`unit_counts\['mlp_channels.0'\]` must be an integer >= 1"),
        ({"unit_counts/mlp_channels.7": 80}, r"'mlp_channels.7' names layer 7; the plan has 3 decoder layers"),
        ({"unit_counts/mlp_channels.01": 80}, r"Plan key 'mlp_channels.01' is not"),
        ({"unit_counts/attention.0": 4}, r"Plan key 'attention.0' is not .* with a structure among"),
        ({"unit_counts/layers.0": 1}, r"Plan key 'layers.0' is not"),
        ({"unit_counts": [80, 80]}, r"`unit_counts` must be an object \(a dict\), got list"),
        ({"format_version": "2"}, r"`format_version` must be an integer >= 1, got str '2'"),
        ({"model_type": 7}, r"`model_type` must be a non-empty string, got 7"),
        (
            {"bias_means": {"mlp_channels.0": {"model.layers.0.mlp.down_proj.weight": "0.5"}}},
            r"`bias_means\['mlp_channels.0'\]\['model.layers.0.mlp.down_proj.weight'\]` must be a list of numbers",
        ),
        (
            {"bias_means": {"mlp_channels.0": {"model.layers.0.mlp.down_proj.weight": [float("nan")] * 40}}},
            r"must hold finite numbers only, got float nan",
        ),
    ],
)
def test_malformed_plans_are_refused_not_coerced(changes, message):
    with pytest.raises(ValueError, match=message):
        PruningPlan.from_dict(_tampered(**changes))


def test_a_plan_that_misses_a_required_field_is_refused():
    data = copy.deepcopy(VALID)
    del data["num_layers"]
    with pytest.raises(ValueError, match=r"A pruning plan needs \['num_layers'\]"):
        PruningPlan.from_dict(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2, 3]", r"is invalid: A pruning plan is a JSON object, got list"),
        (json.dumps(_tampered(removed_layers="12")), r"is invalid: `removed_layers` must be a list of integers"),
    ],
)
def test_a_bad_plan_file_gets_one_line_naming_the_file(tmp_path, text, message):
    file = tmp_path / "pruning_plan.json"
    file.write_text(text, encoding="utf-8")
    for path in (file, tmp_path):  # the file itself or its folder
        with pytest.raises(ValueError, match=message) as refused:
            PruningPlan.from_pretrained(path)
        assert str(file) in str(refused.value) and "\n" not in str(refused.value)


# Plans that parse but do not fit `tiny_llama()`; each must leave the model bit-identical.
MISFITS = {
    "another model type": (_tampered(model_type="opt"), r"made for a 'opt' model; this model is 'llama'"),
    "uneven query heads": (
        _tampered(**{"kept/query_heads.1": [0, 1, 2, 4, 6]}),
        r"'query_heads.1' keeps \[2, 1, 1, 1\] units in its 4 tied groups",
    ),
    "both head structures": (
        _tampered(
            **{
                "unit_counts/attention_heads.0": 4,
                "kept/attention_heads.0": [0, 1],
                "kept/query_heads.2": [0, 2, 4, 6],
            }
        ),
        r"prunes both 'attention_heads' and 'query_heads'",
    ),
    "unit counts of another shape": (
        _tampered(**{"unit_counts/query_heads.2": 16}),
        r"expects 16 units in 'query_heads.2'; this model has 8",
    ),
    "bias means of a weight that does not exist": (
        _tampered(bias_means={"mlp_channels.1": {"model.layers.1.mlp.nothing.weight": [0.0] * 40}}),
        r"names 'model.layers.1.mlp.nothing.weight', which is not a consumer of 'mlp_channels.1'",
    ),
    "bias means of another entry's weight": (
        _tampered(bias_means={"mlp_channels.1": {"model.layers.0.mlp.down_proj.weight": [0.0] * 40}}),
        r"names 'model.layers.0.mlp.down_proj.weight', which is not a consumer of 'mlp_channels.1'",
    ),
    "bias means of the wrong length": (
        _tampered(bias_means={"mlp_channels.1": {"model.layers.1.mlp.down_proj.weight": [0.0] * 39}}),
        r"has 39 values; the plan removes 40 channels",
    ),
}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def _assert_untouched(model, snapshot):
    tensors, config = snapshot
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    assert all(torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in tensors.items())
    assert model.config.to_dict() == config


@pytest.mark.parametrize("case", sorted(MISFITS))
@pytest.mark.parametrize("path", ["PruningPlan.apply", "Pruner.apply_plan"])
def test_a_plan_that_does_not_fit_leaves_the_model_untouched(case, path):
    data, message = MISFITS[case]
    plan = PruningPlan.from_dict(copy.deepcopy(data))
    model = tiny_llama()
    before = _snapshot(model)
    pruner = AutoPruner.from_model(model, PrunerConfig(importance="magnitude"))
    with pytest.raises(ValueError, match=message):
        plan.apply(model) if path == "PruningPlan.apply" else pruner.apply_plan(plan)
    _assert_untouched(model, before)
    assert not pruner.is_pruned


def test_a_structure_the_family_lacks_is_refused_before_surgery():
    model = tiny_opt()
    before = _snapshot(model)
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    plan = PruningPlan("opt", layers, unit_counts={"query_heads.0": heads}, kept={"query_heads.0": [0]})
    with pytest.raises(ValueError, match=r"The plan prunes \['query_heads'\], which 'opt' models do not have"):
        plan.apply(model)
    _assert_untouched(model, before)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return sharded_checkpoint(tiny_llama(), tmp_path_factory.mktemp("plan_validation") / "llama")


def test_a_dispatched_model_keeps_its_hooks_and_weights_when_the_plan_is_refused(llama_dir, tmp_path):
    pruner = AutoPruner.from_pretrained(
        llama_dir, pruner_config=PrunerConfig(importance="magnitude"), dtype=torch.float32, device_map="auto",
        max_memory={"cpu": 1000}, offload_folder=str(tmp_path / "offload"),
    )  # fmt: skip
    device_map = dict(pruner.model.hf_device_map)
    assert "disk" in device_map.values() and is_dispatched(pruner.model)
    with pytest.raises(ValueError, match=MISFITS["another model type"][1]):
        pruner.apply_plan(PruningPlan.from_dict(copy.deepcopy(MISFITS["another model type"][0])))
    assert is_dispatched(pruner.model) and pruner.model.hf_device_map == device_map  # still offloaded, not loaded
    assert not pruner.is_pruned


@pytest.mark.parametrize("case", ["uneven query heads", "bias means of a weight that does not exist"])
def test_streaming_refuses_a_plan_that_does_not_fit_before_writing(llama_dir, tmp_path, case):
    data, message = MISFITS[case]
    plan = PruningPlan.from_dict(copy.deepcopy(data))
    with pytest.raises(ValueError, match=message):
        prune_streaming(llama_dir, PrunerConfig(importance="magnitude"), output_dir=tmp_path / "out", plan=plan)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (json.dumps(_tampered(removed_layers="12")), "`removed_layers` must be a list of integers"),
        (json.dumps(MISFITS["uneven query heads"][0]), "keeps [2, 1, 1, 1] units in its 4 tied groups"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_cli_streaming_plan_refuses_a_bad_plan_in_one_line(llama_dir, tmp_path, capsys, text, message):
    plan_file = tmp_path / "tampered.json"
    plan_file.write_text(text, encoding="utf-8")
    args = ["prune", "--model", str(llama_dir), "--output", str(tmp_path / "out"), "--streaming"]
    assert cli_main([*args, "--plan", str(plan_file), "--importance", "magnitude"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("optimum-prune: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "out").exists()
