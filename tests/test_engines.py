"""One engine choice (`choose_engine`) and one entry point (`prune_checkpoint`) for the Python API and the CLI."""

import json

import pytest
import torch
from testing_utils import tiny_llama, word_tokenizer

from optimum_prune import AutoPruner, PrunerConfig, choose_engine, prune_checkpoint
from optimum_prune import streaming as streaming_module


MAGNITUDE = PrunerConfig(pruning_ratio=0.2, importance="magnitude")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engines") / "tiny"
    tiny_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_streaming_when_asked(llama_dir):
    assert choose_engine(PrunerConfig(importance="magnitude", streaming=True), llama_dir).engine == "streaming"
    choice = choose_engine(MAGNITUDE, llama_dir, streaming_asked=True)
    assert choice.engine == "streaming" and choice.config is MAGNITUDE


def test_dispatched_with_a_device_map(llama_dir):
    assert choose_engine(MAGNITUDE, llama_dir, device_map="auto").engine == "dispatched"


def test_memory_when_it_fits_or_the_run_needs_a_loaded_model(llama_dir):
    assert choose_engine(MAGNITUDE, llama_dir, available_bytes=2**40).engine == "memory"
    small = {"available_bytes": 1000}
    assert choose_engine(MAGNITUDE, llama_dir, needs_loaded_model=True, **small).engine == "memory"
    assert choose_engine(MAGNITUDE, llama_dir, dtype=torch.bfloat16, **small).engine == "memory"
    assert choose_engine(MAGNITUDE, "someone/some-model", **small).engine == "memory"  # streaming reads local shards


def test_streaming_when_it_does_not_fit_and_the_config_streams(llama_dir):
    choice = choose_engine(MAGNITUDE, llama_dir, available_bytes=1000)
    assert choice.engine == "streaming" and choice.config.streaming and not MAGNITUDE.streaming
    assert "GiB available" in choice.reason


def test_memory_when_it_does_not_fit_but_the_criterion_needs_the_whole_model(llama_dir):
    taylor = PrunerConfig(pruning_ratio=0.2, importance="taylor")  # gradients through the whole model
    choice = choose_engine(taylor, llama_dir, available_bytes=1000)
    assert choice.engine == "memory" and "streaming cannot run this config" in choice.reason


def test_prune_checkpoint_in_memory_equals_the_pruner(llama_dir, tmp_path):
    result = prune_checkpoint(llama_dir, MAGNITUDE, tmp_path / "out")
    assert result["engine"] == "memory" and result["model_type"] == "llama"
    pruner = AutoPruner.from_pretrained(llama_dir, pruner_config=MAGNITUDE)
    pruner.prune()
    saved = json.loads((tmp_path / "out" / "pruning_plan.json").read_text())
    assert saved == pruner.plan.to_dict()
    assert result["after"]["parameters"] == pruner.params_after < result["before"]["parameters"]


def test_prune_checkpoint_streams_for_lack_of_memory(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming_module, "available_memory_bytes", lambda: 1000)
    result = prune_checkpoint(llama_dir, MAGNITUDE, tmp_path / "out")
    assert result["engine"] == "streaming"
    in_memory = prune_checkpoint(llama_dir, MAGNITUDE, tmp_path / "memory", eval_data=None, device="cpu")
    assert in_memory["engine"] == "memory"  # a device: only a loaded model has one
    streamed = json.loads((tmp_path / "out" / "pruning_plan.json").read_text())
    assert streamed == json.loads((tmp_path / "memory" / "pruning_plan.json").read_text())


def test_prune_checkpoint_dry_run_writes_nothing(llama_dir, tmp_path):
    result = prune_checkpoint(llama_dir, MAGNITUDE, tmp_path / "out", streaming_asked=True, dry_run=True)
    assert result["engine"] == "streaming" and result["streaming"]["params_after"] < result["before"]["parameters"]
    assert not (tmp_path / "out").exists()


def test_every_engine_is_registered_and_checks_before_work(llama_dir, tmp_path):
    from optimum_prune.engines import ENGINES, PruneJob

    assert set(ENGINES) == {"memory", "dispatched", "streaming"}
    assert all(name == engine.name for name, engine in ENGINES.items())
    with pytest.raises(ValueError, match="add `--streaming`"):
        ENGINES["memory"].check(PruneJob(llama_dir, MAGNITUDE, tmp_path / "out", dry_run=True))
    evaluated = PruneJob(llama_dir, MAGNITUDE, tmp_path / "out", eval_data="eval.txt")
    with pytest.raises(ValueError, match="does not evaluate"):
        ENGINES["streaming"].check(evaluated)
    ENGINES["memory"].check(evaluated)  # the loaded model evaluates
    assert not (tmp_path / "out").exists()


def test_dispatched_engine_prunes_like_the_memory_engine(llama_dir, tmp_path):
    dispatched = prune_checkpoint(llama_dir, MAGNITUDE, tmp_path / "dispatched", device_map={"": "cpu"})
    memory = prune_checkpoint(llama_dir, MAGNITUDE, tmp_path / "memory")
    assert dispatched["engine"] == "dispatched" and memory["engine"] == "memory"
    assert dispatched["after"] == memory["after"]
    plans = [json.loads((tmp_path / d / "pruning_plan.json").read_text()) for d in ("dispatched", "memory")]
    assert plans[0] == plans[1]
