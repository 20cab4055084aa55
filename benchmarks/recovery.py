"""Recovery benchmark: LoRA on the LM loss vs distillation from the unpruned model, at equal steps and tokens.

Prunes tiny-llama once (uniform allocation, `taylor` by default, 40% of total parameters), saves it, then recovers a
fresh copy of that checkpoint with each variant: LoRA r=8 on every projection, 60 steps of 8 x 256 tokens from
`train.txt`, lr 1e-3 (the defaults of `recovery.py`); only the loss differs. Perplexity on `eval.txt` (64 windows of
256 tokens) as a ratio to the unpruned model.

    python benchmarks/recovery.py                         # every variant, 40%
    python benchmarks/recovery.py --variants lm distill --steps 20
    python benchmarks/recovery.py --importance wanda_sp --reconstruction --variants lm distill   # uniform + refit
    python benchmarks/recovery.py --start default --variants lm distill lm-full distill-full     # from the default

Prints a Markdown table and appends JSON lines to `benchmarks/results/recovery.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import METHODS, method_kwargs  # noqa: E402


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "tiny-llama"
CALIBRATION = SHARED / "data" / "corpus" / "calibration.txt"
TRAIN = SHARED / "data" / "corpus" / "train.txt"
EVAL = SHARED / "data" / "corpus" / "eval.txt"

# Variant name -> `Pruner.recover` keyword arguments (beside the shared training arguments).
VARIANTS: dict[str, dict] = {
    "lm": {"method": "lm"},
    "distill": {"method": "distill", "distillation": {"temperature": 1.0}},
    "distill-T2": {"method": "distill", "distillation": {"temperature": 2.0}},
    "distill+lm": {"method": "distill", "distillation": {"temperature": 1.0, "lm_weight": 1.0}},
    "distill+hidden": {"method": "distill", "distillation": {"temperature": 1.0, "hidden_weight": 1.0}},
    # Every weight instead of LoRA adapters, at the learning rate `--full-learning-rate`.
    "lm-full": {"method": "lm", "full_finetune": True},
    "distill-full": {"method": "distill", "distillation": {"temperature": 1.0}, "full_finetune": True},
}


def prune_once(ratio: float, importance: str, output: Path, reconstruction: bool = False, start=None) -> None:
    """The shared pruned start, written as an ordinary checkpoint (its results file records the base model): uniform
    `importance`, or with `start` a method of `benchmarks/quality.py` (`default`: what `PrunerConfig(ratio)` does)."""
    from optimum_prune import AutoPruner, PrunerConfig

    if start is not None:
        config = PrunerConfig(pruning_ratio=ratio, **method_kwargs(start))
    else:
        config = PrunerConfig(
            pruning_ratio=ratio, importance=importance, global_ranking=False, reconstruction=reconstruction
        )
    pruner = AutoPruner.from_pretrained(str(MODEL), pruner_config=config, dtype=torch.float32)
    pruner.prune(calibration_data=str(CALIBRATION))
    pruner.save_pretrained(output)


def recover_variant(pruned: Path, variant: str, training_args: dict, eval_windows: int) -> dict:
    """Recover a fresh copy of the pruned checkpoint with one variant; the teacher is the recorded base model."""
    from optimum_prune import Pruner

    pruner = Pruner.from_pruned(pruned, dtype=torch.float32)
    start = time.perf_counter()
    report = pruner.recover(
        str(TRAIN), training_args=training_args, eval_data=str(EVAL), eval_windows=eval_windows, **VARIANTS[variant]
    )
    return {"variant": variant, "seconds": round(time.perf_counter() - start, 1), **report}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--importance", default="taylor")
    parser.add_argument("--reconstruction", action="store_true", help="refit the pruned start (layer-wise)")
    parser.add_argument("--start", choices=sorted(METHODS), help="prune as this quality.py method instead")
    parser.add_argument("--full-learning-rate", type=float, default=1e-4, help="learning rate of the *-full variants")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "recovery.jsonl"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune import perplexity
    from optimum_prune.evaluation import format_table

    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    base_ppl = perplexity(base, str(EVAL), AutoTokenizer.from_pretrained(MODEL), max_windows=args.eval_windows)
    del base
    training_args = {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "disable_tqdm": True,
    }
    records = []
    with tempfile.TemporaryDirectory(prefix="recovery-benchmark-") as tmp:
        pruned = Path(tmp) / "pruned"
        prune_once(args.ratio, args.importance, pruned, args.reconstruction, args.start)
        for variant in args.variants:
            variant_args = {**training_args, "output_dir": f"{tmp}/{variant}"}
            if VARIANTS[variant].get("full_finetune"):
                variant_args["learning_rate"] = args.full_learning_rate
            record = recover_variant(pruned, variant, variant_args, args.eval_windows)
            record.update(
                ratio=args.ratio,
                importance=args.importance,
                start=args.start,
                reconstruction=args.reconstruction,
                steps=args.steps,
                base_ppl=base_ppl,
            )
            records.append(record)
            print(json.dumps(record), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    rows = [
        [
            r["variant"],
            f"x{r['perplexity_pruned'] / base_ppl:.3f}",
            f"{r['perplexity_recovered']:.2f}",
            f"x{r['perplexity_recovered'] / base_ppl:.3f}",
            r["seconds"],
        ]
        for r in records
    ]
    print(
        f"\ntiny-llama, {args.start or args.importance + ' uniform'} {args.ratio:.0%}"
        f"{' + reconstruction' * args.reconstruction}; {args.steps} steps of {args.batch_size} x 256 "
        f"tokens; unpruned perplexity {base_ppl:.2f} (eval.txt, {args.eval_windows} windows x 256 tokens)\n"
    )
    print(format_table(["variant", "pruned", "recovered ppl", "recovered vs unpruned", "seconds"], rows))
    return records


if __name__ == "__main__":
    main()
