"""The CLI through subprocess, `optimum-cli prune` registration included."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import WORDS, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    tiny_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(3000))
    (path.parent / "calib.txt").write_text(text)
    return path


def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd)


def _cli(name):
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [shutil.which(name) or name]


@pytest.mark.parametrize("entry", [["optimum-prune", "prune"], ["optimum-cli", "prune"]])
def test_prune_command(model_dir, tmp_path, entry):
    out = tmp_path / "out"
    args = [
        *_cli(entry[0]),
        entry[1],
        "--model",
        str(model_dir),
        "--pruning-ratio",
        "0.3",
        "--importance",
        "taylor",
        "--calibration",
        str(model_dir.parent / "calib.txt"),
        "--eval",
        str(model_dir.parent / "calib.txt"),
        "--num-calibration-samples",
        "4",
        "--calibration-seq-len",
        "32",
        "--eval-seq-len",
        "64",
        "--eval-windows",
        "4",
        "--output",
        str(out),
    ]
    result = _run(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| parameters" in result.stdout and "| perplexity" in result.stdout
    plan = json.loads((out / "pruning_plan.json").read_text())
    assert plan["kept"]
    assert (out / "tokenizer.json").exists()
    assert json.loads((out / "pruner_config.json").read_text())["importance"] == "taylor"


def test_bad_arguments_exit_cleanly(model_dir, tmp_path):
    result = _run(
        [
            *_cli("optimum-prune"),
            "prune",
            "--model",
            str(model_dir),
            "--pruning-ratio",
            "1.5",
            "--output",
            str(tmp_path / "o"),
        ],
        tmp_path,
    )
    assert result.returncode == 2
    assert "must be in [0, 1)" in result.stderr
    assert not (tmp_path / "o").exists()


def test_python_api_matches_cli_defaults():
    from optimum_prune import PrunerConfig
    from optimum_prune.commands.cli import build_parser

    args = build_parser().parse_args(["prune", "--model", "m", "--output", "o"])
    config = PrunerConfig()
    assert args.pruning_ratio == config.pruning_ratio and args.importance == config.importance
    assert args.structures == config.structures and args.num_calibration_samples == config.num_calibration_samples
    assert torch.float32 is getattr(torch, args.dtype)


def test_allocation_flags_and_config_file(tmp_path):
    from optimum_prune import PrunerConfig
    from optimum_prune.commands.cli import build_parser
    from optimum_prune.commands.prune import DEFAULTS, build_pruner_config

    args = build_parser().parse_args(
        [
            "prune",
            "--model",
            "m",
            "--output",
            "o",
            "--attention-layers",
            "1:5",
            "--mlp-layers",
            "1,2,3",
            "--global-ranking",
            "--min-heads",
            "2",
            "--importance",
            "magnitude",
        ]
    )
    config = build_pruner_config(args)
    assert config.attention_layers == [1, 2, 3, 4] and config.mlp_layers == [1, 2, 3]
    assert config.global_ranking and config.min_heads == 2 and config.uniform is False
    # A config file is the starting point; explicit options override it, parser defaults do not.
    PrunerConfig(pruning_ratio=0.4, importance="magnitude", round_to=8).save_pretrained(tmp_path)
    args = build_parser().parse_args(
        ["prune", "--model", "m", "--output", "o", "--config", str(tmp_path), "--seed", "3"]
    )
    config = build_pruner_config(args)
    assert (config.pruning_ratio, config.importance, config.round_to, config.seed) == (0.4, "magnitude", 8, 3)
    fields = PrunerConfig().to_dict()
    assert all(fields[k] == v for k, v in DEFAULTS.items())
