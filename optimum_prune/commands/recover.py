"""`recover` subcommand: LoRA (or full) recovery training of a pruned checkpoint, on the LM loss or by distillation
from the unpruned model, shared by `optimum-prune recover` and
`optimum-cli recover`.

Runs unchanged under `accelerate launch` (DDP over processes, CPU with gloo included): every process trains its
shard of the batches through the `Trainer`, and only the main process writes the merged checkpoint. Nothing heavy
is imported at module level, so `optimum-cli --help` stays fast.
"""

from __future__ import annotations

import argparse

from ..cli_args import add_allow_pickle_arg, add_overwrite_arg


def add_recover_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `recover` (the same for both command-line entry points); defaults = `recovery.py`'s."""
    parser.add_argument("--model", required=True, help="A pruned checkpoint directory (written by `prune`).")
    parser.add_argument("--train", required=True, help="Training text: a .txt or .jsonl file.")
    parser.add_argument("--output", required=True, help="Directory to write the recovered (merged) checkpoint to.")
    add_overwrite_arg(parser)
    parser.add_argument("--eval", default=None, help="Text file for perplexity before and after recovery.")
    parser.add_argument("--max-steps", type=int, default=60, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=8, help="Blocks per device and step.")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=256, help="Tokens per training block.")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--target-modules", nargs="+", default=None, help="LoRA target module names (default: the architecture's)."
    )
    parser.add_argument(
        "--method",
        default="lm",
        choices=["lm", "distill"],
        help="lm: next-token loss on the text; distill: match the unpruned teacher's logits (KL divergence).",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="With --method distill: the unpruned model (directory or Hub id); default: the base model recorded in "
        "the checkpoint's pruning_results.json.",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="Distillation temperature (loss x T^2).")
    parser.add_argument("--lm-weight", type=float, default=0.0, help="Weight of the LM loss added to distillation.")
    parser.add_argument(
        "--hidden-weight",
        type=float,
        default=0.0,
        help="Weight of hidden-state matching (needs the teacher's hidden size and layer count).",
    )
    parser.add_argument(
        "--teacher-dtype", default=None, choices=["float32", "bfloat16", "float16"], help="Default: --dtype."
    )
    parser.add_argument(
        "--teacher-device-map", default=None, help="e.g. auto: let Accelerate place (or offload) the teacher."
    )
    parser.add_argument(
        "--full-finetune", action="store_true", help="Train every weight instead of LoRA adapters (lower the lr)."
    )
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="Mixed precision.")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    add_allow_pickle_arg(parser)


def run_recover(args: argparse.Namespace) -> int:
    """Recover as `args` say, save on the main process, and print the perplexities. Returns the exit code."""
    import tempfile

    import torch

    from ..evaluation import format_table
    from ..inputs import check_data_file, check_model_source
    from ..output_dir import check_output_directory
    from ..pruner import Pruner
    from ..recovery import DistillationConfig, build_training_arguments

    for name in ("max_steps", "batch_size", "block_size", "lora_r", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be a positive integer, got {getattr(args, name)}.")
    check_data_file(args.train, "--train")
    check_data_file(args.eval, "--eval")
    if args.teacher is not None:
        check_model_source(args.teacher)  # before loading and training, not after
    inputs = (args.model, args.train, args.eval, args.teacher)
    check_output_directory(args.output, inputs, args.overwrite)  # before training, not after it
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    pruner = Pruner.from_pruned(args.model, allow_pickle=args.allow_pickle, dtype=dtype)
    distillation = DistillationConfig(args.temperature, args.lm_weight, args.hidden_weight)
    lora_config = None if args.full_finetune else _lora_config(args, pruner)
    teacher_kwargs = {"dtype": getattr(torch, args.teacher_dtype) if args.teacher_dtype else dtype}
    if args.teacher_device_map:
        teacher_kwargs["device_map"] = args.teacher_device_map
    with tempfile.TemporaryDirectory(prefix="optimum-prune-recover-") as work_dir:
        training_args = build_training_arguments(
            {
                "output_dir": work_dir,
                "max_steps": args.max_steps,
                "per_device_train_batch_size": args.batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "learning_rate": args.learning_rate,
                "warmup_steps": args.warmup_steps,
                "logging_steps": args.logging_steps,
                "seed": args.seed,
                "bf16": args.precision == "bf16",
                "fp16": args.precision == "fp16",
                "gradient_checkpointing": args.gradient_checkpointing,
            }
        )
        report = pruner.recover(
            args.train,
            lora_config=lora_config,
            training_args=training_args,
            eval_data=args.eval,
            block_size=args.block_size,
            eval_seq_len=args.eval_seq_len,
            eval_windows=args.eval_windows,
            method=args.method,
            teacher=args.teacher,
            distillation=distillation,
            full_finetune=args.full_finetune,
            teacher_kwargs=teacher_kwargs,
            allow_pickle=args.allow_pickle,
        )
    if training_args.process_index != 0:
        return 0  # the main process writes the checkpoint; the others hold identical merged weights
    pruner.save_pretrained(args.output, overwrite=args.overwrite)
    rows = [[name, f"{value:.4f}"] for name, value in report.items() if isinstance(value, float)]
    print(format_table(["", "value"], rows))
    print(f"Saved to {args.output} ({pruner.model.config.model_type}).")
    return 0


def _lora_config(args: argparse.Namespace, pruner):
    """The `LoraConfig` the LoRA options describe (targets default to the architecture's)."""
    from peft import LoraConfig

    from ..recovery import DEFAULT_LORA_DROPOUT, lora_target_modules

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout if args.lora_dropout is not None else DEFAULT_LORA_DROPOUT,
        target_modules=args.target_modules or lora_target_modules(pruner.model, pruner.spec),
        task_type="CAUSAL_LM",
        bias="none",
    )
