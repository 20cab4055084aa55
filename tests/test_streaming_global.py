"""Streaming with per-layer widths: two passes (global ranking, FLAP allocation) give the in-memory plan exactly; given
widths (layer ratios, layer ranges) stream in one pass; hidden states can live on disk; the CLI streams by itself when
the checkpoint does not fit in memory."""

import json
import logging
import os

import pytest
import torch
from testing_utils import VOCAB, input_ids, load_eval, logits, sharded_checkpoint, tiny_llama

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.hub import plan_is_uniform
from optimum_prune.streaming import format_dry_run, prune_streaming, sequential_plan


SAMPLES, SEQ_LEN = 6, 16
DATA = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(3))


def _config(importance, **kwargs):
    kwargs.setdefault("pruning_ratio", 0.3)
    return PrunerConfig(importance=importance, num_calibration_samples=SAMPLES, calibration_seq_len=SEQ_LEN, **kwargs)


_load = load_eval


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return sharded_checkpoint(tiny_llama(num_hidden_layers=4), tmp_path_factory.mktemp("streaming_global") / "llama")


def _in_memory(path, config):
    pruner = AutoPruner.from_model(_load(path), config)
    pruner.prune(calibration_data=DATA)
    return pruner


def _assert_same_as_in_memory(report, out, pruner):
    """Same plan (kept units, unit counts, bias means), same config, same outputs as the in-memory run."""
    plan = report["plan"]
    assert plan.kept == pruner.plan.kept
    assert plan.unit_counts == pruner.plan.unit_counts
    assert plan.bias_means == pruner.plan.bias_means
    streamed = _load(out)
    pruned = pruner.model
    keys = ("model_type", "per_layer_config", "num_key_value_heads", "intermediate_size", "o_proj_bias")
    assert {k: streamed.config.to_dict().get(k) for k in keys} == {k: pruned.config.to_dict().get(k) for k in keys}
    assert streamed.state_dict().keys() == pruned.state_dict().keys()
    ids = input_ids()
    torch.testing.assert_close(logits(streamed, ids), logits(pruned, ids), atol=1e-5, rtol=0)
    assert report["params_after"] == pruner.params_after == sum(p.numel() for p in streamed.parameters())


@pytest.mark.parametrize(
    ("importance", "kwargs"),
    [
        ("wanda_sp", {"global_ranking": True}),
        ("magnitude", {"global_ranking": True, "global_normalization": "none"}),
        ("flap", {"allocation": "flap"}),  # bias compensation on by default, as in memory
        ("mini_llm", {"global_ranking": True, "importance_kwargs": {"loss": "block", "num_perturbations": 4}}),
        ("obs", {}),  # ranked globally and refit by default: the consumers' Gram matrices, one layer at a time
        pytest.param("wanda_sp", {"allocation": "flap", "bias_compensation": False}, marks=pytest.mark.slow),
    ],
)
def test_two_pass_plan_is_the_in_memory_plan(llama_dir, tmp_path, importance, kwargs):
    config = _config(importance, **kwargs)
    report = prune_streaming(llama_dir, config, DATA, tmp_path / "out")
    pruner = _in_memory(llama_dir, _config(importance, **kwargs))
    assert not plan_is_uniform(pruner.plan)  # per-layer widths: the registered pruned type
    assert _load(tmp_path / "out").config.model_type == "pruned_llama"
    _assert_same_as_in_memory(report, tmp_path / "out", pruner)
    assert report["widths_from_scores"] and (tmp_path / "out" / "layer_widths.png").is_file()
    saved = json.loads((tmp_path / "out" / "pruner_config.json").read_text())
    assert saved["bias_compensation"] is pruner.config.bias_compensation
    if importance == "flap":
        assert report["plan"].bias_means and saved["bias_compensation"] is True


