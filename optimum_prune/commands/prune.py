"""`prune` subcommand: run, shared by `optimum-prune prune` and `optimum-cli prune`; its options are `cli_args.py`'s.

The engines are imported when the command runs, so `optimum-cli --help` does not wait for them.
"""

from __future__ import annotations

import argparse

from ..cli_args import (
    ALLOCATION_ARGS,
    ALWAYS_WRITTEN,
    DEFAULTS,
    DEVICE_MAP_STRATEGIES,
    NOT_CLI_FIELDS,
    add_allow_pickle_arg,
    add_prune_args,
    build_pruner_config,
    config_to_args,
)


def run_prune(args: argparse.Namespace) -> int:
    """Prune as `args` say (`engines.prune_checkpoint`), and print a before/after table. Returns the exit code."""
    import torch

    from ..engines import DISPATCHED, prune_checkpoint
    from ..evaluation import summary_table
    from ..streaming import format_dry_run

    result = prune_checkpoint(
        args.model,
        build_pruner_config(args),
        args.output,
        args.calibration,
        eval_data=args.eval,
        eval_seq_len=args.eval_seq_len,
        eval_windows=args.eval_windows,
        dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype),
        device=args.device,
        device_map=args.device_map,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        streaming_asked=args.streaming,
        plan=args.plan,
        dry_run=args.dry_run,
        max_shard_size=args.max_shard_size,
        offload_hidden_states=args.offload_hidden_states,
    )
    if "streaming" in result and result["engine"] != DISPATCHED:
        print(format_dry_run(result["streaming"]))
        if not args.dry_run:
            print(f"Saved to {args.output}.")
        return 0
    print(summary_table(result["before"], result["after"]))
    if result["engine"] == DISPATCHED and "streaming" in result:
        print(f"Saved to {args.output} (written layer by layer from the checkpoint's shards).")
    else:
        print(f"Saved to {args.output} ({result['model_type']}).")
    return 0


__all__ = [
    "ALLOCATION_ARGS",
    "ALWAYS_WRITTEN",
    "DEFAULTS",
    "DEVICE_MAP_STRATEGIES",
    "NOT_CLI_FIELDS",
    "add_allow_pickle_arg",
    "add_prune_args",
    "build_pruner_config",
    "config_to_args",
    "run_prune",
]
