"""Every family x structure x engine of `family_table`: the pruned model computes what the untouched original with the
removed units zeroed (or layers skipped) computes, to 1e-5 in float32.

Engines: `memory` (`AutoPruner.from_model`, whose checkpoint must also reload with identical logits), `dispatched`
(`AutoPruner.from_pretrained` with the even layers offloaded to disk and the rest on the CPU) and `streaming`
(`prune_streaming` from the saved shards, the streamed checkpoint reloaded). The magnitude criterion (weights only,
deterministic) runs everywhere; wanda_sp (calibration activations) runs once per engine on LLaMA.
"""

import gc

import pytest
import torch
from family_table import CASES, CONVERTED, DISPATCHED, FAMILIES, MEMORY, STREAMING, cpu_and_disk_map
from testing_utils import VOCAB, input_ids, load_eval, logits

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.architectures.base import FAMILY_REGISTRY
from optimum_prune.offload import is_offloaded
from optimum_prune.streaming import prune_streaming


ATOL = 1e-5
CALIBRATION = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", autouse=True)
def frozen_imports():
    """Keep the objects alive before the tests (Transformers' and torch's imports) out of the engines' `gc.collect`
    calls: each would otherwise scan them all, about 0.2 s a call, most of a tiny model's pruning time."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`checkpoints(family)`: the family's tiny model saved once in several safetensors shards (what the dispatched
    and streaming engines read)."""
    root, saved = tmp_path_factory.mktemp("family_table"), {}

    def path(family):
        if family not in saved:
            saved[family] = root / family
            FAMILIES[family].build().save_pretrained(saved[family], max_shard_size="20KB")
        return saved[family]

    return path


def _config(family: str, structures: list[str], importance: str = "magnitude", ratio: float | None = None):
    case = FAMILIES[family]
    if ratio is None:
        ratio = case.layer_ratio(case.build()) if structures == ["layers"] else case.ratios[structures[0]]
    return PrunerConfig(
        importance=importance,
        pruning_ratio=ratio,
        structures=structures,
        num_calibration_samples=4,
        calibration_seq_len=16,
        bias_compensation=False,  # the zeroed reference has no compensating biases
        reconstruction=False,  # nor refit consumers (tests/test_reconstruction.py tests the refit)
    )


def _prune(engine, family, config, calibration, checkpoints, tmp_path):
    """Run one engine; returns the pruned model (in memory, dispatched, or reloaded from the stream) and its plan."""
    if engine == MEMORY:
        pruner = AutoPruner.from_model(FAMILIES[family].build(), config)
        return pruner.prune(calibration_data=calibration), pruner.plan
    if engine == DISPATCHED:
        device_map = cpu_and_disk_map(FAMILIES[family].build(), FAMILIES[family].layout)
        pruner = AutoPruner.from_pretrained(
            checkpoints(family),
            pruner_config=config,
            dtype=torch.float32,
            device_map=device_map,
            offload_folder=str(tmp_path / "offload"),
        )
        assert "disk" in pruner.model.hf_device_map.values() and "cpu" in pruner.model.hf_device_map.values()
        pruner.prune(calibration_data=calibration)
        assert is_offloaded(pruner.model)
        return pruner.model, pruner.plan
    report = prune_streaming(checkpoints(family), config, calibration, tmp_path / "streamed")
    return load_eval(tmp_path / "streamed"), report["plan"]


def _check_against_reference(family, pruned, plan):
    assert plan.kept or plan.removed_layers, "nothing was pruned"
    reference, _handles = FAMILIES[family].zeroed_reference(FAMILIES[family].build(), plan)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in reference.parameters())
    ids = input_ids()
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("family", "structure", "engine"), CASES, ids=["-".join(c) for c in CASES])
def test_engine_equals_zeroed_reference(checkpoints, tmp_path, family, structure, engine):
    config = _config(family, [structure])
    pruned, plan = _prune(engine, family, config, None, checkpoints, tmp_path)
    if structure != "layers":  # every layer loses units (hidden channels: one key for the whole stream)
        layers = {key.partition(".")[2] for key in plan.kept}
        assert layers == ({""} if structure == "hidden_channels" else {"0", "1", "2"}), plan.kept.keys()
    _check_against_reference(family, pruned, plan)
    if engine == MEMORY:  # the checkpoint reloads (stock or registered type) to the same logits
        pruned.save_pretrained(tmp_path / "saved")
        ids = input_ids()
        torch.testing.assert_close(logits(load_eval(tmp_path / "saved"), ids), logits(pruned, ids), atol=0, rtol=0)


@pytest.mark.parametrize("engine", [MEMORY, DISPATCHED, STREAMING])
def test_data_driven_criterion_equals_zeroed_reference(checkpoints, tmp_path, engine):
    """wanda_sp scores from calibration activations (streaming: of the layers already pruned); whatever plan each
    engine makes, the pruned model is the original with that plan's units zeroed."""
    config = _config("llama", ["attention_heads", "mlp_channels"], importance="wanda_sp", ratio=0.25)
    pruned, plan = _prune(engine, "llama", config, CALIBRATION, checkpoints, tmp_path)
    _check_against_reference("llama", pruned, plan)


# Families whose experts are fused 3-D tensors, which this table's Linear zeroing does not describe: every structure
# of theirs is checked against its own reference (router logits at -inf for removed experts) in tests/test_experts.py.
# Their per-layer outputs are registered too, to be pruned again (tests/test_moe_streaming.py).
MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe", "pruned_mixtral", "pruned_qwen2_moe", "pruned_qwen3_moe"}


def test_table_covers_every_registered_family():
    """A family registered without a row here (or a conversion to one) would go untested by every engine."""
    registered = {model_type for model_type, family in FAMILY_REGISTRY.items() if family.spec is not None}
    assert registered == set(FAMILIES) | set(MOE_FAMILIES)
    converted = {model_type for model_type, family in FAMILY_REGISTRY.items() if family.spec is None}
    assert converted == set(CONVERTED) and set(CONVERTED.values()) <= set(FAMILIES)
