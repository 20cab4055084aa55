"""LoRA recovery (LLM-Pruner's third stage): train low-rank adapters on the pruned model, then merge them.

Training goes through the Transformers `Trainer`, so everything `TrainingArguments` configures (mixed precision,
gradient checkpointing, `accelerate launch` with DDP/FSDP/DeepSpeed, logging and progress bars) works unchanged. The
adapters are merged at the end (`merge_and_unload`), so the result is again a plain model of the pruned shape and type
that saves and reloads like any pruned checkpoint; no `peft` is needed to use it.

The defaults follow shared/BENCHMARKS.md: r=8, alpha=16 on every attention and MLP projection, 60 steps of 8 x 256
tokens at lr 1e-3 (on LLM-Pruner's 40% tiny-llama this took perplexity from x3.03 to x1.26 of the unpruned model).
"""

from __future__ import annotations

import logging
import tempfile

import torch
from torch import nn

from .calibration import token_stream


logger = logging.getLogger(__name__)

DEFAULT_LORA_R = 8
DEFAULT_LORA_ALPHA = 16
DEFAULT_LORA_DROPOUT = 0.05
DEFAULT_BLOCK_SIZE = 256
# Overridable by a `training_args` dict; a `TrainingArguments` instance replaces them all.
DEFAULT_TRAINING_ARGS = {
    "max_steps": 60,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
}


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive non-overlapping blocks of a token stream, as causal-LM examples (labels = inputs).

    Documents are concatenated and cut into equal blocks, as Transformers' `run_clm.py` groups texts; the remainder
    shorter than one block is dropped.
    """

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks  # [num_blocks, block_size]

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def prepare_train_blocks(data, tokenizer, block_size: int = DEFAULT_BLOCK_SIZE) -> TokenBlocks:
    """Training data (the same inputs as calibration: a .txt/.jsonl path, a list of strings, a `datasets.Dataset`
    with `text` or `input_ids`, or token ids) -> [`TokenBlocks`] of `block_size` tokens."""
    stream = token_stream(data, tokenizer)
    if isinstance(stream, list):  # rows of token ids: concatenate, then re-chunk
        stream = torch.cat([row.flatten() for row in stream]) if stream else torch.empty(0, dtype=torch.long)
    num_blocks = stream.numel() // block_size
    if num_blocks == 0:
        raise ValueError(
            f"Recovery data has {stream.numel()} tokens, fewer than one block of {block_size}; provide more text or "
            "lower `block_size`."
        )
    return TokenBlocks(stream[: num_blocks * block_size].view(num_blocks, block_size))


def lora_target_modules(model: nn.Module, spec) -> list[str]:
    """The spec's LoRA targets that this model has as `nn.Linear` (fused layouts name their fused module)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in spec.lora_target_modules if t in names]
    if not targets:
        raise ValueError(
            f"None of the architecture's LoRA targets {list(spec.lora_target_modules)} is a Linear module of this "
            "model; pass `lora_config=LoraConfig(target_modules=[...])`."
        )
    return targets


def _require_peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA recovery needs peft: `pip install 'optimum-prune[peft]'`.") from err
    return peft


def default_lora_config(model: nn.Module, spec):
    """`LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05)` on every attention and MLP projection of the spec."""
    LoraConfig = _require_peft().LoraConfig

    return LoraConfig(
        r=DEFAULT_LORA_R,
        lora_alpha=DEFAULT_LORA_ALPHA,
        lora_dropout=DEFAULT_LORA_DROPOUT,
        target_modules=lora_target_modules(model, spec),
        task_type="CAUSAL_LM",
        bias="none",
    )


def build_training_arguments(training_args=None, output_dir: str | None = None):
    """A `TrainingArguments` from None (the defaults), a dict of overrides, or an instance (used as is)."""
    from transformers import TrainingArguments

    if isinstance(training_args, TrainingArguments):
        return training_args
    if training_args is not None and not isinstance(training_args, dict):
        raise TypeError(
            f"`training_args` must be a transformers.TrainingArguments or a dict, got {type(training_args).__name__}."
        )
    kwargs = {**DEFAULT_TRAINING_ARGS, **(training_args or {})}
    kwargs.setdefault("output_dir", output_dir or tempfile.mkdtemp(prefix="optimum-prune-recovery-"))
    return TrainingArguments(**kwargs)


def recover_model(
    model: nn.Module,
    train_data,
    spec,
    tokenizer=None,
    lora_config=None,
    training_args=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[nn.Module, dict]:
    """Train LoRA adapters on `model` with the `Trainer`, merge them, and return `(merged_model, info)`.

    `merged_model` is `model` itself with the adapters folded into its Linear weights: same class, same shapes, same
    parameter names. `info` holds the LoRA and training settings and the Trainer's figures (`train_loss`, the first
    and last logged losses, runtime).
    """
    get_peft_model = _require_peft().get_peft_model
    from transformers import Trainer, default_data_collator

    dataset = prepare_train_blocks(train_data, tokenizer, block_size)
    lora_config = lora_config if lora_config is not None else default_lora_config(model, spec)
    args = build_training_arguments(training_args)
    if args.gradient_checkpointing:
        # The frozen embeddings give no grad to the checkpointed blocks' inputs; this lets LoRA's grads flow.
        model.enable_input_require_grads()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    peft_model = get_peft_model(model, lora_config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "LoRA recovery: %d blocks of %d tokens, %d trainable of %d parameters (%.2f%%).",
        len(dataset),
        block_size,
        trainable,
        total,
        100 * trainable / total,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    merged = peft_model.merge_and_unload()
    if args.gradient_checkpointing:
        merged.disable_input_require_grads()
        merged.gradient_checkpointing_disable()
    merged.eval()
    for name, p in merged.named_parameters():  # get_peft_model froze the base weights; give them back as they were
        p.requires_grad_(requires_grad.get(name, True))
    target_modules = lora_config.target_modules
    info = {
        "r": lora_config.r,
        "lora_alpha": lora_config.lora_alpha,
        "target_modules": sorted(target_modules) if not isinstance(target_modules, str) else [target_modules],
        "max_steps": output.global_step,
        "batch_size": args.per_device_train_batch_size * max(1, args.gradient_accumulation_steps) * args.world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "block_size": block_size,
        "learning_rate": args.learning_rate,
        "train_loss": output.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_runtime": output.metrics.get("train_runtime"),
        "world_size": args.world_size,
        "distributed_backend": (
            torch.distributed.get_backend()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else None
        ),
    }
    return merged, info
