"""Smoke test of `benchmarks/speed.py`: the whole run on a tiny random LLaMA with very small settings."""

import importlib.util
from pathlib import Path

import pytest


SPEED = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"


@pytest.mark.slow
def test_speed_benchmark_runs(capsys):
    spec = importlib.util.spec_from_file_location("speed_benchmark", SPEED)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    argv = ["--random-llama", "tiny", "--batch", "1", "--seq", "8", "--prompt-len", "4", "--new-tokens", "6"]
    rows = speed.main(argv + ["--repeats", "1", "--warmup", "1", "--threads", "1", "--ratios", "0.5", "--results", ""])

    assert [row["ratio"] for row in rows] == [0.0, 0.5]
    assert rows[1]["params"] < rows[0]["params"]
    assert abs(rows[1]["params_removed"] - 0.5) <= 0.01
    for row in rows:
        assert row["speed"]["prefill"] > 0
        assert isinstance(row["speed"]["decode_eager"], float) and row["speed"]["decode_eager"] > 0
    table = capsys.readouterr().out
    assert "| 50% |" in table and "prefill tok/s" in table and "decode, eager `generate` tok/s" in table
