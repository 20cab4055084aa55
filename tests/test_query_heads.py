"""`query_heads`: query heads pruned *inside* every KV group of grouped-query models (LLaMA, Qwen2, GLM).

References need no pruning code: the untouched original with the o_proj input columns of the removed query heads
zeroed (a query head's contribution to the attention output is exactly its o_proj column block).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from family_table import LLAMA_LAYOUT, zeroed_reference
from testing_utils import VOCAB, fresh_process_logits, input_ids, logits, tiny_glm, tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.allocation import select_top, uniform_allocation
from optimum_prune.architectures import get_architecture
from optimum_prune.groups import build_group_sets
from optimum_prune.importance import IMPORTANCE_REGISTRY


ATOL = 1e-5
HEAD_DIM = 8


# name -> (builder, stock model_type); every model has 4 query heads per KV group, so 1-3 per group can go.
FAMILIES = {
    "llama": (lambda: tiny_llama(num_attention_heads=16, num_key_value_heads=4), "llama"),
    "llama-bias": (lambda: tiny_llama(bias=True, num_attention_heads=16, num_key_value_heads=4), "llama"),
    "qwen2": (lambda: tiny_qwen2(num_attention_heads=16), "qwen2"),
    "glm": (lambda: tiny_glm(num_attention_heads=12, num_key_value_heads=3), "glm"),
}


def _removed(kept, total):
    return sorted(set(range(total)) - set(kept))


def _ratio_removing(model, heads_per_group: int) -> float:
    """The fraction of total parameters that removing `heads_per_group` query heads from every KV group of every
    layer removes (q_proj rows and bias, o_proj columns)."""
    removed = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        per_head = attn.q_proj.weight[:HEAD_DIM].numel() + attn.o_proj.weight[:, :HEAD_DIM].numel()
        per_head += HEAD_DIM if attn.q_proj.bias is not None else 0
        removed += per_head * heads_per_group * model.config.num_key_value_heads
    return removed / sum(p.numel() for p in model.parameters())


def _reference(model, plan):
    """The original with every removed query head's o_proj columns (and removed MLP channels) zeroed."""
    return zeroed_reference(LLAMA_LAYOUT, model, plan)[0]


