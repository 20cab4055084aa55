"""Pruning a model dispatched by accelerate (`device_map`): every criterion plans what it plans in memory.

This machine has no GPU, so offloading is exercised the way accelerate does it on the CPU: `device_map="auto"` with a
`max_memory` too small for anything puts the whole model on "disk", and a dict map mixes "cpu" (in memory) and "disk"
modules. Offloaded parameters are meta tensors outside their module's forward, which is what breaks `.grad`, SPSA's
weight swap and surgery when nothing handles it.
"""

import pytest
import testing_utils
import torch
from testing_utils import VOCAB, tiny_llama
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner, PrunerConfig, PruningPlan
from optimum_prune.calibration import collect_statistics
from optimum_prune.cli_args import _max_memory
from optimum_prune.commands.cli import main as cli_main
from optimum_prune.offload import OffloadAwareParameters, _renumber_device_map, is_offloaded, offloaded_parameters


DISK = {"cpu": 1000}  # bytes: nothing fits, so `device_map="auto"` offloads every module to disk


def _calibration(n=4, length=16, seed=3):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _mixed_map(tie=False):
    """Layers 0 and 2, the final norm and the LM head on disk; the embedding and layer 1 in memory."""
    return {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.norm": "disk",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu" if tie else "disk",  # tied weights share a device, as `infer_auto_device_map` keeps them
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("device_map") / "tiny"
    tiny_llama().save_pretrained(path)
    return path


def _load(path, tmp_path, device_map=None):
    if device_map is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        device_map=device_map,
        max_memory=DISK if device_map == "auto" else None,
        offload_folder=str(tmp_path / "offload-load"),
    )
    assert is_offloaded(model)
    return model


def _prune(path, tmp_path, config, offload):
    kwargs = {}
    if offload == "auto":
        kwargs = dict(device_map="auto", max_memory=DISK, offload_folder=str(tmp_path / "offload"))
    elif offload == "mixed":
        kwargs = dict(device_map=_mixed_map(), offload_folder=str(tmp_path / "offload"))
    pruner = AutoPruner.from_pretrained(path, pruner_config=PrunerConfig(**config), dtype=torch.float32, **kwargs)
    assert is_offloaded(pruner.model) == (offload is not None)
    pruner.prune(calibration_data=_calibration())
    return pruner


def _logits(model, seed=7):
    with torch.no_grad():
        return model(input_ids=_calibration(n=2, length=12, seed=seed)).logits


CASES = [
    ("magnitude", {}, None),
    ("random", {}, None),
    ("wanda_sp", {}, None),
    ("flap", {}, None),  # bias compensation on: it reads the offloaded o_proj/down_proj weights
    ("bip", {}, None),
    ("mini_llm", {"num_perturbations": 2}, None),
    ("mini_llm", {"num_perturbations": 2, "loss": "block"}, None),
    ("taylor", {}, None),
    ("taylor", {"order": "second"}, None),
    ("block_influence", {}, ["layers"]),
]


