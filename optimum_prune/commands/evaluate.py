"""`eval` subcommand: lm-eval tasks and perplexity on local text, shared by `optimum-prune eval` and
`optimum-cli eval`.

Nothing heavy is imported at module level (lm-eval alone takes seconds), so `optimum-cli --help` stays fast.
"""

from __future__ import annotations

import argparse

from .prune import add_allow_pickle_arg


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eval` (the same for both command-line entry points); defaults = `evaluate_tasks`'s."""
    parser.add_argument("--model", required=True, help="A checkpoint directory (pruned or not) or Hub id.")
    parser.add_argument(
        "--tasks",
        default=None,
        help="Comma-separated lm-eval task, group or tag names (e.g. arc_easy,piqa,hellaswag). Needs the `eval` "
        "extra. Optional when --ppl-data is given.",
    )
    parser.add_argument(
        "--include-path",
        action="append",
        default=None,
        help="Directory of lm-eval task YAML files (local tasks); repeatable.",
    )
    parser.add_argument("--num-fewshot", type=int, default=0, help="In-context examples per question.")
    parser.add_argument(
        "--limit", type=float, default=None, help="Examples per task (a fraction when below 1); default: all."
    )
    parser.add_argument("--batch-size", default="8", help="Batch size for lm-eval (an integer or `auto`).")
    parser.add_argument("--ppl-data", nargs="+", default=None, help="Text files to measure perplexity on.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per perplexity window.")
    parser.add_argument("--max-windows", type=int, default=64, help="Perplexity windows per file (0: all).")
    parser.add_argument("--output", default=None, help="Write the results as JSON to this file.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1. Default: cuda when available.")
    parser.add_argument("--trust-remote-code", action="store_true")
    add_allow_pickle_arg(parser)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate as `args` say, print a table (task, metric, value, stderr) and perplexities. Returns the exit code."""
    import json
    import os

    if not args.tasks and not args.ppl_data:
        raise ValueError(
            "Nothing to evaluate: give `--tasks` (lm-eval task names), `--ppl-data` (text files) or both."
        )
    if args.num_fewshot < 0 or args.max_windows < 0 or args.seq_len < 2:
        raise ValueError(
            "`--num-fewshot` and `--max-windows` must be >= 0 and `--seq-len` >= 2, got "
            f"{args.num_fewshot}, {args.max_windows} and {args.seq_len}."
        )
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    from ..inputs import check_data_file, check_device, check_model_source

    for path in args.ppl_data or []:
        check_data_file(path, "--ppl-data")
    check_device(args.device)
    check_model_source(args.model)

    from ..evaluation import evaluate_tasks, format_table, import_lm_eval, load_for_evaluation, perplexity

    if args.tasks:
        import_lm_eval()  # fail on a missing extra before loading the model
    model, tokenizer = load_for_evaluation(
        args.model,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    results = {"model": args.model}
    if args.tasks:
        results["tasks"] = evaluate_tasks(
            model,
            args.tasks,
            tokenizer=tokenizer,
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            limit=limit,
            batch_size=batch_size,
        )
        results["config"] = {"num_fewshot": args.num_fewshot, "limit": limit}
    if args.ppl_data:
        results["perplexity"] = {
            path: perplexity(model, path, tokenizer, seq_len=args.seq_len, max_windows=args.max_windows or None)
            for path in args.ppl_data
        }
        results["perplexity_config"] = {"seq_len": args.seq_len, "max_windows": args.max_windows or None}
    if "tasks" in results:
        rows = [
            [task, metric, f"{m['value']:.4f}", "" if m["stderr"] is None else f"{m['stderr']:.4f}"]
            for task, metrics in results["tasks"].items()
            for metric, m in metrics.items()
        ]
        print(format_table(["task", "metric", "value", "stderr"], rows))
    for path, value in results.get("perplexity", {}).items():
        print(f"perplexity {path}: {value:.4f} ({args.seq_len}-token windows)")
    if args.output:
        directory = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(directory, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        print(f"Saved to {args.output}.")
    return 0