def _check_pruned_shape(original, pruned, plan):
    """k/v untouched, q/o sliced by whole heads, the same count in every KV group, the config says so."""
    kv_heads = original.config.num_key_value_heads
    per_group = original.config.num_attention_heads // kv_heads
    for key, kept in plan.kept.items():
        if not key.startswith("query_heads."):
            continue
        counts = [sum(1 for h in kept if h // per_group == g) for g in range(kv_heads)]
        assert len(set(counts)) == 1 and counts[0] >= 1, f"{key}: unequal kept counts per KV group {counts}"
    config = pruned.config
    assert config.num_key_value_heads == kv_heads and config.head_dim == HEAD_DIM
    assert config.num_attention_heads % kv_heads == 0
    for before, after in zip(original.model.layers, pruned.model.layers):
        attn = after.self_attn
        assert attn.k_proj.weight.shape == before.self_attn.k_proj.weight.shape
        assert attn.v_proj.weight.shape == before.self_attn.v_proj.weight.shape
        heads = attn.q_proj.weight.shape[0] // HEAD_DIM
        assert attn.o_proj.weight.shape[1] == heads * HEAD_DIM
        assert attn.num_key_value_groups == heads // kv_heads
        if attn.q_proj.bias is not None:
            assert attn.q_proj.bias.shape == (heads * HEAD_DIM,)


@pytest.mark.parametrize("heads_per_group", [1, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_query_heads_equal_zeroed_original(family, heads_per_group):
    build, stock_type = FAMILIES[family]
    model = build()
    original = copy.deepcopy(model)
    ratio = _ratio_removing(model, heads_per_group)
    config = PrunerConfig(importance="random", pruning_ratio=ratio, structures=["query_heads"])
    pruner = AutoPruner.from_model(model, config)
    pruned = pruner.prune()
    kv_heads = original.config.num_key_value_heads
    per_group = original.config.num_attention_heads // kv_heads
    assert pruned.config.num_attention_heads == kv_heads * (per_group - heads_per_group)
    assert pruned.config.model_type == stock_type  # the stock config expresses the shape
    _check_pruned_shape(original, pruned, pruner.plan)
    ids = input_ids()
    torch.testing.assert_close(logits(pruned, ids), logits(_reference(original, pruner.plan), ids), atol=ATOL, rtol=0)


def test_per_head_slices_are_the_head_blocks():
    """Criteria reduce over `GroupSet` slices: query head h owns q_proj rows, q bias entries and o_proj columns
    [h * head_dim, (h + 1) * head_dim), and nothing of k_proj / v_proj."""
    model = tiny_qwen2(num_attention_heads=16)
    groups = build_group_sets(model, get_architecture("qwen2"), ["query_heads"])
    gs = groups["query_heads.1"]
    assert (gs.num_units, gs.num_groups, gs.units_per_group) == (16, 4, 4)
    attn = model.model.layers[1].self_attn
    names = {s.name.rpartition("self_attn.")[2] for s in gs.slices}
    assert names == {"q_proj.weight", "q_proj.bias", "o_proj.weight"}
    q, qb, o = attn.q_proj.weight.detach(), attn.q_proj.bias.detach(), attn.o_proj.weight.detach()
    prefix = "model.layers.1.self_attn."
    for h in (0, 5, 15):
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        torch.testing.assert_close(gs.per_unit(prefix + "q_proj.weight", q)[h], q[rows].flatten())
        torch.testing.assert_close(gs.per_unit(prefix + "q_proj.bias", qb)[h], qb[rows])
        torch.testing.assert_close(gs.per_unit(prefix + "o_proj.weight", o)[h], o[:, rows].t().flatten())
        expected = q[rows].abs().sum() + qb[rows].abs().sum() + o[:, rows].abs().sum()
        got = sum(gs.reduce(prefix + n, w.abs())[h] for n, w in (("q_proj.weight", q), ("q_proj.bias", qb)))
        got = got + gs.reduce(prefix + "o_proj.weight", o.abs())[h]
        torch.testing.assert_close(got, expected)


def test_glm_query_head_slices_follow_its_layout():
    """GLM's q_proj is `[heads * head_dim, hidden]` like LLaMA's (partial rotary acts inside each head)."""
    model = tiny_glm(num_attention_heads=12, num_key_value_heads=3)
    gs = build_group_sets(model, get_architecture("glm"), ["query_heads"])["query_heads.0"]
    assert (gs.num_units, gs.num_groups) == (12, 3)
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    torch.testing.assert_close(gs.per_unit("model.layers.0.self_attn.q_proj.weight", q)[7], q[56:64].flatten())


# Layer criteria and expert criteria (frequency, REAP: tests/test_experts.py) score no heads.
CRITERIA = sorted(
    name for name, cls in IMPORTANCE_REGISTRY.items() if cls.structures not in (("layers",), ("experts",))
)


# Every criterion on LLaMA; on GLM (the same q/o layout, fused gate_up) those that read more than the q/o slices.
CRITERION_CASES = [("llama", c) for c in CRITERIA] + [("glm", c) for c in ("taylor", "flap", "bip") if c in CRITERIA]


@pytest.mark.parametrize("family,criterion", CRITERION_CASES, ids=[f"{f}-{c}" for f, c in CRITERION_CASES])
def test_every_criterion_prunes_query_heads_exactly(family, criterion):
    """Every criterion scores query heads (one score per head) and the plan is exact against the zeroed original."""
    build, _ = FAMILIES[family]
    model = build()
    original = copy.deepcopy(model)
    config = PrunerConfig(
        importance=criterion,
        importance_kwargs={"num_perturbations": 2} if criterion == "mini_llm" else {},
        pruning_ratio=0.3,
        structures=["query_heads", "mlp_channels"],
        num_calibration_samples=4,
        calibration_seq_len=16,
        bias_compensation=False,  # the zeroed reference has no compensated biases
        reconstruction=False,  # nor refit consumers
    )
    calibration = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(5))
    pruner = AutoPruner.from_model(model, config)
    pruned = pruner.prune(calibration_data=calibration)
    assert any(k.startswith("query_heads.") for k in pruner.plan.kept), "no query head was removed"
    _check_pruned_shape(original, pruned, pruner.plan)
    ids = input_ids()
    torch.testing.assert_close(logits(pruned, ids), logits(_reference(original, pruner.plan), ids), atol=ATOL, rtol=0)


def test_flap_with_bias_compensation_on_query_heads():
    """FLAP's default bias compensation folds removed query heads' mean o_proj input into an o_proj bias (LLaMA's
    registered type holds it)."""
    model = tiny_llama(num_attention_heads=16, num_key_value_heads=4)
    config = PrunerConfig(
        importance="flap",
        pruning_ratio=0.3,
        structures=["query_heads", "mlp_channels"],
        num_calibration_samples=4,
        calibration_seq_len=16,
    )
    calibration = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(5))
    pruner = AutoPruner.from_model(model, config)
    pruned = pruner.prune(calibration_data=calibration)
    assert config.bias_compensation is True
    assert any(k.startswith("query_heads.") for k in pruner.plan.bias_means)
    assert pruned.config.o_proj_bias and pruned.model.layers[0].self_attn.o_proj.bias is not None
    assert torch.isfinite(logits(pruned, input_ids())).all()


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm"])
def test_save_reload_with_stock_auto_class(tmp_path, family):
    build, stock_type = FAMILIES[family]
    model = build()
    config = PrunerConfig(importance="magnitude", pruning_ratio=0.3, structures=["query_heads", "mlp_channels"])
    pruner = AutoPruner.from_model(model, config)
    pruned = pruner.prune()
    pruner.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == stock_type and "auto_map" not in saved
    assert saved["num_attention_heads"] < 16 and saved["num_attention_heads"] % saved["num_key_value_heads"] == 0
    assert saved["head_dim"] == HEAD_DIM
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = input_ids()
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), atol=0, rtol=0)


