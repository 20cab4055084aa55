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


PROJECTION = Path(__file__).resolve().parent.parent / "benchmarks" / "projection.py"


def _load(path, name):
    import sys

    sys.path.insert(0, str(path.parent))  # projection.py imports its sibling scale.py
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_projection_reproduces_the_measured_run_and_grows_with_the_layer():
    projection = _load(PROJECTION, "projection_benchmark")
    small = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4)  # fmt: skip
    measured = {"samples": 4, "seq_len": 32, "peak_rss_gib": 0.5, "wall_s": 12.0}
    own = projection.project(measured, small, small, runtime_gib=0.3, baseline_s=2.0)
    assert own["peak_rss_gib"] == pytest.approx(0.5)
    assert own["wall_s"] == pytest.approx(12.0)

    deeper = projection.project(measured, small, {**small, "num_hidden_layers": 8}, runtime_gib=0.3, baseline_s=2.0)
    assert deeper["peak_rss_gib"] == pytest.approx(0.5, rel=0.05)  # memory follows the layer, not the depth
    assert deeper["wall_s"] - 2.0 == pytest.approx(2 * (12.0 - 2.0))  # time follows the depth
    wider = projection.project(measured, small, {**small, "hidden_size": 512, "intermediate_size": 1408},
                               runtime_gib=0.3, baseline_s=2.0)  # fmt: skip
    assert wider["peak_rss_gib"] > own["peak_rss_gib"] and wider["layer_gib"] == pytest.approx(
        4 * own["layer_gib"], rel=1e-3
    )


def test_scale_rows_name_reconstruction_and_quality_has_the_reconstructed_variants():
    scale = _load(Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py", "scale_benchmark")
    row = {"size": "0.5b", "checkpoint_gib": 1.0, "mode": "streaming, global", "criterion": "wanda_sp",
           "compute_dtype": "auto", "reconstruction": True, "peak_rss_gib": 0.5, "wall_s": 10.0, "cpu_s": 8.0}  # fmt: skip
    assert scale._table_row(row).startswith("| 0.5b | 1.00 | streaming, global | wanda_sp | auto | on | 0.50 |")
    refused = {"size": "0.5b", "mode": "streaming", "criterion": "wanda_sp", "reconstruction": True, "refused": "no"}
    assert "| on | refused: no |" in scale._table_row(refused)

    quality = _load(Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py", "quality_benchmark")
    for name in ("wanda_sp", "taylor-global", "bip-global", "flap-adaptive", "flap-adaptive-nobias"):
        assert quality.METHODS[f"{name}-recon"] == {**quality.METHODS[name], "reconstruction": True}
