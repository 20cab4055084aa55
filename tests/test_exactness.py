"""Each structure against a reference built without pruning code: the original with removed units zeroed or skipped."""

import copy

import pytest
import torch
from family_table import FAMILIES
from testing_utils import input_ids, logits, tiny_llama

from optimum_prune import AutoPruner, PrunerConfig


ATOL = 1e-5


def _prune(model, **kwargs):
    pruner = AutoPruner.from_model(model, PrunerConfig(importance="random", **kwargs))
    return pruner.prune(), pruner.plan


def _removed(kept, total):
    return sorted(set(range(total)) - set(kept))


def _reference(original, plan):
    """The untouched original with the plan's units zeroed and its layers skipped (no pruning code)."""
    return FAMILIES["llama"].zeroed_reference(original, plan)[0]


@pytest.mark.parametrize("bias", [False, True])
def test_attention_kv_groups_equal_zeroed_original(bias):
    model = tiny_llama(bias=bias)
    reference = copy.deepcopy(model)
    ids = input_ids()
    pruned, plan = _prune(model, pruning_ratio=0.19, structures=["attention_heads"])
    assert plan.kept, "nothing was pruned"
    assert set(plan.unit_counts.values()) == {4}  # a unit is a KV group (2 query heads of 8 channels)
    reference = _reference(reference, plan)
    assert pruned.config.num_attention_heads == 2 * pruned.config.num_key_value_heads
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_channels_equal_zeroed_original(bias):
    model = tiny_llama(bias=bias)
    reference = copy.deepcopy(model)
    ids = input_ids()
    pruned, plan = _prune(model, pruning_ratio=0.3, structures=["mlp_channels"])
    reference = _reference(reference, plan)
    assert pruned.config.intermediate_size < 80
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_channels_equal_zeroed_residual_stream(tie):
    """Removing hidden channel c equals the original with c zeroed in the embeddings and in every write to the
    residual stream (o_proj and down_proj rows); RMSNorm statistics are compensated exactly."""
    model = tiny_llama(tie=tie, bias=True)
    reference = copy.deepcopy(model)
    ids = input_ids()
    pruned, plan = _prune(model, pruning_ratio=0.2, structures=["hidden_channels"])
    removed = _removed(plan.kept["hidden_channels"], 48)
    assert removed
    reference = _reference(reference, plan)
    assert pruned.config.hidden_size == 48 - len(removed)
    if tie:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)


def test_layers_equal_skipped_original():
    model = tiny_llama(num_hidden_layers=6)
    reference = copy.deepcopy(model)
    ids = input_ids()
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    pruned, plan = _prune(model, pruning_ratio=round(2 * per_layer / total, 3), structures=["layers"])
    assert len(plan.removed_layers) == 2
    reference = _reference(reference, plan)
    assert pruned.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2, 3]
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)


def test_all_width_structures_together_generate():
    model = tiny_llama()
    pruned, _ = _prune(model, pruning_ratio=0.4, structures=["attention_heads", "mlp_channels", "hidden_channels"])
    ids = input_ids(batch=1, length=5)
    out = pruned.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
