"""LoRA recovery: trains, merges back into plain weights of the pruned shape and type, reloads identically."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import testing_utils
import torch
from testing_utils import WORDS, input_ids, logits, tiny_llama, word_tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.architectures.llama import LLAMA_SPEC
from optimum_prune.recovery import (
    DEFAULT_TRAINING_ARGS,
    build_training_arguments,
    lora_target_modules,
    prepare_train_blocks,
)


REPO_ROOT = Path(__file__).resolve().parent.parent
# Tiny but real runs: a handful of steps on short blocks, lr high enough to move a random model.
FAST = {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}


def _periodic_ids(n=4096, period=7):
    """A learnable stream (a repeating pattern), so a few LoRA steps measurably lower the loss."""
    return (torch.arange(n) * 3 % period + 5).long()


def _pruned(hidden_size=48):
    """hidden 48 keeps the stock `llama` type at 0.3; hidden 64 needs the registered `pruned_llama` type."""
    pruner = AutoPruner.from_model(
        tiny_llama(hidden_size=hidden_size), PrunerConfig(pruning_ratio=0.3, importance="magnitude")
    )
    pruner.prune()
    return pruner


@pytest.mark.parametrize("family", ["tiny_opt", "tiny_bloom", "tiny_glm"])
def test_recover_keeps_per_layer_types_of_other_families(tmp_path, family):
    """LoRA on a model with per-layer widths (the registered types of OPT, BLOOM, GLM) merges back into that type."""
    from optimum_prune.architectures import get_architecture

    model = getattr(testing_utils, family)()
    spec = get_architecture(model.config.model_type)
    pruner = AutoPruner.from_model(
        model, PrunerConfig(importance="random", pruning_ratio=0.25, layer_ratios=[0.1, 0.5, 0.3])
    )
    pruner.prune()
    cls, before = type(pruner.model), {n: p.detach().clone() for n, p in pruner.model.named_parameters()}
    data = _periodic_ids()
    report = pruner.recover(data, training_args={**FAST, "output_dir": str(tmp_path / "t")}, block_size=32)
    assert type(pruner.model) is cls and pruner.model.config.per_layer_overrides
    changed = {n for n, p in pruner.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(any(t in n for t in spec.lora_target_modules) for n in changed)
    assert report["last_logged_loss"] < report["first_logged_loss"]
    pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == cls.__name__
    torch.testing.assert_close(logits(reloaded, input_ids()), logits(pruner.model, input_ids()), atol=0, rtol=0)


@pytest.mark.parametrize(("hidden_size", "model_type"), [(48, "llama"), (64, "pruned_llama")])
def test_recover_merges_into_same_shape_and_type(tmp_path, hidden_size, model_type):
    pruner = _pruned(hidden_size)
    assert pruner.model.config.model_type == model_type
    before = {n: p.detach().clone() for n, p in pruner.model.named_parameters()}
    cls = type(pruner.model)
    data = _periodic_ids()
    report = pruner.recover(
        data, training_args={**FAST, "output_dir": str(tmp_path / "trainer")}, eval_data=data, block_size=32,
        eval_seq_len=32, eval_windows=8,
    )  # fmt: skip

    model = pruner.model
    assert type(model) is cls and model.config.model_type == model_type
    assert not [n for n, _ in model.named_modules() if "lora" in n.lower()], "adapters must be merged away"
    after = dict(model.named_parameters())
    assert {n: p.shape for n, p in after.items()} == {n: p.shape for n, p in before.items()}
    assert all(p.requires_grad for p in after.values())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert all(any(t in n for t in LLAMA_SPEC.lora_target_modules) for n in changed), "only LoRA targets change"

    assert report["last_logged_loss"] < report["first_logged_loss"]
    assert report["perplexity_recovered"] < report["perplexity_pruned"]
    assert pruner.recovery["max_steps"] == 6 and pruner.recovery["r"] == 8 and pruner.recovery["lora_alpha"] == 16

    out = tmp_path / "out"
    pruner.save_pretrained(out)
    assert not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == cls.__name__
    ids = input_ids()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)
    card = (out / "README.md").read_text()
    assert (
        "LoRA r=8, alpha=16" in card and "perplexity after LoRA recovery" in card and "optimum-prune recover" in card
    )
    assert json.loads((out / "pruning_results.json").read_text())["recovery"]["max_steps"] == 6


def test_recover_reports_every_stage():
    pruner = AutoPruner.from_model(tiny_llama(), PrunerConfig(pruning_ratio=0.3, importance="magnitude"))
    data = _periodic_ids()
    base = pruner.evaluate(data, seq_len=32, max_windows=8)
    pruner.prune()
    report = pruner.recover(data, training_args=FAST, eval_data=data, block_size=32, eval_seq_len=32, eval_windows=8)
    assert report["perplexity_base"] == base
    assert {"perplexity_pruned", "perplexity_recovered", "train_loss", "train_runtime"} <= set(report)
    with pytest.raises(RuntimeError, match="already recovered"):
        pruner.recover(data)


def test_recover_needs_a_pruned_model():
    pruner = AutoPruner.from_model(tiny_llama(), PrunerConfig(importance="magnitude"))
    with pytest.raises(RuntimeError, match="prune"):
        pruner.recover(_periodic_ids())


def _tokenizer():
    return word_tokenizer()


def test_train_data_in_every_calibration_form(tmp_path):
    from datasets import Dataset

    tok = _tokenizer()
    text = " ".join(WORDS[i % 50] for i in range(100))
    (tmp_path / "train.txt").write_text(text)
    expected = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:96]).view(3, 32)
    for data in (str(tmp_path / "train.txt"), [text], Dataset.from_dict({"text": [text]})):
        torch.testing.assert_close(prepare_train_blocks(data, tok, 32).blocks, expected)
    rows = Dataset.from_dict({"input_ids": [list(range(40)), list(range(40, 80))]})
    blocks = prepare_train_blocks(rows, None, 16)
    torch.testing.assert_close(blocks.blocks, torch.arange(80)[:80].view(5, 16))  # rows concatenated, re-chunked
    assert set(blocks[0]) == {"input_ids", "labels"}
    with pytest.raises(ValueError, match="fewer than one block"):
        prepare_train_blocks(torch.arange(10), None, 32)


def test_default_targets_and_training_arguments(tmp_path):
    model = tiny_llama()
    assert lora_target_modules(model, LLAMA_SPEC) == list(LLAMA_SPEC.lora_target_modules)
    with pytest.raises(ValueError, match="LoRA targets"):
        lora_target_modules(torch.nn.Sequential(torch.nn.ReLU()), LLAMA_SPEC)
    args = build_training_arguments({"max_steps": 3}, output_dir=str(tmp_path))
    assert (args.max_steps, args.learning_rate, args.per_device_train_batch_size) == (
        3,
        DEFAULT_TRAINING_ARGS["learning_rate"],
        DEFAULT_TRAINING_ARGS["per_device_train_batch_size"],
    )
    own = TrainingArguments(output_dir=str(tmp_path), max_steps=2)
    assert build_training_arguments(own) is own
    with pytest.raises(TypeError, match="TrainingArguments or a dict"):
        build_training_arguments(["max_steps", 3])


# ---------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    pruner = AutoPruner.from_model(
        tiny_llama(hidden_size=64), PrunerConfig(pruning_ratio=0.3, importance="magnitude"), tokenizer=_tokenizer()
    )
    pruner.prune()
    pruner.save_pretrained(root / "pruned")
    (root / "train.txt").write_text(" ".join(WORDS[(i * 3) % 7] for i in range(3000)))
    return root / "pruned"


def _env():
    # The subprocess must import this checkout's package (and its optimum-cli registration), whatever the cwd.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}


def _cli(name):
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name) or name


RECOVER_ARGS = ["--max-steps", "3", "--batch-size", "2", "--block-size", "16", "--eval-seq-len", "32"]
RECOVER_ARGS += ["--eval-windows", "4", "--logging-steps", "1"]


def _check_recovered(out, source):
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "pruned_llama"
    assert not [n for n, _ in model.named_modules() if "lora" in n.lower()]
    original = AutoModelForCausalLM.from_pretrained(source)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in original.named_parameters()}
    results = json.loads((out / "pruning_results.json").read_text())
    assert results["recovery"]["max_steps"] == 3 and results["evaluation"]["perplexity_recovered"] > 0
    assert (out / "tokenizer.json").exists() and (out / "pruning_plan.json").exists()
    assert "LoRA r=8" in (out / "README.md").read_text()


def test_recover_command(pruned_dir, tmp_path):
    out = tmp_path / "out"
    train = str(pruned_dir.parent / "train.txt")
    cmd = [_cli("optimum-prune"), "recover", "--model", str(pruned_dir), "--train", train, "--eval", train]
    result = subprocess.run([*cmd, *RECOVER_ARGS, "--output", str(out)], capture_output=True, text=True, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity_recovered" in result.stdout
    _check_recovered(out, pruned_dir)


def test_recover_command_refuses_unpruned_checkpoint(tmp_path, capsys):
    from optimum_prune.commands.cli import main

    tiny_llama().save_pretrained(tmp_path / "plain")
    (tmp_path / "t.txt").write_text("w1 w2")
    args = ["recover", "--model", str(tmp_path / "plain"), "--train", str(tmp_path / "t.txt")]
    assert main([*args, "--output", str(tmp_path / "o")]) == 2
    assert "not a pruned checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--output", str(tmp_path / "o"), "--max-steps", "0"]) == 2
    assert "`--max-steps` must be a positive integer" in capsys.readouterr().err


def test_optimum_cli_recover_is_registered():
    """`optimum-cli recover` exists (one interpreter: `optimum-cli prune` runs in tests/test_cli.py)."""
    sub = subprocess.run([_cli("optimum-cli"), "recover", "--help"], capture_output=True, text=True, env=_env())
    if "conflicting subparser" in sub.stderr:
        # A git worktree beside an editable install of the same package puts `optimum/commands/register` on the
        # path twice and Optimum loads each register file twice; that is the development setup, not the package.
        pytest.skip("optimum.commands.register is on the path twice (worktree beside an editable install)")
    assert sub.returncode == 0, sub.stderr[-2000:]
    assert "--max-steps" in sub.stdout and "--train" in sub.stdout


@pytest.mark.slow
def test_recover_with_accelerate_two_cpu_processes(pruned_dir, tmp_path):
    """DDP over two CPU processes with gloo, as documented in README:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m optimum_prune.commands.cli recover ...

    (`accelerate launch --cpu --num_processes 2` starts one process unless MPI is installed and `--mpirun_hostfile`
    is given; the torchrun-based launcher with `ACCELERATE_USE_CPU` needs nothing but torch.)
    """
    out = tmp_path / "out"
    train = str(pruned_dir.parent / "train.txt")
    cmd = [_cli("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    cmd += ["-m", "optimum_prune.commands.cli", "recover", "--model", str(pruned_dir), "--train", train]
    cmd += ["--eval", train, *RECOVER_ARGS, "--output", str(out)]
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Saved to") == 1, "only the main process writes"
    recovery = json.loads((out / "pruning_results.json").read_text())["recovery"]
    assert (recovery["world_size"], recovery["distributed_backend"]) == (2, "gloo")
    assert recovery["batch_size"] == 2 * 2  # per device x processes
    _check_recovered(out, pruned_dir)
