"""No pickle without opt-in: a checkpoint whose only weights are pickled is refused by every loader (Python API and
every CLI command) before anything is read, with a message that says why and how to opt in; `allow_pickle=True` /
`--allow-pickle` loads it."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import tiny_llama, word_text, word_tokenizer

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.commands.cli import main as cli_main
from optimum_prune.evaluation import load_for_evaluation
from optimum_prune.pruner import Pruner


REFUSAL = r"pickled weights .*can execute arbitrary code.*allow_pickle=True.*safetensors"


def _pickled_checkpoint(model, path, file_name="pytorch_model.bin", shards=1):
    """config.json + tokenizer + the weights pickled with `torch.save` (no safetensors), as older checkpoints ship."""
    model.config.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state_dict, os.path.join(path, file_name))
        return path
    names = sorted(state_dict)
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state_dict[k] for k in names[i::shards]}, os.path.join(path, shard))
        weight_map.update(dict.fromkeys(names[i::shards], shard))
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def _pickle_saved(safetensors_dir):
    """Turn a checkpoint saved by `save_pretrained` into a pickled one: model.safetensors -> pytorch_model.bin."""
    file = os.path.join(safetensors_dir, "model.safetensors")
    torch.save(load_file(file), os.path.join(safetensors_dir, "pytorch_model.bin"))
    os.remove(file)
    return safetensors_dir


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything calls `torch.load` (the refusal must come before any weight is read)."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def _assert_same_weights(model, reference):
    loaded, expected = model.state_dict(), reference.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    ("file_name", "shards"),
    [("pytorch_model.bin", 1), ("pytorch_model.bin", 2), ("model.pt", 1), ("weights.pth", 1), ("last.ckpt", 1)],
)
def test_auto_pruner_refuses_pickled_weights_before_reading_anything(tmp_path, monkeypatch, file_name, shards):
    model = tiny_llama()
    path = _pickled_checkpoint(model, tmp_path / "llama", file_name, shards)
    calls = []
    with monkeypatch.context() as patched:
        patched.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
        patched.setattr("transformers.AutoConfig.from_pretrained", lambda *a, **k: calls.append("AutoConfig"))
        with pytest.raises(ValueError, match=REFUSAL) as refused:
            AutoPruner.from_pretrained(path, PrunerConfig(importance="magnitude"))
    assert calls == []  # refused from the file names alone: no config and no weight was read
    assert str(path) in str(refused.value)


def test_allow_pickle_loads_the_pickled_weights(tmp_path):
    model = tiny_llama()
    path = _pickled_checkpoint(model, tmp_path / "llama")
    with pytest.raises(ValueError, match=REFUSAL):
        AutoPruner.from_pretrained(path, PrunerConfig(importance="magnitude"))
    pruner = AutoPruner.from_pretrained(path, PrunerConfig(importance="magnitude"), allow_pickle=True)
    _assert_same_weights(pruner.model, model)
    assert not hasattr(pruner.model.config, "allow_pickle")  # the opt-in is ours, not a config field


def _hub_cache_with(cache_dir, repo_id, files: dict[str, bytes]):
    """A Hugging Face cache holding one snapshot of `repo_id` with `files` (what `HF_HUB_OFFLINE=1` reads)."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def test_cached_hub_repo_with_only_pickled_weights_is_refused_offline(tmp_path):
    model = tiny_llama()
    local = _pickled_checkpoint(model, tmp_path / "llama")
    files = {name: (local / name).read_bytes() for name in os.listdir(local)}
    _hub_cache_with(tmp_path / "cache", "someone/tiny-llama", files)
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=REFUSAL):
        AutoPruner.from_pretrained("someone/tiny-llama", PrunerConfig(importance="magnitude"), cache_dir=cache)
    pruner = AutoPruner.from_pretrained(
        "someone/tiny-llama", PrunerConfig(importance="magnitude"), cache_dir=cache, allow_pickle=True
    )
    _assert_same_weights(pruner.model, model)


@pytest.fixture
def pickled_pruned(tmp_path):
    """A pruned checkpoint (plan, card, config) whose weights were re-saved as `pytorch_model.bin`."""
    pruner = AutoPruner.from_model(
        tiny_llama(), PrunerConfig(importance="magnitude", pruning_ratio=0.3), tokenizer=word_tokenizer()
    )
    pruner.prune()
    pruner.save_pretrained(tmp_path / "pruned")
    return _pickle_saved(tmp_path / "pruned"), pruner.model


def test_from_pruned_and_load_for_evaluation_need_allow_pickle(pickled_pruned, no_unpickling):
    path, pruned = pickled_pruned
    with pytest.raises(ValueError, match=REFUSAL):
        Pruner.from_pruned(path)
    with pytest.raises(ValueError, match=REFUSAL):
        load_for_evaluation(path, device="cpu")


def test_from_pruned_and_load_for_evaluation_load_with_allow_pickle(pickled_pruned):
    path, pruned = pickled_pruned
    _assert_same_weights(Pruner.from_pruned(path, allow_pickle=True).model, pruned)
    model, _ = load_for_evaluation(path, device="cpu", dtype="float32", allow_pickle=True)
    _assert_same_weights(model, pruned)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(word_text(400), encoding="utf-8")
    return str(path)


def _cli_args(command, model_dir, out_dir, text_file):
    if command == "prune":
        return ["prune", "--model", model_dir, "--output", out_dir, "--importance", "magnitude"]
    if command == "recover":
        return ["recover", "--model", model_dir, "--train", text_file, "--output", out_dir, "--max-steps", "1"]
    return ["eval", "--model", model_dir, "--ppl-data", text_file, "--seq-len", "16", "--max-windows", "2",
            "--device", "cpu", "--output", os.path.join(out_dir, "results.json")]  # fmt: skip


@pytest.mark.parametrize("command", ["prune", "recover", "eval"])
def test_every_cli_command_refuses_pickle_and_names_the_flag(
    tmp_path, capsys, pickled_pruned, text_file, no_unpickling, command
):
    model_dir = pickled_pruned[0] if command == "recover" else _pickled_checkpoint(tiny_llama(), tmp_path / "base")
    out = tmp_path / "out"
    capsys.readouterr()  # drop the fixture's progress bars
    assert cli_main(_cli_args(command, str(model_dir), str(out), text_file)) == 2
    err = capsys.readouterr().err
    assert err.startswith("optimum-prune: error: ") and err.count("\n") == 1
    assert "--allow-pickle" in err and "execute arbitrary code" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_cli_allow_pickle_opts_in(tmp_path, capsys, text_file, command):
    model_dir = _pickled_checkpoint(tiny_llama(), tmp_path / "base")
    out = tmp_path / "out"
    assert cli_main([*_cli_args(command, str(model_dir), str(out), text_file), "--allow-pickle"]) == 0
    written = os.listdir(out)
    assert ("model.safetensors" in written) if command == "prune" else (written == ["results.json"])
