"""Streaming pruning of 7B, 13B and 70B LLaMA models, on paper: derived from measured per-layer figures.

No 7B+ checkpoint is built. For each target shape the model is built on the meta device (shapes only) and
[`estimate_peak_bytes`] gives the tensors a streaming run holds (one layer, its float32 scoring copies, the
calibration hidden states in and out, one batch's activations). Two factors come from the measured streaming runs of
`benchmarks/scale.py` (read from `benchmarks/results/scale.jsonl`, the largest measured model per criterion):

- memory: peak RSS = runtime + estimate x (measured tensor overhead), where runtime is the measured import-only
  baseline and the overhead is (measured peak - runtime) / estimate on the measured model (allocator slack);
- time: seconds per layer scale with the multiply-adds of one layer over the calibration tokens (the forward that
  the statistics need), so time = layers x (measured seconds per layer) x (layer MACs ratio).

The in-memory columns are the measured in-memory RSS / checkpoint ratio times the checkpoint size (Taylor: the
measured Taylor / magnitude ratio on top), i.e. what loading the whole model would take.

    python benchmarks/scale.py --sizes 3b --modes streaming --criteria wanda_sp bip --samples 16
    python benchmarks/projection.py
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.jsonl"

_LLAMA = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
# Llama-2's published shapes (70B: grouped-query attention with 8 KV heads).
TARGETS: dict[str, dict] = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}  # fmt: skip


def _measured_rows() -> list[dict]:
    if not RESULTS.is_file():
        raise SystemExit(f"No measurements in {RESULTS}: run benchmarks/scale.py first (see this file's docstring).")
    with open(RESULTS, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _skeleton(shape: dict):
    import torch
    from transformers import LlamaConfig

    from optimum_prune.streaming import build_skeleton

    return build_skeleton(LlamaConfig(**_LLAMA, **shape), torch.bfloat16)


def _layer_macs(model, tokens: int) -> int:
    """Multiply-adds of one decoder layer's Linears over `tokens` tokens (attention scores are small beside them at
    128-token windows)."""
    from torch import nn

    layer = model.model.layers[0]
    return tokens * sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))


def _estimate(model, samples: int, seq_len: int, needs_data: bool = True) -> dict:
    from optimum_prune import PrunerConfig
    from optimum_prune.architectures.base import get_architecture
    from optimum_prune.streaming import estimate_peak_bytes

    config = PrunerConfig(pruning_ratio=0.2, num_calibration_samples=samples, calibration_seq_len=seq_len)
    return estimate_peak_bytes(model, get_architecture("llama"), config, needs_data)


def _checkpoint_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def project(measured: dict, measured_shape: dict, target_shape: dict, runtime_gib: float, baseline_s: float) -> dict:
    """Expected streaming peak RSS (GiB) and wall time (s) of `target_shape`, scaled from one measured streaming run
    (a `scale.jsonl` row) of `measured_shape` with the same calibration size."""
    samples, seq_len = measured["samples"], measured["seq_len"]
    ref_model = _skeleton(measured_shape)
    ref_estimate = _estimate(ref_model, samples, seq_len)
    overhead = (measured["peak_rss_gib"] - runtime_gib) * 2**30 / ref_estimate["peak"]
    seconds_per_mac = (
        (measured["wall_s"] - baseline_s)
        / ref_model.config.num_hidden_layers
        / _layer_macs(ref_model, samples * seq_len)
    )
    model = _skeleton(target_shape)
    estimate = _estimate(model, samples, seq_len)
    layers = model.config.num_hidden_layers
    return {
        "checkpoint_gib": _checkpoint_bytes(model) / 2**30,
        "layer_gib": estimate["layer_bytes"] / 2**30,
        "estimate_gib": estimate["peak"] / 2**30,
        "peak_rss_gib": runtime_gib + overhead * estimate["peak"] / 2**30,
        "wall_s": baseline_s + layers * seconds_per_mac * _layer_macs(model, samples * seq_len),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criteria", nargs="+", default=["wanda_sp", "bip"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from scale import SIZES  # benchmarks/scale.py: the measured shapes

    rows = _measured_rows()
    baselines = [r for r in rows if r["mode"] == "baseline"]
    runtime_gib = baselines[-1]["peak_rss_gib"]
    baseline_s = baselines[-1]["wall_s"]
    in_memory = [r for r in rows if r["mode"] == "in-memory" and r.get("checkpoint_gib")]
    # The largest measured in-memory run: its RSS / checkpoint ratio (data-driven criteria).
    in_memory_ratio = None
    if in_memory:
        largest = max(in_memory, key=lambda r: r["checkpoint_gib"])
        in_memory_ratio = largest["peak_rss_gib"] / largest["checkpoint_gib"]
    taylor = {r["size"]: r for r in in_memory if r["criterion"] == "taylor"}
    magnitude = {r["size"]: r for r in in_memory if r["criterion"] == "magnitude"}
    common = sorted(set(taylor) & set(magnitude))
    taylor_factor = taylor[common[0]]["peak_rss_gib"] / magnitude[common[0]]["peak_rss_gib"] if common else None

    print(
        "| model | checkpoint (bf16) | criterion | largest layer | est. tensors | expected streaming peak RSS | "
        "expected time (2 CPU threads) | in memory, data criteria | in memory, Taylor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for criterion in args.criteria:
        measured = [r for r in rows if r["mode"] == "streaming" and r["criterion"] == criterion and r["size"] in SIZES]
        if not measured:
            logging.warning("No streaming measurement of %s; skipped.", criterion)
            continue
        ref = max(measured, key=lambda r: r["checkpoint_gib"])
        samples, seq_len = ref["samples"], ref["seq_len"]
        own = project(ref, SIZES[ref["size"]], SIZES[ref["size"]], runtime_gib, baseline_s)
        print(
            f"| measured: {ref['size']} | {ref['checkpoint_gib']:.1f} GiB | {criterion} | {own['layer_gib']:.2f} GiB | "
            f"{own['estimate_gib']:.2f} GiB | {ref['peak_rss_gib']:.2f} GiB (measured) | "
            f"{ref['wall_s'] / 60:.1f} min (measured) | | |"
        )
        for name, shape in TARGETS.items():
            row = project(ref, SIZES[ref["size"]], shape, runtime_gib, baseline_s)
            memory = f"{in_memory_ratio * row['checkpoint_gib']:.0f} GiB" if in_memory_ratio else "-"
            taylor_gib = f"{in_memory_ratio * taylor_factor * row['checkpoint_gib']:.0f} GiB" if taylor_factor else "-"
            print(
                f"| {name} | {row['checkpoint_gib']:.1f} GiB | {criterion} | {row['layer_gib']:.2f} GiB | "
                f"{row['estimate_gib']:.2f} GiB | {row['peak_rss_gib']:.2f} GiB | {row['wall_s'] / 60:.0f} min | "
                f"{memory} | {taylor_gib} |"
            )
    print(
        f"\nCalibration: {samples} x {seq_len} tokens. Runtime (imports) {runtime_gib:.2f} GiB; tensor overhead "
        f"factor from the measured run; in-memory ratio {in_memory_ratio or float('nan'):.2f} x checkpoint"
        + (f", Taylor x{taylor_factor:.2f} over magnitude." if taylor_factor else ".")
    )


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
