"""The `optimum-prune` console entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from .evaluate import add_eval_args, run_eval
from .export import add_export_args
from .prune import add_prune_args, run_prune
from .recover import add_recover_args, run_recover


class _Parser(argparse.ArgumentParser):
    """Reports a bad option in the one line every other input error gets (subcommand parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"optimum-prune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser("optimum-prune", description="Structured pruning for Hugging Face causal LMs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    prune = subparsers.add_parser("prune", help="Prune a model and save an ordinary checkpoint.")
    add_prune_args(prune)
    prune.set_defaults(func=run_prune)
    recover = subparsers.add_parser(
        "recover", help="Recovery training of a pruned checkpoint (LoRA or full; LM loss or distillation)."
    )
    add_recover_args(recover)
    recover.set_defaults(func=run_recover)
    evaluate = subparsers.add_parser("eval", help="lm-eval tasks and perplexity of a checkpoint (pruned or not).")
    add_eval_args(evaluate)
    evaluate.set_defaults(func=run_eval)
    export = subparsers.add_parser("export", help="Export a checkpoint for another runtime (gguf: llama.cpp).")
    add_export_args(export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _input_errors() as err:
        message = " ".join(str(err).split())  # one line, also for Transformers' multi-line OSErrors
        print(f"optimum-prune: error: {message}", file=sys.stderr)
        return 2


def _input_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises: our `PruneInputError` (a ValueError) and other ValueErrors, OSErrors (missing or
    unreadable files; Transformers' "does not appear to have a file named config.json"), safetensors' errors for
    corrupt files and a missing optional extra. Genuine bugs (AttributeError, RuntimeError, ...) keep their
    traceback."""
    from safetensors import SafetensorError

    return (ValueError, OSError, TypeError, ModuleNotFoundError, SafetensorError)


if __name__ == "__main__":
    sys.exit(main())
