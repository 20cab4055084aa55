"""FLAP benchmark: perplexity ratio after pruning tiny-llama with the `flap` criterion, uniform or adaptive (AL-AM)
allocation, with and without bias compensation.

    python benchmarks/flap.py                       # 20%, 40% and 50%, every variant
    python benchmarks/flap.py --ratios 0.4 --variants flap_floor+bias

Prints a Markdown table and appends JSON lines to `benchmarks/results/flap.jsonl`. FLAP's own code, on a multi-head
variant of this model (BENCHMARKS.md): x1.055 at 20% and x2.07 at 40% adaptive, x1.078 / x1.37 uniform.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "tiny-llama"
CALIBRATION = SHARED / "data" / "corpus" / "calibration.txt"
EVAL = SHARED / "data" / "corpus" / "eval.txt"

# Variant name -> PrunerConfig keyword arguments (added to importance="flap" and pruning_ratio).
VARIANTS: dict[str, dict] = {
    "uniform": {"bias_compensation": False},
    "uniform+bias": {"bias_compensation": True},
    "flap": {"allocation": "flap", "bias_compensation": False},
    "flap+bias": {"allocation": "flap", "bias_compensation": True},
    # A per-layer floor: at least half of the query heads and a quarter of the MLP channels in every layer.
    "flap_floor": {"allocation": "flap", "bias_compensation": False, "min_heads": 4, "min_channels": 176},
    "flap_floor+bias": {"allocation": "flap", "bias_compensation": True, "min_heads": 4, "min_channels": 176},
    # Only the head floor (half of the query heads): reaches 50% on this model, where the channel floor above cannot.
    "flap_head_floor": {"allocation": "flap", "bias_compensation": False, "min_heads": 4},
    "flap_head_floor+bias": {"allocation": "flap", "bias_compensation": True, "min_heads": 4},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--calibration-seq-len", type=int, default=128)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "flap.jsonl"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune import AutoPruner, PrunerConfig, count_parameters, perplexity
    from optimum_prune.evaluation import format_table

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    base_ppl = perplexity(base, str(EVAL), tokenizer, seq_len=256, max_windows=64)
    heads_before = base.config.num_hidden_layers * base.config.num_attention_heads
    rows, records = [], []
    for ratio in args.ratios:
        for variant in args.variants:
            start = time.perf_counter()
            record = {"ratio": ratio, "variant": variant, "base_ppl": base_ppl}
            try:
                config = PrunerConfig(
                    pruning_ratio=ratio,
                    importance="flap",
                    reconstruction=False,
                    num_calibration_samples=args.calibration_samples,
                    calibration_seq_len=args.calibration_seq_len,
                    **VARIANTS[variant],
                )
                pruner = AutoPruner.from_pretrained(str(MODEL), pruner_config=config, dtype=torch.float32)
                model = pruner.prune(calibration_data=str(CALIBRATION))
                heads = [layer.self_attn.q_proj.out_features // model.config.head_dim for layer in model.model.layers]
                channels = [layer.mlp.down_proj.in_features for layer in model.model.layers]
                record.update(
                    removed=1 - count_parameters(model) / pruner.params_before,
                    ppl=perplexity(model, str(EVAL), tokenizer, seq_len=256, max_windows=64),
                    heads=heads,
                    channels=channels,
                )
                record["ppl_ratio"] = record["ppl"] / base_ppl
                cells = [
                    f"{record['removed']:.1%}",
                    f"{sum(heads)}/{heads_before} {heads}",
                    str(channels),
                    f"{record['ppl']:.2f}",
                    f"x{record['ppl_ratio']:.3f}",
                ]
            except ValueError as err:  # an unreachable target is a result too
                record["error"] = str(err)
                cells = ["-", "-", "-", "-", "unreachable: " + str(err).split(":")[0][:60]]
            record["seconds"] = time.perf_counter() - start
            records.append(record)
            rows.append([f"{ratio:.0%}", variant, *cells])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"\ntiny-llama, unpruned perplexity {base_ppl:.2f} (eval.txt, 64 windows x 256 tokens)\n")
    print(format_table(["target", "variant", "removed", "heads", "MLP channels", "perplexity", "ratio"], rows))


if __name__ == "__main__":
    main()