def _per_layer_case():
    """Two query heads per KV group removed in layers 0 and 2 only (`attention_layers`): per-layer head counts."""
    model = tiny_llama(num_attention_heads=16, num_key_value_heads=4)
    original = copy.deepcopy(model)
    ratio = _ratio_removing(model, 2) * 2 / 3
    config = PrunerConfig(
        importance="random", pruning_ratio=ratio, structures=["query_heads"], attention_layers=[0, 2]
    )
    pruner = AutoPruner.from_model(model, config)
    pruner.prune()
    return original, pruner


def test_per_layer_query_heads_equal_zeroed_original(tmp_path):
    """LLaMA's registered type (`per_layer_config`) holds per-layer query-head counts: exact in memory (each attention
    module's `num_key_value_groups` follows its own layer) and after reload with the auto class."""
    original, pruner = _per_layer_case()
    pruned = pruner.model
    assert pruned.config.model_type == "pruned_llama"
    assert pruned.config.per_layer_config[1].num_attention_heads == 16
    heads = [layer.self_attn.q_proj.weight.shape[0] // HEAD_DIM for layer in pruned.model.layers]
    assert heads == [8, 16, 8]
    assert [layer.self_attn.num_key_value_groups for layer in pruned.model.layers] == [2, 4, 2]
    _check_pruned_shape(original, pruned, pruner.plan)
    ids = input_ids()
    want = logits(pruned, ids)
    torch.testing.assert_close(want, logits(_reference(original, pruner.plan), ids), atol=ATOL, rtol=0)
    pruner.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [layer.self_attn.num_key_value_groups for layer in reloaded.model.layers] == [2, 4, 2]
    torch.testing.assert_close(logits(reloaded, ids), want, atol=0, rtol=0)


@pytest.mark.slow
def test_per_layer_query_heads_reload_in_fresh_process(tmp_path):
    """The same checkpoint in fresh interpreters: with the package, and through `trust_remote_code=True` without it."""
    _, pruner = _per_layer_case()
    ids = input_ids()
    want = logits(pruner.model, ids)
    pruner.save_pretrained(tmp_path / "out")
    for import_package in (True, False):
        ((got, _),) = fresh_process_logits(
            [tmp_path / "out"], ids, trust_remote_code=not import_package, import_package=import_package
        )
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_global_ranking_keeps_whole_steps_per_layer():
    model = tiny_llama(num_attention_heads=16, num_key_value_heads=4)
    original = copy.deepcopy(model)
    config = PrunerConfig(
        importance="magnitude", pruning_ratio=0.3, structures=["query_heads", "mlp_channels"], global_ranking=True
    )
    pruner = AutoPruner.from_model(model, config)
    pruned = pruner.prune()
    _check_pruned_shape(original, pruned, pruner.plan)
    for layer in pruned.model.layers:
        assert layer.self_attn.q_proj.weight.shape[0] // HEAD_DIM in (4, 8, 12, 16)
    ids = input_ids()
    torch.testing.assert_close(logits(pruned, ids), logits(_reference(original, pruner.plan), ids), atol=ATOL, rtol=0)


def test_glm_per_layer_query_heads_equal_zeroed_original():
    """GLM's registered type (`pruned_glm`) holds per-layer query-head counts too."""
    model = tiny_glm(num_attention_heads=12, num_key_value_heads=3)
    original = copy.deepcopy(model)
    ratio = _ratio_removing(model, 1) * 2 / 3  # one query head per KV group in layers 0 and 2
    config = PrunerConfig(
        importance="random", pruning_ratio=ratio, structures=["query_heads"], attention_layers=[0, 2]
    )
    pruner = AutoPruner.from_model(model, config)
    pruned = pruner.prune()
    assert pruned.config.model_type == "pruned_glm" and pruned.config.per_layer_overrides
    assert [layer.self_attn.num_key_value_groups for layer in pruned.model.layers][1] == 4
    ids = input_ids()
    torch.testing.assert_close(logits(pruned, ids), logits(_reference(original, pruner.plan), ids), atol=ATOL, rtol=0)


def test_iterative_query_heads_compose_into_one_plan():
    model = tiny_llama(num_attention_heads=16, num_key_value_heads=4)
    original = copy.deepcopy(model)
    config = PrunerConfig(
        importance="magnitude", pruning_ratio=0.3, structures=["query_heads", "mlp_channels"], iterative_steps=2
    )
    pruner = AutoPruner.from_model(model, config)
    pruned = pruner.prune()
    _check_pruned_shape(original, pruned, pruner.plan)
    ids = input_ids()
    torch.testing.assert_close(logits(pruned, ids), logits(_reference(original, pruner.plan), ids), atol=ATOL, rtol=0)


def test_multi_head_attention_is_refused():
    """With one query head per KV head nothing could go without emptying a group: refused, naming the alternative."""
    model = tiny_llama(num_attention_heads=8, num_key_value_heads=8)
    config = PrunerConfig(importance="magnitude", structures=["query_heads", "mlp_channels"])
    with pytest.raises(ValueError, match="multi-head attention.*Use 'attention_heads' instead"):
        AutoPruner.from_model(model, config)


def test_families_without_query_heads_are_refused():
    from testing_utils import tiny_opt

    config = PrunerConfig(importance="magnitude", structures=["query_heads", "mlp_channels"])
    with pytest.raises(ValueError, match="supports structures"):
        AutoPruner.from_model(tiny_opt(), config)


def test_both_head_structures_are_refused():
    with pytest.raises(ValueError, match="may hold one of"):
        PrunerConfig(structures=["attention_heads", "query_heads"])


def test_select_top_keeps_the_best_of_every_group():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6, 0.4, 1.0, 0.05, 0.0])
    assert select_top(scores, 6, groups=3) == [1, 2, 4, 6, 8, 9]
    assert select_top(scores, 3, groups=3) == [1, 4, 9]
    # The ungrouped top 6 would take 3 units from the first two groups and 1 from the last.
    assert select_top(scores, 6) == [1, 2, 4, 6, 7, 9]
    with pytest.raises(ValueError, match="multiples of 3"):
        select_top(scores, 4, groups=3)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.6])
