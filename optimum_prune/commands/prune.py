"""`prune` subcommand: arguments and run, shared by `optimum-prune prune` and `optimum-cli prune`.

Nothing heavy is imported at module level, so `optimum-cli --help` stays fast.
"""

from __future__ import annotations

import argparse
import json


def add_prune_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `prune` (the same for both command-line entry points)."""
    from ..architectures.base import STRUCTURES

    parser.add_argument("--model", required=True, help="Local directory or Hub id of a causal LM.")
    parser.add_argument("--output", required=True, help="Directory to write the pruned checkpoint to.")
    parser.add_argument("--pruning-ratio", type=float, default=0.2, help="Fraction of total parameters to remove.")
    parser.add_argument("--importance", default="taylor", help="Importance criterion (e.g. taylor, magnitude).")
    parser.add_argument(
        "--importance-kwargs", type=json.loads, default={}, help="Criterion variant as JSON, e.g. '{\"p\": 1}'."
    )
    parser.add_argument(
        "--structures",
        nargs="+",
        default=["attention_heads", "mlp_channels"],
        choices=STRUCTURES,
        help="Structures to prune.",
    )
    parser.add_argument("--calibration", default=None, help="Calibration data: a .txt or .jsonl file.")
    parser.add_argument("--num-calibration-samples", type=int, default=32)
    parser.add_argument("--calibration-seq-len", type=int, default=128)
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", default=None, help="Text file for perplexity before and after.")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default=None, help="Device to prune on (cpu, cuda, cuda:1). Default: cpu.")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="Prune layer by layer from the safetensors shards (models larger than memory; layer-local criteria).",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="With --streaming: print planned widths, parameter counts and estimated peak memory; write nothing.",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="With --streaming: output shard size.")


def run_prune(args: argparse.Namespace) -> int:
    """Prune as `args` say, save, and print a before/after table. Returns the exit code."""
    import torch

    from ..auto import AutoPruner
    from ..configuration import PrunerConfig
    from ..evaluation import count_parameters, summary_table

    config = PrunerConfig(
        pruning_ratio=args.pruning_ratio,
        importance=args.importance,
        importance_kwargs=args.importance_kwargs,
        structures=args.structures,
        num_calibration_samples=args.num_calibration_samples,
        calibration_seq_len=args.calibration_seq_len,
        round_to=args.round_to,
        seed=args.seed,
        streaming=args.streaming,
    )
    if args.streaming:
        return _run_streaming(args, config)
    if args.dry_run:
        raise ValueError("`--dry-run` plans a streaming run from the config alone; add `--streaming`.")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    pruner = AutoPruner.from_pretrained(
        args.model, pruner_config=config, dtype=dtype, trust_remote_code=args.trust_remote_code
    )
    if args.device:
        pruner.model.to(args.device)
    before = {"parameters": count_parameters(pruner.model)}
    if args.eval:
        # Recorded on the pruner, so the card's results table and `model-index` carry the measured values.
        before["perplexity"] = pruner.evaluate(args.eval, args.eval_seq_len, args.eval_windows)
    model = pruner.prune(calibration_data=args.calibration)
    after = {"parameters": count_parameters(model)}
    if args.eval:
        after["perplexity"] = pruner.evaluate(args.eval, args.eval_seq_len, args.eval_windows)
    pruner.save_pretrained(args.output)
    print(summary_table(before, after))
    print(f"Saved to {args.output} ({model.config.model_type}).")
    return 0


def _run_streaming(args: argparse.Namespace, config) -> int:
    """`--streaming`: prune from the shards layer by layer (or, with `--dry-run`, only print the plan)."""
    from ..streaming import format_dry_run, prune_streaming

    if args.eval or args.device or args.dtype not in ("float32", "auto"):
        raise ValueError(
            "`--streaming` keeps the checkpoint's dtype, runs on the CPU and does not evaluate; drop --eval, --device "
            "and --dtype."
        )
    report = prune_streaming(
        args.model,
        config,
        args.calibration,
        args.output,
        dry_run=args.dry_run,
        max_shard_size=args.max_shard_size,
        trust_remote_code=args.trust_remote_code,
    )
    print(format_dry_run(report))
    if not args.dry_run:
        print(f"Saved to {args.output}.")
    return 0