def test_given_widths_stream_in_one_pass(llama_dir, tmp_path):
    """Layer ratios and layer ranges need no scores: one pass, with the in-memory widths. Weight criteria give the
    in-memory plan itself; data criteria give the sequential-statistics plan with the same widths."""
    kwargs = {"layer_ratios": [0.1, 0.5, 0.3, 0.2], "min_channels": 8}
    config = _config("magnitude", **kwargs)
    report = prune_streaming(llama_dir, config, None, tmp_path / "magnitude")
    assert not report["widths_from_scores"]
    _assert_same_as_in_memory(report, tmp_path / "magnitude", _in_memory(llama_dir, _config("magnitude", **kwargs)))

    kwargs = {"attention_layers": [1, 2], "mlp_layers": (1, 4), "pruning_ratio": 0.2}
    config = _config("wanda_sp", **kwargs)
    dry = prune_streaming(llama_dir, config, None, dry_run=True)
    report = prune_streaming(llama_dir, config, DATA, tmp_path / "wanda")
    plan = report["plan"]
    in_memory = _in_memory(llama_dir, _config("wanda_sp", **kwargs)).plan
    widths = {k: len(v) for k, v in plan.kept.items()}
    assert widths == {k: len(v) for k, v in in_memory.kept.items()}
    assert not any(k.endswith(".0") for k in widths) and "attention_heads.3" not in widths
    assert plan.kept == sequential_plan(_load(llama_dir), config, _batches(config)).kept
    assert plan.unit_counts == in_memory.unit_counts
    assert dry["planned_widths"] == report["planned_widths"] and dry["params_after"] == report["params_after"]
    assert dry["planned_widths"]["attention_heads"]["0"] == 4
    ids = input_ids()
    torch.testing.assert_close(logits(_load(tmp_path / "wanda"), ids), logits(plan.apply(_load(llama_dir)), ids))


def _batches(config):
    from optimum_prune.calibration import prepare_calibration

    return prepare_calibration(DATA, None, config.num_calibration_samples, config.calibration_seq_len, config.seed)


@pytest.mark.parametrize("kwargs", [{}, pytest.param({"global_ranking": True}, marks=pytest.mark.slow)])
def test_offloaded_hidden_states_give_the_same_checkpoint(llama_dir, tmp_path, kwargs):
    """Hidden states in a memory-mapped file: the same plan and bit-identical weights; the file is removed."""
    config = _config("wanda_sp", reconstruction=False, **kwargs)  # a refit cannot offload them (tested elsewhere)
    in_ram = prune_streaming(llama_dir, config, DATA, tmp_path / "ram")
    offload = tmp_path / "hidden"
    on_disk = prune_streaming(llama_dir, config, DATA, tmp_path / "disk", offload_hidden_states=offload)
    assert on_disk["plan"] == in_ram["plan"]
    ram, disk = _load(tmp_path / "ram").state_dict(), _load(tmp_path / "disk").state_dict()
    assert ram.keys() == disk.keys() and all(torch.equal(ram[k], disk[k]) for k in ram)
    assert offload.is_dir() and not os.listdir(offload)


def test_offload_file_holds_the_hidden_states(llama_dir, tmp_path):
    """The captured inputs are views of one file-backed tensor [samples, seq_len, hidden], equal to the in-RAM ones."""

    from optimum_prune.architectures import get_architecture
    from optimum_prune.streaming import capture_inputs

    model = _load(llama_dir)
    batches = _batches(_config("wanda_sp"))
    spec = get_architecture("llama")
    in_ram, none = capture_inputs(model, spec, batches)
    on_disk, store = capture_inputs(model, spec, batches, tmp_path / "hidden")
    assert none is None and store.tensor.shape == (SAMPLES, SEQ_LEN, 48)
    assert [h.shape for h in on_disk.hidden] == [h.shape for h in in_ram.hidden]
    assert all(torch.equal(a, b) for a, b in zip(on_disk.hidden, in_ram.hidden))
    assert all(h.untyped_storage().data_ptr() == store.tensor.untyped_storage().data_ptr() for h in on_disk.hidden)
    # File-backed: the mapping of the file, unlinked at once so that nothing is left behind whatever happens.
    assert not os.listdir(tmp_path / "hidden")
    with open("/proc/self/maps") as f:
        assert f"{store.path} (deleted)" in f.read()
    assert store.nbytes == SAMPLES * SEQ_LEN * 48 * 4
    del on_disk
    store.close()
    with open("/proc/self/maps") as f:
        assert store.path not in f.read()