def test_uniform_allocation_keeps_whole_steps_and_one_per_group(ratio):
    model = tiny_glm(num_attention_heads=12, num_key_value_heads=3)
    params = dict(model.named_parameters())
    group_sets = build_group_sets(model, get_architecture("glm"), ["query_heads", "mlp_channels"])
    kept = uniform_allocation(params, group_sets, ["query_heads", "mlp_channels"], ratio)
    heads = {kept[k] for k in kept if k.startswith("query_heads.")}
    assert len(heads) == 1 and next(iter(heads)) % 3 == 0 and next(iter(heads)) >= 3


def test_uniform_true_keeps_a_stock_llama_config():
    """`uniform=True` allows only head counts the stock `LlamaConfig` accepts: with 12 query heads in 3 KV groups and
    hidden 48, 9 heads (3 per group) would need the registered type, so 3, 6 and 12 remain."""
    model = tiny_llama(num_attention_heads=12, num_key_value_heads=3)
    original = copy.deepcopy(model)
    ratio = _ratio_removing(model, 2)  # 6 heads, a stock shape
    config = PrunerConfig(importance="magnitude", pruning_ratio=ratio, structures=["query_heads"], uniform=True)
    pruner = AutoPruner.from_model(model, config)
    group_sets = build_group_sets(model, get_architecture("llama"), ["query_heads"])
    assert pruner.planner.stock_unit_counts(group_sets, "query_heads") == [3, 6, 12]
    pruned = pruner.prune()
    assert pruned.config.model_type == "llama" and pruned.config.num_attention_heads == 6
    _check_pruned_shape(original, pruned, pruner.plan)
