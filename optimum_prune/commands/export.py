"""`export` subcommand: `optimum-prune export gguf` (and `optimum-cli export gguf`), a checkpoint as one GGUF file for
llama.cpp. Nothing heavy is imported at module level, so `--help` stays fast."""

from __future__ import annotations

import argparse


OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # optimum_prune.export.gguf.OUTTYPES, without importing numpy for --help


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """`export <format>`: one sub-parser per format (GGUF only for now)."""
    formats = parser.add_subparsers(dest="format", required=True)
    add_gguf_args(formats.add_parser("gguf", help="One GGUF file for llama.cpp (per-layer widths included)."))


def add_gguf_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `export gguf` (the same for both command-line entry points)."""
    parser.add_argument(
        "--model",
        required=True,
        help="A checkpoint directory: LLaMA/Mistral/Qwen2 (per-layer widths included), or uniform Qwen3, Phi-3, GLM, "
        "GLM-4 or BLOOM.",
    )
    parser.add_argument("--output", required=True, help="The .gguf file to write.")
    parser.add_argument(
        "--outtype",
        default="f32",
        choices=OUTTYPES,
        help="Matrix type: f32 (exact), f16, bf16 or q8_0; norms stay f32.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    parser.set_defaults(func=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> int:
    from ..export import export_gguf

    path = export_gguf(args.model, args.output, outtype=args.outtype, overwrite=args.overwrite)
    print(path)
    return 0
