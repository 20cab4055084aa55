"""FLAP: adaptive allocation over every layer and structure (AL-AM) and bias compensation (`compress(bias=True)`)."""

import copy
import json

import pytest
import torch
from testing_utils import fresh_process_logits, input_ids, logits, tiny_glm, tiny_llama

from optimum_prune import AutoPruner, PrunerConfig, PruningPlan
from optimum_prune.allocation import ParameterModel, allocate_widths, flap_removal_order
from optimum_prune.architectures import get_architecture
from optimum_prune.groups import build_group_sets


HEADS, MLP = "attention_heads", "mlp_channels"
CALIBRATION = torch.randint(1, 97, (16, 24), generator=torch.Generator().manual_seed(3))


def _flap_pruner(model, ratio=0.3, **kwargs):
    config = dict(importance="flap", num_calibration_samples=16, calibration_seq_len=24, pruning_ratio=ratio)
    config["reconstruction"] = False  # bias compensation alone, whose exactness these tests check
    config.update(kwargs)
    pruner = AutoPruner.from_model(model, PrunerConfig(**config))
    pruner.prune(calibration_data=CALIBRATION)
    return pruner


def _achieved(pruner):
    return 1 - pruner.params_after / pruner.params_before


def _group_sets(model):
    return build_group_sets(model, get_architecture("llama"), [HEADS, MLP])


# ---------------------------------------------------------------- allocation


def test_flap_allocation_is_one_threshold_over_layers_and_modules():
    """Scores rising with depth, MLP scores above head scores: the low layers and the heads are pruned hardest,
    the parameter target is met, and every removed unit of a structure scores below every kept one."""
    model = tiny_llama(num_hidden_layers=4)
    group_sets = _group_sets(model)
    params = dict(model.named_parameters())
    scores = {}
    for key, gs in group_sets.items():
        offset = 0.5 if gs.structure == MLP else 0.0
        scores[key] = torch.linspace(-1, 1, gs.num_units) + gs.layer + offset
    kept = allocate_widths(params, group_sets, [HEADS, MLP], 0.3, mode="flap", scores=scores, floors={})
    achieved = 1 - ParameterModel(params, group_sets).count(kept) / ParameterModel(params, group_sets).total
    assert abs(achieved - 0.3) <= 0.01
    heads = [kept[f"{HEADS}.{i}"] for i in range(4)]
    channels = [kept[f"{MLP}.{i}"] for i in range(4)]
    assert heads == sorted(heads) and len(set(heads)) > 1, heads  # widths vary by layer
    assert channels == sorted(channels) and len(set(channels)) > 1, channels
    head_fraction = sum(heads) / (4 * 4)
    channel_fraction = sum(channels) / (4 * 80)
    assert head_fraction < channel_fraction  # ... and by module type
    for structure in (HEADS, MLP):  # a global threshold: the lowest scores go, whatever their layer
        keys = [k for k in group_sets if k.startswith(structure)]
        removed = [float(s) for k in keys for s in sorted(scores[k])[: group_sets[k].num_units - kept[k]]]
        survivors = [float(s) for k in keys for s in sorted(scores[k])[group_sets[k].num_units - kept[k] :]]
        assert max(removed) <= min(survivors)


def test_flap_removal_order_respects_floors_and_mixes_structures():
    model = tiny_llama()
    group_sets = _group_sets(model)
    scores = {
        key: torch.randn(gs.num_units, generator=torch.Generator().manual_seed(i))
        for i, (key, gs) in enumerate(group_sets.items())
    }
    floors = {f"{HEADS}.{i}": 2 for i in range(3)} | {f"{MLP}.{i}": 30 for i in range(3)}
    order = flap_removal_order(group_sets, scores, floors)
    for key, gs in group_sets.items():
        assert order.count(key) == gs.num_units - floors[key]
    assert {k.split(".")[0] for k in order[:40]} == {HEADS, MLP}  # one order over both structures
    ranked = [float(scores[k].sort().values[order[: i + 1].count(k) - 1]) for i, k in enumerate(order)]
    assert ranked == sorted(ranked)


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_flap_allocation_through_the_pruner_meets_target_with_floors(ratio):
    pruner = _flap_pruner(tiny_llama(num_hidden_layers=4), ratio, allocation="flap", min_heads=4, min_channels=16)
    assert abs(_achieved(pruner) - ratio) <= 0.01
    heads = pruner.plan.kept_widths(HEADS)
    channels = pruner.plan.kept_widths(MLP)
    assert all(v >= 2 for v in heads.values())  # min_heads=4 query heads = 2 KV groups
    assert all(v >= 16 for v in channels.values())
    assert len(set(channels.values())) > 1  # widths vary by layer
    assert pruner.model.config.model_type == "pruned_llama" and pruner.model.config.per_layer_config


