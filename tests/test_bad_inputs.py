"""Bad input gets one line that says what is wrong and what to do: the CLI prints `optimum-prune: error: ...`, exits
with status 2, shows no traceback and writes no output; the Python API raises `PruneInputError` (a ValueError)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from testing_utils import tiny_llama, word_text, word_tokenizer

from optimum_prune import AutoPruner, PrunerConfig, perplexity
from optimum_prune.commands.cli import main
from optimum_prune.errors import PruneInputError
from optimum_prune.streaming import prune_streaming


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaMA checkpoint (3 layers, 128 positions) with its tokenizer, and calib.txt beside it."""
    path = tmp_path_factory.mktemp("bad-inputs") / "tiny"
    tiny_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    (path.parent / "calib.txt").write_text(word_text())
    return path


def edited_copy(model_dir, tmp_path, **changes) -> Path:
    """A copy of the checkpoint whose config.json has `changes` (a value of None removes the field)."""
    path = tmp_path / "edited"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (path / "config.json").write_text(json.dumps(config))
    return path


def run_cli(capsys, *args) -> tuple[int, str]:
    """`optimum-prune ARGS` in this process: (exit code, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err


def assert_refused(code: int, stderr: str, *words: str, output: Path | None = None) -> None:
    """Exit code 2, one `optimum-prune: error:` line holding `words`, no traceback, no output written."""
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("optimum-prune: error:")]
    assert len(errors) == 1, stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    assert output is None or not output.exists()


def prune_cli(capsys, model, tmp_path, *extra):
    output = tmp_path / "out"
    code, stderr = run_cli(capsys, "prune", "--model", model, "--importance", "magnitude", "--output", output, *extra)
    return code, stderr, output


# --- the model path ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["./no-such-model", "no/such/model", "~/no-such-model"])
def test_cli_missing_local_model_path(capsys, tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    code, stderr, output = prune_cli(capsys, missing, tmp_path)
    assert_refused(code, stderr, "no such directory", repr(missing), output=output)


def test_api_missing_local_model_path(tmp_path):
    with pytest.raises(PruneInputError, match="no such directory"):
        AutoPruner.from_pretrained(str(tmp_path / "missing" / "model"))


def test_cli_hub_id_offline_and_not_cached(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, stderr, output = prune_cli(capsys, "someone-unknown/not-cached-model", tmp_path)
    assert_refused(code, stderr, "not in the Hugging Face cache", "offline mode is on", output=output)


def test_cli_folder_without_weights_is_one_line(capsys, model_dir, tmp_path):
    """Transformers' own OSError ("no file named model.safetensors ... found") is reported, not raised."""
    path = tmp_path / "config-only"
    path.mkdir()
    shutil.copy(model_dir / "config.json", path)
    code, stderr, output = prune_cli(capsys, path, tmp_path)
    assert_refused(code, stderr, "no file named", str(path), output=output)


# --- config.json and weights --------------------------------------------------------------------------------------


def test_cli_config_json_not_json(capsys, model_dir, tmp_path):
    path = edited_copy(model_dir, tmp_path)
    (path / "config.json").write_text('{"model_type": "llama",')
    code, stderr, output = prune_cli(capsys, path, tmp_path)
    assert_refused(code, stderr, "config.json is not valid JSON", output=output)


@pytest.mark.parametrize(
    "changes, words",
    [
        (
            {"num_attention_heads": 8, "num_key_value_heads": 3},
            ["`num_attention_heads` (8)", "`num_key_value_heads` (3)"],
        ),
        ({"hidden_size": 50, "head_dim": None}, ["`hidden_size` (50)", "divisible", "head_dim"]),
    ],
    ids=["kv-heads", "hidden-size"],
)
def test_cli_inconsistent_config(capsys, model_dir, tmp_path, changes, words):
    code, stderr, output = prune_cli(capsys, edited_copy(model_dir, tmp_path, **changes), tmp_path)
    assert_refused(code, stderr, "config.json", *words, output=output)


