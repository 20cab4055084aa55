"""Streaming (layer-by-layer) pruning against the in-memory path, on tiny checkpoints saved in several shards."""

import dataclasses
import json
import os

import pytest
import torch
from family_table import FAMILIES
from testing_utils import (
    VOCAB,
    input_ids,
    logits,
    sequential_reference,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    word_text,
    word_tokenizer,
)
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner, PrunerConfig, PruningPlan
from optimum_prune.calibration import prepare_calibration
from optimum_prune.streaming import prune_streaming, sequential_plan


SAMPLES, SEQ_LEN = 6, 16
DATA = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(3))


def _config(importance, **kwargs):
    kwargs.setdefault("pruning_ratio", 0.2)
    kwargs.setdefault("global_ranking", False)  # one pass, as the sequential references prune, unless asked
    return PrunerConfig(importance=importance, num_calibration_samples=SAMPLES, calibration_seq_len=SEQ_LEN, **kwargs)


def _batches(config):
    return prepare_calibration(DATA, None, config.num_calibration_samples, config.calibration_seq_len, config.seed)


def _save(model, path):
    model.save_pretrained(path, max_shard_size="20KB")  # several input shards
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    return path


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("streaming") / "llama"
    _save(tiny_llama(), path)
    word_tokenizer().save_pretrained(path)
    (path.parent / "calib.txt").write_text(word_text())
    return path


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_weight_criteria_match_in_memory_path(llama_dir, tmp_path, importance):
    """Without data the streaming plan is the in-memory plan, and the streamed checkpoint is the in-memory result."""
    config = _config(importance)
    report = prune_streaming(llama_dir, config, None, tmp_path / "out")
    pruner = AutoPruner.from_model(_load(llama_dir), config)
    pruned = pruner.prune()
    assert report["plan"].kept == pruner.plan.kept and report["plan"].unit_counts == pruner.plan.unit_counts
    streamed = _load(tmp_path / "out")
    ids = input_ids()
    assert torch.equal(logits(streamed, ids), logits(pruned, ids))
    assert streamed.config.intermediate_size == pruned.config.intermediate_size < 80
    assert streamed.config.num_key_value_heads == pruned.config.num_key_value_heads == 3
    assert report["params_after"] == sum(p.numel() for p in streamed.parameters())
    assert PruningPlan.from_pretrained(tmp_path / "out").kept == pruner.plan.kept
    assert json.loads((tmp_path / "out" / "pruner_config.json").read_text())["importance"] == importance
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "pruning_results.json").is_file()


MINI_LLM_BLOCK = {"loss": "block", "num_perturbations": 4}


@pytest.mark.parametrize(
    ("importance", "kwargs"),
    [("wanda_sp", {}), ("flap", {}), ("bip", {}), ("mini_llm", MINI_LLM_BLOCK)],
    ids=["wanda_sp", "flap", "bip", "mini_llm-block"],
)
def test_data_criteria_match_sequential_reference(llama_dir, tmp_path, importance, kwargs):
    """Activation and block-local criteria: the streaming plan equals the sequential-statistics reference computed in
    memory, and the streamed checkpoint computes exactly what the original pruned with that plan computes."""
    config = _config(importance, importance_kwargs=kwargs)
    report = prune_streaming(llama_dir, config, DATA, tmp_path / "out")
    plan = report["plan"]
    assert plan.kept == sequential_reference(_load(llama_dir), config, _batches(config), FAMILIES["llama"].zero_units)
    assert plan.kept == sequential_plan(_load(llama_dir), config, _batches(config)).kept
    # Layer 0 sees the same inputs in both paths, so it matches the in-memory (non-sequential) plan; one pass does not
    # reconstruct, so neither does the in-memory run compared (its default would choose units by refit error).
    in_memory = AutoPruner.from_model(_load(llama_dir), dataclasses.replace(config, reconstruction=False))
    in_memory.prune(calibration_data=DATA)
    layer0 = {k: v for k, v in plan.kept.items() if k.endswith(".0")}
    assert layer0 and layer0 == {k: v for k, v in in_memory.plan.kept.items() if k.endswith(".0")}
    reference = plan.apply(_load(llama_dir))
    ids = input_ids()
    assert torch.equal(logits(_load(tmp_path / "out"), ids), logits(reference, ids))


def test_text_calibration_tokenizer_and_output_shards(llama_dir, tmp_path):
    """Text calibration goes through the checkpoint's tokenizer; small shards give an index; tied heads work."""
    config = _config("wanda_sp")
    out = tmp_path / "out"
    report = prune_streaming(llama_dir, config, str(llama_dir.parent / "calib.txt"), out, max_shard_size="10KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert (out / "tokenizer.json").is_file()
    assert torch.equal(logits(_load(out), input_ids()), logits(report["plan"].apply(_load(llama_dir)), input_ids()))

    tied_dir = _save(tiny_llama(tie=True, seed=1), tmp_path / "tied")
    report = prune_streaming(tied_dir, config, DATA, tmp_path / "tied_out")
    streamed = _load(tmp_path / "tied_out")
    assert streamed.lm_head.weight.data_ptr() == streamed.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(streamed, input_ids()), logits(report["plan"].apply(_load(tied_dir)), input_ids()))


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_mistral], ids=["qwen2", "mistral"])
def test_other_llama_layout_families(tmp_path, build):
    path = _save(build(), tmp_path / "model")
    config = _config("wanda_sp")
    report = prune_streaming(path, config, DATA, tmp_path / "out")
    assert report["plan"].kept == sequential_plan(_load(path), config, _batches(config)).kept
    assert torch.equal(
        logits(_load(tmp_path / "out"), input_ids()), logits(report["plan"].apply(_load(path)), input_ids())
    )