def test_flap_floor_binds_at_a_high_ratio():
    """Without a floor the threshold would take every head of some layer at 60%; `min_heads` stops it there."""
    model = tiny_llama(num_hidden_layers=4)
    group_sets = _group_sets(model)
    params = dict(model.named_parameters())
    scores = {
        k: torch.full((gs.num_units,), -5.0 if gs.structure == HEADS else 0.0) + torch.arange(gs.num_units) * 1e-3
        for k, gs in group_sets.items()
    }
    floors = {k: (1 if gs.structure == HEADS else 1) for k, gs in group_sets.items()}
    kept = allocate_widths(params, group_sets, [HEADS, MLP], 0.6, mode="flap", scores=scores, floors=floors)
    assert all(kept[k] == 1 for k in group_sets if k.startswith(HEADS))  # every head above the floor goes first
    floors = {k: (3 if gs.structure == HEADS else 1) for k, gs in group_sets.items()}
    kept = allocate_widths(params, group_sets, [HEADS, MLP], 0.6, mode="flap", scores=scores, floors=floors)
    assert all(kept[k] == 3 for k in group_sets if k.startswith(HEADS))
    achieved = 1 - ParameterModel(params, group_sets).count(kept) / ParameterModel(params, group_sets).total
    assert abs(achieved - 0.6) <= 0.01


def test_flap_allocation_config_errors():
    with pytest.raises(ValueError, match="hidden_channels"):
        PrunerConfig(importance="flap", allocation="flap", structures=["attention_heads", "hidden_channels"])
    with pytest.raises(ValueError, match="global_ranking"):
        PrunerConfig(importance="flap", allocation="flap", global_ranking=True)
    with pytest.raises(ValueError, match="allocation"):
        PrunerConfig(importance="flap", allocation="adaptive")


# ---------------------------------------------------------------- bias compensation


def test_bias_compensation_defaults(monkeypatch):
    def resolved(model=None, **kwargs):
        return AutoPruner.from_model(model or tiny_llama(), PrunerConfig(**kwargs)).config.bias_compensation

    assert PrunerConfig(importance="flap").bias_compensation is None  # resolved by the pruner for the family
    assert resolved(importance="flap") is True
    assert resolved(importance="flap", bias_compensation=False) is False
    assert resolved(importance="magnitude") is False
    # GLM's registered type can add the o_proj / down_proj biases, but the family defaults compensation off.
    assert resolved(tiny_glm(), importance="flap") is False
    assert resolved(tiny_glm(), importance="flap", bias_compensation=True) is True
    # A family whose registered type cannot hold the biases (no `bias_fields`): off by default, refused when asked for.
    import dataclasses

    from optimum_prune.architectures.base import ARCHITECTURE_REGISTRY

    monkeypatch.setitem(
        ARCHITECTURE_REGISTRY, "glm", dataclasses.replace(ARCHITECTURE_REGISTRY["glm"], bias_fields={})
    )
    assert resolved(tiny_glm(), importance="flap") is False
    with pytest.raises(ValueError, match="bias_compensation=False"):
        resolved(tiny_glm(), importance="flap", bias_compensation=True)
    with pytest.raises(ValueError, match="calibration data"):
        AutoPruner.from_model(tiny_llama(), PrunerConfig(importance="magnitude", bias_compensation=True)).prune()


def _constant_units(model, heads=2, channels=40):
    """Make the last `heads` KV groups and the last `channels` MLP channels of every layer constant over tokens:
    their value rows are zero with a bias (attention then outputs that bias), their gate/up rows are zero with
    biases (the channel is silu(b_g) * b_u). FLAP scores them lowest (zero fluctuation). The other channels are
    scaled up so that their fluctuation stands well above the float32 rounding of a constant channel's variance."""
    head_dim = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            v = layer.self_attn.v_proj
            v.weight[: -heads * head_dim] *= 5
            v.weight[-heads * head_dim :] = 0
            v.bias[-heads * head_dim :] = 0.3 * torch.randn(heads * head_dim)
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[:-channels] *= 5
                proj.weight[-channels:] = 0
                proj.bias[-channels:] = 0.3 * torch.randn(channels) + 0.5
    return model


@pytest.mark.parametrize("allocation", [None, "flap"])
def test_bias_compensation_is_exact_for_constant_channels(allocation):
    """When every removed channel is constant over tokens, compensation restores the unpruned model exactly."""
    original = _constant_units(tiny_llama(bias=True))
    ids = input_ids()
    kwargs = dict(allocation=allocation, min_heads=4, min_channels=40) if allocation else {}
    compensated = _flap_pruner(copy.deepcopy(original), 0.3, **kwargs)
    plain = _flap_pruner(copy.deepcopy(original), 0.3, bias_compensation=False, **kwargs)
    assert compensated.plan.kept == plain.plan.kept and compensated.plan.bias_means
    for key, kept in compensated.plan.kept.items():  # only constant units went
        units = original.config.num_key_value_heads if key.startswith(HEADS) else original.config.intermediate_size
        assert min(set(range(units)) - set(kept)) >= units - (2 if key.startswith(HEADS) else 40)
    expected = logits(original, ids)
    torch.testing.assert_close(logits(compensated.model, ids), expected, atol=1e-5, rtol=1e-5)
    assert (logits(plain.model, ids) - expected).abs().max() > 1e-2  # without it, the output moves