def test_api_inconsistent_config(model_dir, tmp_path):
    with pytest.raises(PruneInputError, match="must be a multiple of `num_key_value_heads`"):
        AutoPruner.from_pretrained(str(edited_copy(model_dir, tmp_path, num_key_value_heads=3)))


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_cli_truncated_safetensors(capsys, model_dir, tmp_path, streaming):
    path = edited_copy(model_dir, tmp_path)
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    code, stderr, output = prune_cli(capsys, path, tmp_path, *(["--streaming"] if streaming else []))
    assert_refused(code, stderr, str(weights), "truncated or corrupt", output=output)


@pytest.mark.parametrize(
    "layers, words", [(2, ["it does not describe", "model.layers.2."]), (4, ["missing", "model.layers.3."])]
)
def test_cli_layer_count_differs_from_weights(model_dir, tmp_path, layers, words):
    """A config.json with fewer layers than the weights would drop a layer; with more, one would be random. Through
    the real entry point, so that Transformers' own load report (which calls the mismatch ignorable) is checked too."""
    path = edited_copy(model_dir, tmp_path, num_hidden_layers=layers)
    output = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = ["prune", "--model", path, "--importance", "magnitude", "--output", output]
    result = subprocess.run(
        [sys.executable, "-m", "optimum_prune.commands.cli", *map(str, args)], capture_output=True, text=True, env=env
    )
    assert_refused(result.returncode, result.stderr, "do not match its config.json", *words, output=output)
    assert "LOAD REPORT" not in result.stderr and "can be ignored" not in result.stderr


def test_api_layer_count_differs_from_weights(model_dir, tmp_path):
    with pytest.raises(PruneInputError, match="num_hidden_layers"):
        AutoPruner.from_pretrained(str(edited_copy(model_dir, tmp_path, num_hidden_layers=2)))


def test_cli_unknown_architecture_streaming(capsys, model_dir, tmp_path):
    path = edited_copy(model_dir, tmp_path, model_type="gpt2")
    code, stderr, output = prune_cli(capsys, path, tmp_path, "--streaming")
    assert_refused(code, stderr, "no architecture spec for model_type 'gpt2'", "'llama'", output=output)


def test_api_unknown_architecture_streaming(model_dir, tmp_path):
    path = edited_copy(model_dir, tmp_path, model_type="gpt2")
    with pytest.raises(ValueError, match=r"no architecture spec.*Supported: \[.*'llama'"):
        prune_streaming(path, PrunerConfig(importance="magnitude", streaming=True), output_dir=tmp_path / "out")


# --- options --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_cli_cuda_device_without_cuda(capsys, model_dir, tmp_path, command):
    output = tmp_path / "out"
    if command == "prune":
        args = ["prune", "--model", model_dir, "--importance", "magnitude", "--output", output]
    else:
        args = ["eval", "--model", model_dir, "--ppl-data", model_dir.parent / "calib.txt", "--output", output]
    code, stderr = run_cli(capsys, *args, "--device", "cuda")
    assert_refused(code, stderr, "'cuda'", "CUDA is not available", output=output)


def test_cli_calibration_seq_len_beyond_positions(capsys, model_dir, tmp_path):
    calibration = model_dir.parent / "calib.txt"
    code, stderr, output = prune_cli(
        capsys, model_dir, tmp_path, "--calibration", calibration, "--calibration-seq-len", "512"
    )
    assert_refused(code, stderr, "512", "128 positions", "max_position_embeddings", output=output)


def test_api_calibration_seq_len_beyond_positions(model_dir):
    config = PrunerConfig(importance="wanda_sp", calibration_seq_len=256, num_calibration_samples=2)
    pruner = AutoPruner.from_pretrained(str(model_dir), pruner_config=config)
    with pytest.raises(PruneInputError, match="exceeds the model's 128 positions"):
        pruner.prune(calibration_data=str(model_dir.parent / "calib.txt"))
    assert not pruner.is_pruned


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--importance-kwargs", "{p: 1}", ["--importance-kwargs", "JSON object"]),
        ("--importance-kwargs", "[1]", ["--importance-kwargs", "JSON object"]),
        ("--layer-ratios", "[0.1, 0.2", ["--layer-ratios", "JSON list"]),
        ("--device-map", "{bad", ["--device-map", "auto"]),
        ("--device-map", "everywhere", ["--device-map", "JSON object"]),
        ("--max-shard-size", "5 gigs", ["--max-shard-size", "5GB"]),
    ],
)
def test_cli_malformed_option(capsys, model_dir, tmp_path, option, value, words):
    extra = ["--streaming"] if option == "--max-shard-size" else []
    code, stderr, output = prune_cli(capsys, model_dir, tmp_path, option, value, *extra)
    assert_refused(code, stderr, *words, output=output)


