"""Allocation benchmark: perplexity ratio after pruning tiny-llama with each allocation mode and criterion.

    python benchmarks/nonuniform.py                          # 20% and 50%, magnitude and taylor, every mode
    python benchmarks/nonuniform.py --ratios 0.4 --importances taylor --modes ranges global_raw

Runs in one process (the models are small); prints a Markdown table and writes JSON lines to
`benchmarks/results/nonuniform.jsonl`.
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

# Mode name -> PrunerConfig keyword arguments (added to importance and pruning_ratio).
# What the modes below leave unset is pinned, so that "uniform" stays uniform and nothing is reconstructed.
PINNED = {"reconstruction": False}
MODES: dict[str, dict] = {
    "uniform": {"global_ranking": False},
    "ranges": {"attention_layers": (1, 5), "mlp_layers": (1, 5)},  # LLM-Pruner: spare the first and last layers
    "global_mean": {"global_ranking": True},
    "global_raw": {"global_ranking": True, "global_normalization": "none"},
    "ranges_global_raw": {
        "attention_layers": (1, 5),
        "mlp_layers": (1, 5),
        "global_ranking": True,
        "global_normalization": "none",
    },
    "layers": {"structures": ["layers"]},
    "layers+width": {"structures": ["layers", "attention_heads", "mlp_channels"]},
    "layers_bi+width": {
        "structures": ["layers", "attention_heads", "mlp_channels"],
        "layer_importance": "block_influence",
    },
    "layers_bi+width_global_raw": {
        "structures": ["layers", "attention_heads", "mlp_channels"],
        "layer_importance": "block_influence",
        "global_ranking": True,
        "global_normalization": "none",
    },
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--importances", nargs="+", default=["magnitude", "taylor"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "nonuniform.jsonl"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune import AutoPruner, PrunerConfig, count_parameters, perplexity
    from optimum_prune.evaluation import format_table

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    base_ppl = perplexity(base, str(EVAL), tokenizer, seq_len=256, max_windows=64)
    rows, records = [], []
    for ratio in args.ratios:
        for importance in args.importances:
            for mode in args.modes:
                start = time.perf_counter()
                record = {"ratio": ratio, "importance": importance, "mode": mode, "base_ppl": base_ppl}
                try:
                    config = PrunerConfig(pruning_ratio=ratio, importance=importance, **PINNED, **MODES[mode])
                    pruner = AutoPruner.from_pretrained(str(MODEL), pruner_config=config, dtype=torch.float32)
                    model = pruner.prune(calibration_data=str(CALIBRATION))
                    record.update(
                        removed=1 - count_parameters(model) / pruner.params_before,
                        ppl=perplexity(model, str(EVAL), tokenizer, seq_len=256, max_windows=64),
                        removed_layers=pruner.plan.removed_layers,
                    )
                    record["ppl_ratio"] = record["ppl"] / base_ppl
                    cells = [f"{record['removed']:.1%}", f"{record['ppl']:.2f}", f"x{record['ppl_ratio']:.2f}"]
                except ValueError as err:  # an unreachable target is a result too
                    record["error"] = str(err)
                    cells = ["-", "-", "unreachable: " + str(err).split(":")[0][:60]]
                record["seconds"] = time.perf_counter() - start
                records.append(record)
                rows.append([f"{ratio:.0%}", importance, mode, *cells])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"\ntiny-llama, unpruned perplexity {base_ppl:.2f} (eval.txt, 64 windows x 256 tokens)\n")
    print(format_table(["target", "importance", "allocation", "removed", "perplexity", "ratio"], rows))


if __name__ == "__main__":
    main()
