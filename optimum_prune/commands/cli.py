"""The `optimum-prune` console entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from .evaluate import add_eval_args, run_eval
from .prune import add_prune_args, run_prune
from .recover import add_recover_args, run_recover


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("optimum-prune", description="Structured pruning for Hugging Face causal LMs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    prune = subparsers.add_parser("prune", help="Prune a model and save an ordinary checkpoint.")
    add_prune_args(prune)
    prune.set_defaults(func=run_prune)
    recover = subparsers.add_parser("recover", help="LoRA recovery of a pruned checkpoint, merged into its weights.")
    add_recover_args(recover)
    recover.set_defaults(func=run_recover)
    evaluate = subparsers.add_parser("eval", help="lm-eval tasks and perplexity of a checkpoint (pruned or not).")
    add_eval_args(evaluate)
    evaluate.set_defaults(func=run_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, ModuleNotFoundError) as err:
        print(f"optimum-prune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