@pytest.mark.parametrize(
    "content, words", [("importance: magnitude\n", ["not valid JSON"]), ("[1, 2]", ["JSON list", "not an object"])]
)
def test_cli_pruner_config_file_not_a_json_object(capsys, model_dir, tmp_path, content, words):
    config = tmp_path / "pruner_config.json"
    config.write_text(content)
    code, stderr, output = prune_cli(capsys, model_dir, tmp_path, "--config", config)
    assert_refused(code, stderr, str(config), *words, output=output)


def test_round_to_larger_than_any_width(capsys, model_dir, tmp_path):
    code, stderr, output = prune_cli(capsys, model_dir, tmp_path, "--round-to", "1000")
    assert_refused(code, stderr, "`round_to=1000` is larger than any width", "at most 80", output=output)
    with pytest.raises(PruneInputError, match="larger than any width"):
        AutoPruner.from_model(tiny_llama(), PrunerConfig(importance="magnitude", round_to=1000)).prune()


# --- data files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("binary.txt", b"w1 w2\x00\x01\x02 w3", ["binary"]),
        ("latin1.txt", "w1 caf\u00e9 w2".encode("latin-1"), ["not UTF-8"]),
        ("bad.jsonl", b'{"text": "w1 w2"}\n{"text": w3}\n', ["bad.jsonl:2", "not valid JSON"]),
        ("number.jsonl", b'{"text": "w1 w2"}\n\n{"text": 5}\n', ["number.jsonl:3", "must be a string", "int"]),
    ],
    ids=["binary", "not-utf8", "malformed-jsonl", "text-not-string"],
)
def test_cli_bad_calibration_file(capsys, model_dir, tmp_path, name, content, words):
    calibration = tmp_path / name
    calibration.write_bytes(content)
    code, stderr = run_cli(
        capsys, "prune", "--model", model_dir, "--importance", "wanda_sp", "--calibration", calibration,
        "--calibration-seq-len", "8", "--output", tmp_path / "out",
    )  # fmt: skip
    assert_refused(code, stderr, str(calibration), *words, output=tmp_path / "out")


def test_cli_eval_file_missing(capsys, model_dir, tmp_path):
    missing = tmp_path / "missing.txt"
    code, stderr, output = prune_cli(capsys, model_dir, tmp_path, "--eval", missing)
    assert_refused(code, stderr, "--eval file", str(missing), "does not exist", output=output)


@pytest.mark.parametrize("missing", ["missing.txt", "data/eval.jsonl", "data/eval"])
def test_api_eval_path_missing_is_not_text(model_dir, missing):
    with pytest.raises(PruneInputError, match="does not exist"):
        perplexity(tiny_llama(), missing, word_tokenizer(), seq_len=2)


def test_api_eval_text_is_still_text():
    """Text without a file ending or a path separator (or spanning lines) is still measured as text."""
    text = word_text(40)
    assert perplexity(tiny_llama(), text, word_tokenizer(), seq_len=8) > 1
    assert perplexity(tiny_llama(), "w1/w2 and w3 " * 10 + "\nw4", word_tokenizer(), seq_len=8) > 1


# --- recover and eval take the same inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["recover", "eval"])
def test_cli_other_commands_missing_model_path(capsys, tmp_path, command):
    calibration = tmp_path / "train.txt"
    calibration.write_text(word_text())
    output = tmp_path / "out"
    data = ["--train", calibration] if command == "recover" else ["--ppl-data", calibration]
    code, stderr = run_cli(capsys, command, "--model", tmp_path / "missing-model", *data, "--output", output)
    assert_refused(code, stderr, "no such directory", output=output)


def test_cli_recover_train_file_missing(capsys, model_dir, tmp_path):
    output = tmp_path / "out"
    code, stderr = run_cli(
        capsys, "recover", "--model", model_dir, "--train", tmp_path / "nope.txt", "--output", output
    )
    assert_refused(code, stderr, "--train file", "does not exist", output=output)