def test_bias_compensation_adds_the_mean_contribution():
    """Stock LLaMA has no o_proj/down_proj bias: the pruned model equals the original with the removed units zeroed
    plus W[:, removed] @ mean(x[removed]) at those Linears (means by hooks on the original, no pruning code)."""
    original = tiny_llama()
    pruner = _flap_pruner(copy.deepcopy(original), 0.3, allocation="flap")
    sums, counts = {}, {}

    def record(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    consumers = {}
    for i, layer in enumerate(original.model.layers):
        consumers[f"{HEADS}.{i}"] = layer.self_attn.o_proj
        consumers[f"{MLP}.{i}"] = layer.mlp.down_proj
    handles = [m.register_forward_pre_hook(record(k)) for k, m in consumers.items()]
    with torch.no_grad():
        original(input_ids=CALIBRATION)
    for h in handles:
        h.remove()

    reference = copy.deepcopy(original)
    ref_consumers = {
        **{f"{HEADS}.{i}": layer.self_attn.o_proj for i, layer in enumerate(reference.model.layers)},
        **{f"{MLP}.{i}": layer.mlp.down_proj for i, layer in enumerate(reference.model.layers)},
    }
    block = {HEADS: original.config.head_dim * 2, MLP: 1}  # channels per unit of the consumer's input
    for key, kept in pruner.plan.kept.items():
        linear = ref_consumers[key]
        width = block[key.split(".")[0]]
        removed = [
            c for u in range(linear.in_features // width) if u not in kept for c in range(u * width, (u + 1) * width)
        ]
        mean = (sums[key] / counts[key]).float()
        delta = linear.weight[:, removed].detach() @ mean[removed]  # [out]
        with torch.no_grad():
            linear.weight[:, removed] = 0
        linear.register_forward_hook(lambda module, args, output, delta=delta: output + delta)
    ids = input_ids()
    torch.testing.assert_close(logits(pruner.model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)
    assert pruner.model.config.o_proj_bias and pruner.model.config.down_proj_bias


def test_plan_reapplies_compensation(tmp_path):
    original = tiny_llama()
    pruner = _flap_pruner(copy.deepcopy(original), 0.3, allocation="flap")
    pruner.plan.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "pruning_plan.json").read_text())
    assert data["format_version"] == 2 and data["bias_means"]
    plan = PruningPlan.from_pretrained(tmp_path)
    assert plan == pruner.plan
    other = plan.apply(copy.deepcopy(original))
    first = dict(pruner.model.named_parameters())
    assert set(dict(other.named_parameters())) == set(first)
    for name, p in other.named_parameters():
        torch.testing.assert_close(p, first[name], atol=0, rtol=0)
    assert other.config.to_dict() == pruner.model.config.to_dict()
    no_bias = PruningPlan(plan.model_type, plan.num_layers, plan.unit_counts, plan.kept)
    assert no_bias.format_version == 1  # older readers still read plans without compensation


@pytest.mark.parametrize(
    ("build", "model_type", "cls_name"),
    [
        (tiny_llama, "pruned_llama", "PrunedLlamaForCausalLM"),
        pytest.param(tiny_glm, "pruned_glm", "PrunedGlmForCausalLM", marks=pytest.mark.slow),  # two interpreters each
    ],
)
def test_compensated_checkpoint_reloads_both_ways(tmp_path, build, model_type, cls_name):
    """Per-layer widths and added biases: `from_pretrained` with the package, and `trust_remote_code=True` without it
    (fresh processes), give identical logits."""
    pruner = _flap_pruner(build(), 0.3, allocation="flap", bias_compensation=True)
    assert pruner.plan.bias_means
    out = tmp_path / "out"
    pruner.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["o_proj_bias"] and config["down_proj_bias"]
    assert config.get("per_layer_config")
    ids = input_ids()
    expected = logits(pruner.model, ids)
    [(loaded, cls)] = fresh_process_logits([out], ids, trust_remote_code=False, import_package=True)
    assert cls == cls_name
    torch.testing.assert_close(loaded, expected, atol=0, rtol=0)
    [(remote, _)] = fresh_process_logits([out], ids, trust_remote_code=True, import_package=False)
    torch.testing.assert_close(remote, expected, atol=0, rtol=0)