def test_dry_run_of_two_pass_config_reports_the_target(llama_dir, tmp_path):
    config = _config("wanda_sp", global_ranking=True, reconstruction=False)  # the same run with and without offload
    dry = prune_streaming(llama_dir, config, None, dry_run=True)
    assert dry["widths_from_scores"] and "plan" not in dry
    assert dry["params_after"] == round(dry["params_before"] * 0.7)
    assert set(dry["planned_widths"]) == {"attention_heads", "mlp_channels"}  # the uniform estimate
    text = format_dry_run(dry)
    offloaded = prune_streaming(llama_dir, config, None, dry_run=True, offload_hidden_states=tmp_path / "hidden")
    hidden_states = SAMPLES * SEQ_LEN * 48 * 4
    saved = dry["estimated_peak_bytes"]["phase_layer"] - offloaded["estimated_peak_bytes"]["phase_layer"]
    assert saved == hidden_states - 4 * SEQ_LEN * 48 * 4  # all of them in RAM, against one batch of 4 windows
    assert "known only after the first streaming pass" in text and "Uniform estimate" in text
    run = prune_streaming(llama_dir, config, DATA, tmp_path / "out")
    assert abs(run["params_after"] - dry["params_after"]) / dry["params_before"] <= 0.01
    assert "known only after" not in format_dry_run(run)
    assert "units in layers 0-3" in format_dry_run(run)  # per-layer widths, now known


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bias_compensation": True}, "two-pass allocations"),
        ({"layer_ratios": [0.1, 0.2, 0.3, 0.4], "bias_compensation": True}, "bias_compensation=False"),
    ],
)
def test_refuses_bias_compensation_in_one_pass(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrunerConfig(importance="flap", streaming=True, **kwargs)
    PrunerConfig(importance="flap", streaming=True, allocation="flap", bias_compensation=True)  # two passes: allowed


def _cli_args(llama_dir, out, importance="magnitude"):
    return ["prune", "--model", str(llama_dir), "--importance", importance, "--output", str(out)]


def test_cli_streams_when_the_checkpoint_does_not_fit(llama_dir, tmp_path, monkeypatch, caplog):
    from optimum_prune import streaming
    from optimum_prune.commands.cli import main

    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 1000)
    with caplog.at_level(logging.WARNING):
        assert main(_cli_args(llama_dir, tmp_path / "auto")) == 0
    assert "pruning layer by layer" in caplog.text
    assert json.loads((tmp_path / "auto" / "pruner_config.json").read_text())["streaming"] is True

    caplog.clear()  # a criterion that needs the whole model stays in memory, saying why
    with caplog.at_level(logging.WARNING):
        args = _cli_args(llama_dir, tmp_path / "taylor", "taylor")
        assert main([*args, "--calibration-seq-len", "16", "--num-calibration-samples", "4", "--dry-run"]) == 2
    assert "cannot be pruned layer by layer" in caplog.text

    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 2**50)
    assert main(_cli_args(llama_dir, tmp_path / "in_memory")) == 0
    assert json.loads((tmp_path / "in_memory" / "pruner_config.json").read_text())["streaming"] is False
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: None)  # unknown: as asked
    assert main(_cli_args(llama_dir, tmp_path / "unknown")) == 0
    assert json.loads((tmp_path / "unknown" / "pruner_config.json").read_text())["streaming"] is False


def test_available_memory_and_in_memory_size(llama_dir):
    from optimum_prune.streaming import available_memory_bytes, in_memory_bytes

    assert available_memory_bytes() > 0
    stored = in_memory_bytes(llama_dir)
    assert stored == 4 * sum(p.numel() for p in tiny_llama(num_hidden_layers=4).parameters())
    assert in_memory_bytes(llama_dir, torch.bfloat16) == stored // 2


def test_cli_offload_hidden_states_and_two_pass_dry_run(llama_dir, tmp_path, capsys):
    from optimum_prune.commands.cli import main

    args = [*_cli_args(llama_dir, tmp_path / "out", "wanda_sp"), "--streaming", "--global-ranking"]
    args += ["--num-calibration-samples", str(SAMPLES), "--calibration-seq-len", str(SEQ_LEN)]
    args += ["--calibration", str(llama_dir.parent / "calib.txt")]
    assert main([*args, "--dry-run"]) == 0
    assert "known only after the first streaming pass" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert main([*args, "--offload-hidden-states", str(tmp_path / "hidden")]) == 0
    assert "units in layers 0-3" in capsys.readouterr().out
    assert _load(tmp_path / "out").config.model_type == "pruned_llama"
    assert not os.listdir(tmp_path / "hidden")


@pytest.mark.parametrize(
    ("importance", "kwargs"),
    [("magnitude", {}), ("wanda_sp", {"global_ranking": True}), ("flap", {"allocation": "flap"})],
)
def test_query_heads_stream_to_the_in_memory_result(llama_dir, tmp_path, importance, kwargs):
    """Query heads within KV groups: each group keeps its own best heads, in one pass or two, as in memory."""
    structures = ["query_heads", "mlp_channels"]
    report = prune_streaming(llama_dir, _config(importance, structures=structures, **kwargs), DATA, tmp_path / "out")
    pruner = _in_memory(llama_dir, _config(importance, structures=structures, **kwargs))
    _assert_same_as_in_memory(report, tmp_path / "out", pruner)
    heads = {k: v for k, v in report["plan"].kept.items() if k.startswith("query_heads.")}
    assert heads
    for units in heads.values():  # tiny_llama: 4 KV groups of 2 query heads; every group keeps the same number
        per_group = [sum(u // 2 == g for u in units) for g in range(4)]
        assert len(set(per_group)) == 1 and per_group[0] >= 1