@pytest.mark.parametrize(("importance", "kwargs", "structures"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_disk_offloaded_model_prunes_like_the_model_in_memory(checkpoint, tmp_path, importance, kwargs, structures):
    config = dict(
        pruning_ratio=0.29 if structures else 0.3,
        importance=importance,
        importance_kwargs=kwargs,
        structures=structures or ["attention_heads", "mlp_channels"],
        num_calibration_samples=4,
        calibration_seq_len=16,
        reconstruction=False,  # offloaded models are not refit (tested below); this compares the statistics
    )
    reference = _prune(checkpoint, tmp_path, config, offload=None)
    offloaded = _prune(checkpoint, tmp_path, config, offload="auto")
    assert offloaded.plan.kept == reference.plan.kept
    assert offloaded.plan.removed_layers == reference.plan.removed_layers
    assert offloaded.plan.bias_means == reference.plan.bias_means
    assert reference.plan.kept or reference.plan.removed_layers
    # The pruned model is dispatched again (still on disk) and computes what the pruned in-memory model computes.
    assert is_offloaded(offloaded.model)
    assert set(offloaded.model.hf_device_map.values()) == {"disk"}
    torch.testing.assert_close(_logits(offloaded.model), _logits(reference.model), rtol=0, atol=1e-5)


FAMILY_CASES = [
    # OPT ties lm_head to embed_tokens: offloaded forwards untie them unless `keep_tied_weights` ties them again.
    ("tiny_opt", "taylor", ["hidden_channels"]),
    # BLOOM's pruned heads switch blocks to the registered type's class: it must run after the hooks are gone.
    ("tiny_bloom", "flap", ["attention_heads", "mlp_channels"]),
    ("tiny_glm", "mini_llm", ["attention_heads", "mlp_channels"]),
]


@pytest.mark.parametrize(("family", "importance", "structures"), FAMILY_CASES, ids=[c[0] for c in FAMILY_CASES])
def test_other_families_prune_offloaded_like_in_memory(tmp_path, family, importance, structures):
    path = tmp_path / family
    getattr(testing_utils, family)().save_pretrained(path)
    config = dict(
        pruning_ratio=0.3,
        importance=importance,
        importance_kwargs={"num_perturbations": 1} if importance == "mini_llm" else {},
        structures=structures,
        num_calibration_samples=4,
        calibration_seq_len=16,
        reconstruction=False,
    )
    reference = _prune(path, tmp_path, config, offload=None)
    offloaded = _prune(path, tmp_path, config, offload="auto")
    assert offloaded.plan.to_dict() == reference.plan.to_dict()
    assert offloaded.params_after == reference.params_after
    torch.testing.assert_close(_logits(offloaded.model), _logits(reference.model), rtol=0, atol=1e-5)


def test_mixed_device_map_with_layer_removal_saves_the_same_checkpoint(checkpoint, tmp_path):
    config = dict(
        pruning_ratio=0.45,
        importance="flap",
        structures=["attention_heads", "mlp_channels", "layers"],
        layer_importance="block_influence",
        num_layers_to_remove=1,
        num_calibration_samples=4,
        calibration_seq_len=16,
        reconstruction=False,  # offloaded models are not refit (tested below); this compares the statistics
    )
    reference = _prune(checkpoint, tmp_path, config, offload=None)
    offloaded = _prune(checkpoint, tmp_path, config, offload="mixed")
    assert offloaded.plan.to_dict() == reference.plan.to_dict()
    removed = offloaded.plan.removed_layers
    assert len(removed) == 1
    # Every module keeps its device; the layers after the removed one move down one index.
    assert offloaded.model.hf_device_map == _renumber_device_map(_mixed_map(), "model.layers", removed)
    assert "disk" in offloaded.model.hf_device_map.values()
    expected = _logits(reference.model)
    torch.testing.assert_close(_logits(offloaded.model), expected, rtol=0, atol=1e-5)
    eval_ids = _calibration(n=4, length=16, seed=11)
    assert offloaded.evaluate(eval_ids, seq_len=16) == pytest.approx(
        reference.evaluate(eval_ids, seq_len=16), rel=1e-5
    )
    with pytest.raises(ValueError, match="accelerate launch"):
        offloaded.recover(eval_ids)
    offloaded.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5)
    assert PruningPlan.from_pretrained(tmp_path / "saved").to_dict() == reference.plan.to_dict()


@pytest.mark.parametrize("device_map", ["auto", "mixed"])
def test_offloaded_gradients_equal_the_ordinary_backward(checkpoint, tmp_path, device_map):
    in_memory = _load(checkpoint, tmp_path)
    offloaded = _load(checkpoint, tmp_path, "auto" if device_map == "auto" else _mixed_map())
    names = [n for n, _ in in_memory.named_parameters()]  # embeddings and norms too (hidden-channel Taylor)
    assert set(offloaded_parameters(offloaded)) <= set(names)
    assert len(offloaded_parameters(offloaded)) >= 9  # at least two decoder layers' worth
    batches = _calibration()
    expected = collect_statistics(in_memory, batches, {"gradients", "fisher"}, param_names=names)
    got = collect_statistics(offloaded, batches, {"gradients", "fisher"}, param_names=names)
    assert set(got.gradients) == set(names) == set(got.fishers)
    for name in names:
        torch.testing.assert_close(got.gradient(name).cpu(), expected.gradient(name), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.fisher(name).cpu(), expected.fisher(name), rtol=1e-4, atol=1e-5)
        assert got.gradient(name).abs().sum() > 0
    # Nothing is left behind: no gradient buffers, requires_grad as loaded, still offloaded.
    for p in offloaded.parameters():
        assert p.grad is None and p.requires_grad
    assert is_offloaded(offloaded)


def test_spsa_perturbs_offloaded_weights_inside_the_accelerate_hook(checkpoint, tmp_path):
    in_memory = _load(checkpoint, tmp_path)
    offloaded = _load(checkpoint, tmp_path, "auto")
    names = [n for n, _ in in_memory.named_parameters() if ".mlp." in n]
    batches = _calibration()
    before = _logits(offloaded)
    expected = collect_statistics(in_memory, batches, {"forward_loss"}, param_names=names)
    got = collect_statistics(offloaded, batches, {"forward_loss"}, param_names=names)
    for name in names:
        estimate = got.spsa_gradient(name, num_perturbations=2, seed=3)
        # A torch pre-hook would run before accelerate loads the weights and perturb nothing: the estimate would be 0.
        assert estimate.abs().sum() > 0
        torch.testing.assert_close(estimate, expected.spsa_gradient(name, num_perturbations=2, seed=3))
    # The offloaded weights are untouched, bit for bit, and the model computes exactly what it did.
    params = OffloadAwareParameters(offloaded)
    reference = dict(in_memory.named_parameters())
    for name in names:
        assert params.is_offloaded(name)
        assert torch.equal(params[name], reference[name])
    assert torch.equal(_logits(offloaded), before)


def test_renumber_device_map():
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1.mlp": "disk", "model.layers.1": 1}
    device_map |= {"model.layers.2": "cpu", "model.layers.10": "disk", "lm_head": 1}
    assert _renumber_device_map(device_map, "model.layers", [1]) == {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.layers.9": "disk",
        "lm_head": 1,
    }


def test_cli_device_map_max_memory_offload_folder(checkpoint, tmp_path):
    assert _max_memory("cpu=2GiB, 0=20GiB,1=20GiB") == {"cpu": "2GiB", 0: "20GiB", 1: "20GiB"}
    common = ["prune", "--model", str(checkpoint), "--importance", "magnitude", "--pruning-ratio", "0.3"]
    offload = ["--device-map", "auto", "--max-memory", "cpu=1000", "--offload-folder", str(tmp_path / "off")]
    assert cli_main([*common, "--output", str(tmp_path / "ref")]) == 0
    assert cli_main([*common, "--output", str(tmp_path / "out"), *offload]) == 0
    assert (
        PruningPlan.from_pretrained(tmp_path / "out").to_dict()
        == PruningPlan.from_pretrained(tmp_path / "ref").to_dict()
    )
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=0, atol=0)
    assert cli_main([*common, "--output", str(tmp_path / "bad"), "--max-memory", "cpu=1GiB"]) == 2
    assert cli_main([*common, "--output", str(tmp_path / "bad"), "--device", "cpu", *offload]) == 2


def test_offloaded_model_is_not_refit_by_default(checkpoint, tmp_path):
    """Unset `reconstruction` is on where it applies; an offloaded model is pruned without it (a refit would run every
    layer twice from disk), and the plan says so."""
    config = dict(pruning_ratio=0.3, importance="wanda_sp", num_calibration_samples=4, calibration_seq_len=16)
    assert _prune(checkpoint, tmp_path, config, offload=None).plan.reconstruction
    offloaded = _prune(checkpoint, tmp_path, config, offload="auto")
    assert offloaded.plan.reconstruction == {} and offloaded.config.reconstruction is False
