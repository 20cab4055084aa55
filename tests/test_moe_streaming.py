"""Streaming (layer-by-layer) pruning of the Mixture-of-Experts families against the in-memory path.

Transformers 5 saves a stock MoE checkpoint per expert (`block_sparse_moe.experts.{e}.w1/w2/w3`, `mlp.experts.{e}.
gate_proj/up_proj/down_proj`) and loads it into fused `gate_up_proj`/`down_proj` tensors; the registered pruned types
store theirs the same way (per-layer expert counts in the per-expert names). Streaming reads and writes both through
Transformers' own conversions, so the streamed checkpoint holds the very tensors, under the very names, that the
in-memory pruner saves, and our own pruned outputs stream again. One-pass data criteria
(frequency) are checked against a reference with no pruning code: each layer's routing counted on the original
model whose earlier layers route around their removed experts (router logits at -inf).
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_experts import BUILDERS, CALIBRATION, NUM_EXPERTS, _config, experts_ratio, zeroed_reference
from test_moe_compat import pruner_config
from testing_utils import input_ids, logits
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner, PruningPlan
from optimum_prune.allocation import select_top
from optimum_prune.calibration import collect_statistics
from optimum_prune.groups import build_group_sets
from optimum_prune.importance import ROUTING, get_importance
from optimum_prune.streaming import prune_streaming, sequential_plan


ATOL = 1e-5
FAMILIES = sorted(BUILDERS)


def _checkpoint(family, tmp_path):
    path = tmp_path / family
    BUILDERS[family]().save_pretrained(path, max_shard_size="20KB")
    return path


def _tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_same_checkpoint(streamed_dir, in_memory_dir):
    streamed, in_memory = _tensors(streamed_dir), _tensors(in_memory_dir)
    assert sorted(streamed) == sorted(in_memory)
    for name, tensor in in_memory.items():
        assert torch.equal(streamed[name], tensor), name


def _assert_exact(family, out, plan):
    reference = zeroed_reference(BUILDERS[family](), plan)
    streamed = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(streamed, input_ids()), logits(reference, input_ids()), atol=ATOL, rtol=0)


# Configs whose streaming plan is the in-memory plan: weight criteria in one pass, and two passes (global ranking,
# scored on the unpruned model) for any criterion.
SAME_PLAN = {
    "experts-magnitude": (["experts"], 2, "magnitude", {}),
    "experts-reap-global": (["experts"], 2, "reap", {"global_ranking": True}),
    "heads-channels-magnitude": (["attention_heads", "mlp_channels"], 0.23, "magnitude", {}),
    "all-random-global": (["attention_heads", "mlp_channels", "experts"], 0.4, "random", {"global_ranking": True}),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(SAME_PLAN))
def test_streaming_moe_equals_in_memory(family, case, tmp_path):
    """The streamed checkpoint is the in-memory pruner's, tensor for tensor and name for name (per-expert names, for
    the stock type and for the per-layer type of global ranking), and equals the zeroed / masked-router reference."""
    structures, amount, importance, options = SAME_PLAN[case]
    ratio = experts_ratio(BUILDERS[family](), amount) if structures == ["experts"] else amount
    config = _config(structures, ratio, importance, **options)
    report = prune_streaming(_checkpoint(family, tmp_path), config, CALIBRATION, tmp_path / "streamed")
    pruner = AutoPruner.from_model(BUILDERS[family](), _config(structures, ratio, importance, **options))
    pruner.prune(calibration_data=CALIBRATION)
    pruner.save_pretrained(tmp_path / "in_memory")
    assert report["plan"].kept == pruner.plan.kept
    assert {key.split(".")[0] for key in report["plan"].kept} == set(structures)
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "in_memory")
    _assert_exact(family, tmp_path / "streamed", report["plan"])


def sequential_frequency_plan(family, config) -> dict[str, list[int]]:
    """One-pass streaming's plan for `frequency` removing 2 experts per layer, with no pruning code: layer i's routing
    is counted on the original model whose layers before i route around the experts already removed."""
    model = BUILDERS[family]()
    spec = AutoPruner.from_model(BUILDERS[family](), config).spec
    group_sets = build_group_sets(model, spec, ["experts"])
    counts = {key: NUM_EXPERTS for key in group_sets}
    kept = {}
    for key in sorted(group_sets, key=lambda k: group_sets[k].layer):
        reference = zeroed_reference(model, PruningPlan(model.config.model_type, 3, unit_counts=counts, kept=kept))
        stats = collect_statistics(reference, CALIBRATION, {ROUTING}, batch_size=4)
        kept[key] = select_top(get_importance("frequency").score(group_sets[key], stats), NUM_EXPERTS - 2)
    return kept


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_frequency_one_pass_is_sequential(family, tmp_path):
    """Routing counted layer by layer on the pruned model's activations: the plan of `sequential_plan` and of a
    masked-router reference, and the checkpoint is exact against the masked routers."""
    config = _config(["experts"], experts_ratio(BUILDERS[family](), 2), "frequency")
    report = prune_streaming(_checkpoint(family, tmp_path), config, CALIBRATION, tmp_path / "out")
    plan = report["plan"]
    assert plan.kept == sequential_plan(BUILDERS[family](), config, CALIBRATION).kept
    assert plan.kept == sequential_frequency_plan(family, config)
    _assert_exact(family, tmp_path / "out", plan)


def test_streaming_reads_fused_experts(tmp_path):
    """A stock checkpoint that stores the fused expert tensors under the model's own names (written by other tools than
    `save_pretrained`) streams to the same checkpoint as the per-expert one."""
    model = BUILDERS["mixtral"]()
    model.config.save_pretrained(tmp_path / "fused")
    save_file(model.state_dict(), tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in _tensors(tmp_path / "fused")
    config = _config(["experts"], experts_ratio(model, 2), "frequency")
    prune_streaming(tmp_path / "fused", config, CALIBRATION, tmp_path / "from_fused")
    prune_streaming(_checkpoint("mixtral", tmp_path), config, CALIBRATION, tmp_path / "from_per_expert")
    _assert_same_checkpoint(tmp_path / "from_fused", tmp_path / "from_per_expert")


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_prunes_a_pruned_moe_output_again(family, tmp_path):
    """Our per-layer `pruned_*` output, stored per expert, streams again: pruning it a second time streamed gives the
    in-memory pruner's checkpoint tensor for tensor, with the same plan and logits."""
    pruner = AutoPruner.from_model(BUILDERS[family](), pruner_config(family, "per-layer-experts"))
    pruner.prune(calibration_data=CALIBRATION)
    pruner.save_pretrained(tmp_path / "pruned")
    stored = _tensors(tmp_path / "pruned")
    assert any(".experts.0." in name for name in stored)
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in stored)
    second = dict(structures=["attention_heads", "mlp_channels"], ratio=0.22, importance="magnitude")
    report = prune_streaming(tmp_path / "pruned", _config(**second), CALIBRATION, tmp_path / "streamed")
    again = AutoPruner.from_pretrained(tmp_path / "pruned", pruner_config=_config(**second))
    model = again.prune(calibration_data=CALIBRATION)
    again.save_pretrained(tmp_path / "in_memory")
    assert model.config.model_type == f"pruned_{family}"
    assert report["plan"].kept == again.plan.kept
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "in_memory")
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    torch.testing.assert_close(logits(streamed, input_ids()), logits(model, input_ids()), atol=ATOL, rtol=0)


def test_streaming_moe_refuses_model_wide_structures(tmp_path):
    with pytest.raises(ValueError, match=r"got \['hidden_channels'\] .*need every layer at once"):
        prune_streaming(_checkpoint("mixtral", tmp_path), _config(["hidden_channels"], 0.2), None, tmp_path / "out")