def test_dry_run_writes_nothing_and_predicts_the_result(llama_dir, tmp_path):
    config = _config("wanda_sp")
    dry = prune_streaming(llama_dir, config, None, tmp_path / "dry", dry_run=True)
    assert not (tmp_path / "dry").exists()
    assert dry["planned_widths"]["attention_heads"] == {"0": 3, "1": 3, "2": 3}
    assert set(dry["planned_widths"]["mlp_channels"].values()) == {63}
    assert dry["params_before"] == sum(p.numel() for p in tiny_llama().parameters())
    run = prune_streaming(llama_dir, config, DATA, tmp_path / "out")
    assert run["params_after"] == dry["params_after"] == sum(p.numel() for p in _load(tmp_path / "out").parameters())
    peak = dry["estimated_peak_bytes"]
    assert peak["layer_bytes"] == 4 * sum(p.numel() for p in tiny_llama().model.layers[0].parameters())
    assert peak["layer_bytes"] < peak["peak"] < 10 * 2**20  # a tiny model needs well under 10 MiB of tensors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"importance": "taylor"}, "magnitude"),
        ({"importance": "mini_llm"}, r"layer-local criterion: .*mini_llm with importance_kwargs=\{'loss': 'block'\}"),
        ({"importance": "magnitude", "structures": ["hidden_channels"]}, "per-layer structures"),
        ({"importance": "block_influence", "structures": ["layers"]}, "per-layer structures"),
    ],
)
def test_refuses_what_is_not_layer_local(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrunerConfig(streaming=True, **kwargs)
    with pytest.raises(ValueError, match="prune_streaming"):
        AutoPruner.from_pretrained("unused", pruner_config=PrunerConfig(importance="magnitude", streaming=True))


def test_refuses_untested_families_and_non_safetensors(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="no architecture spec for model_type .gpt2.. Supported"):
        prune_streaming(tmp_path / "gpt2", _config("magnitude"), None, tmp_path / "out")
    tiny_llama().save_pretrained(tmp_path / "bin")
    os.remove(tmp_path / "bin" / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        prune_streaming(tmp_path / "bin", _config("magnitude"), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_streaming_and_dry_run(llama_dir, tmp_path, capsys):
    from optimum_prune.commands.cli import main

    common = ["prune", "--model", str(llama_dir), "--importance", "wanda_sp", "--streaming"]
    common += ["--calibration", str(llama_dir.parent / "calib.txt")]
    common += ["--num-calibration-samples", str(SAMPLES), "--calibration-seq-len", str(SEQ_LEN)]
    assert main([*common, "--output", str(tmp_path / "dry"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "attention_heads: keep 3 units per layer" in printed and "estimated peak" in printed
    assert not (tmp_path / "dry").exists()
    assert main([*common, "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "pruner_config.json").read_text())["streaming"] is True
    assert _load(tmp_path / "out").config.num_key_value_heads == 3
    capsys.readouterr()
    no_streaming = [a for a in common if a != "--streaming"]
    assert main([*no_streaming, "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "add `--streaming`" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_streams_mini_llm_with_the_block_loss(llama_dir, tmp_path, capsys):
    """`--importance mini_llm` streams with `--importance-kwargs '{"loss": "block"}'` and is refused without it."""
    from optimum_prune.commands.cli import main

    common = ["prune", "--model", str(llama_dir), "--importance", "mini_llm", "--streaming"]
    common += ["--calibration", str(llama_dir.parent / "calib.txt")]
    common += ["--num-calibration-samples", str(SAMPLES), "--calibration-seq-len", str(SEQ_LEN)]
    kwargs = ["--importance-kwargs", json.dumps(MINI_LLM_BLOCK)]
    assert main([*common, *kwargs, "--output", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "pruner_config.json").read_text())
    assert saved["importance_kwargs"]["loss"] == "block" and saved["streaming"] is True
    assert _load(tmp_path / "out").config.num_key_value_heads == 3
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "refused")]) == 2
    assert "mini_llm with importance_kwargs={'loss': 'block'}" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_shard_writer_lays_out_shards_in_advance(tmp_path):
    """Tensors are written to their place in any order; the shards load with safetensors as save_pretrained's do."""
    from safetensors.torch import load_file

    from optimum_prune.streaming import ShardWriter

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6).reshape(2, 3),
        "d": torch.randn(40, 40),
    }
    writer = ShardWriter(tmp_path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, max_shard_size=200)
    for name in ["d", "b", "a"]:
        writer.add(name, tensors[name])
    with pytest.raises(ValueError, match="expected"):
        writer.add("c", tensors["c"].float())
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    writer.add("c", tensors["c"])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["d"] != index["weight_map"]["a"]  # "d" (6.4 kB) has a shard of its own
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / file))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
