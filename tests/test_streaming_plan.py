"""Applying a given plan layer by layer (`prune_streaming(plan=...)`): any criterion's plan, Taylor on a disk-offloaded
model included, is written from the original shards without loading the model, and gives the in-memory result."""

import json

import pytest
import torch
from testing_utils import VOCAB, input_ids, load_eval, logits, sharded_checkpoint, tiny_bloom, tiny_llama

from optimum_prune import AutoPruner, PrunerConfig, PruningPlan
from optimum_prune.commands.cli import main as cli_main
from optimum_prune.streaming import prune_streaming


DATA = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(3))
DISK = {"cpu": 1000}  # bytes: nothing fits, so `device_map="auto"` offloads every module to disk


def _config(importance="taylor", **kwargs):
    kwargs.setdefault("pruning_ratio", 0.3)
    kwargs.setdefault("reconstruction", False)  # a plan that slices only streams without calibration data
    return PrunerConfig(importance=importance, num_calibration_samples=6, calibration_seq_len=16, **kwargs)


_load = load_eval


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return sharded_checkpoint(tiny_llama(num_hidden_layers=4), tmp_path_factory.mktemp("streaming_plan") / "llama")


def _assert_same_checkpoint(out, pruner):
    streamed, pruned = _load(out), pruner.model
    assert streamed.config.model_type == pruned.config.model_type
    assert streamed.config.to_dict().get("per_layer_config") == pruned.config.to_dict().get("per_layer_config")
    assert {k: v.shape for k, v in streamed.state_dict().items()} == {
        k: v.shape for k, v in pruned.state_dict().items()
    }
    torch.testing.assert_close(logits(streamed, input_ids()), logits(pruned, input_ids()), atol=1e-5, rtol=0)
    assert PruningPlan.from_pretrained(out).to_dict() == pruner.plan.to_dict()


@pytest.mark.parametrize(
    ("importance", "kwargs"),
    [
        ("taylor", {"global_ranking": True, "global_normalization": "none"}),  # per-layer widths: pruned_llama
        ("flap", {}),  # uniform widths with FLAP's bias compensation from the plan's means
    ],
)
def test_given_plan_streams_to_the_in_memory_result(llama_dir, tmp_path, importance, kwargs):
    pruner = AutoPruner.from_model(_load(llama_dir), _config(importance, **kwargs))
    plan = pruner.compute_plan(calibration_data=DATA)
    assert not pruner.is_pruned and pruner.model.config.num_key_value_heads == 4  # the model is left untouched
    report = prune_streaming(llama_dir, pruner.config, output_dir=tmp_path / "out", plan=plan)
    assert report["plan_given"] and report["plan"] is plan
    pruner.apply_plan(plan)
    assert report["params_after"] == pruner.params_after
    _assert_same_checkpoint(tmp_path / "out", pruner)
    saved = json.loads((tmp_path / "out" / "pruner_config.json").read_text())
    assert saved["importance"] == importance  # the config the plan was made with, not a streaming criterion
    if importance == "flap":
        assert plan.bias_means and _load(tmp_path / "out").config.to_dict().get("o_proj_bias")


def test_taylor_on_a_disk_offloaded_model_writes_from_the_shards(llama_dir, tmp_path):
    """The memory-hungry case: Taylor's gradients through accelerate's disk offload, then no surgery in RAM."""
    config = _config("taylor")
    offloaded = AutoPruner.from_pretrained(
        llama_dir, pruner_config=config, dtype=torch.float32, device_map="auto", max_memory=DISK,
        offload_folder=str(tmp_path / "offload"),
    )  # fmt: skip
    plan = offloaded.compute_plan(calibration_data=DATA)
    reference = AutoPruner.from_model(_load(llama_dir), _config("taylor"))
    reference.prune(calibration_data=DATA)
    assert plan.to_dict() == reference.plan.to_dict()
    prune_streaming(llama_dir, config, output_dir=tmp_path / "out", plan=plan)
    _assert_same_checkpoint(tmp_path / "out", reference)


def test_cli_plan_and_disk_offloaded_device_map(llama_dir, tmp_path, capsys):
    # --device-map with disk offload: scored where the model is, written layer by layer from the shards.
    code = cli_main(
        ["prune", "--model", str(llama_dir), "--importance", "taylor", "--pruning-ratio", "0.3",
         "--num-calibration-samples", "6", "--calibration-seq-len", "16", "--calibration", str(llama_dir.parent / "calib.txt"),
         "--device-map", "auto", "--max-memory", "cpu=1000", "--offload-folder", str(tmp_path / "offload"),
         "--output", str(tmp_path / "offloaded")]
    )  # fmt: skip
    assert code == 0 and "written layer by layer" in capsys.readouterr().out
    # --plan: the saved plan applied again by streaming gives the same checkpoint.
    code = cli_main(
        ["prune", "--model", str(llama_dir), "--streaming", "--plan", str(tmp_path / "offloaded"),
         "--importance", "taylor", "--output", str(tmp_path / "again")]
    )  # fmt: skip
    assert code == 0
    first, again = _load(tmp_path / "offloaded"), _load(tmp_path / "again")
    assert torch.equal(logits(first, input_ids()), logits(again, input_ids()))
    assert cli_main(["prune", "--model", str(llama_dir), "--plan", str(tmp_path / "again"), "--output", "x"]) == 2
    assert "add `--streaming`" in capsys.readouterr().err


def test_refuses_plans_streaming_cannot_apply(llama_dir, tmp_path):
    model = _load(llama_dir)
    config = _config("magnitude", structures=["attention_heads", "mlp_channels", "hidden_channels"])
    plan = AutoPruner.from_model(model, config).compute_plan()
    with pytest.raises(ValueError, match=r"per-layer structures .* \['hidden_channels'\]"):
        prune_streaming(llama_dir, config, output_dir=tmp_path / "a", plan=plan)
    layers = PruningPlan("llama", 4, removed_layers=[2])
    with pytest.raises(ValueError, match="removed layers"):
        prune_streaming(llama_dir, config, output_dir=tmp_path / "b", plan=layers)
    other = tmp_path / "wider"
    tiny_llama(num_hidden_layers=4, intermediate_size=96).save_pretrained(other)
    plan = AutoPruner.from_model(model, _config("magnitude")).compute_plan()
    with pytest.raises(ValueError, match="expects 80 units in 'mlp_channels.0'; this checkpoint has 96"):
        prune_streaming(other, _config("magnitude"), output_dir=tmp_path / "c", plan=plan)
    bloom = tmp_path / "bloom"
    tiny_bloom().save_pretrained(bloom)
    with pytest.raises(ValueError, match="made for a 'llama' model; this checkpoint is 'bloom'"):
        prune_streaming(bloom, _config("magnitude"), output_dir=tmp_path / "d", plan=plan)
    assert not any((tmp_path / name).exists() for name in "abcd")
