"""LoRA recovery (LLM-Pruner's third stage): train low-rank adapters on the pruned model, then merge them.

Training goes through the Transformers `Trainer`, so everything `TrainingArguments` configures (mixed precision,
gradient checkpointing, `accelerate launch` with DDP/FSDP/DeepSpeed, logging and progress bars) works unchanged. The
adapters are merged at the end (`merge_and_unload`), so the result is again a plain model of the pruned shape and type
that saves and reloads like any pruned checkpoint; no `peft` is needed to use it.

The defaults follow shared/BENCHMARKS.md: r=8, alpha=16 on every attention and MLP projection, 60 steps of 8 x 256
tokens at lr 1e-3 (on LLM-Pruner's 40% tiny-llama this took perplexity from x3.03 to x1.26 of the unpruned model).

`method="distill"` trains the same adapters (or every weight, `full_finetune=True`) to match the unpruned teacher's
next-token distributions instead of the text's next tokens: the KL divergence of temperature-softened logits (x T^2,
Hinton et al.), optionally plus the LM loss and a hidden-state term ([`DistillationConfig`]). The teacher runs in eval
mode under `no_grad` beside the student; Minitron found logit distillation recovers more per token than LM fine-tuning.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
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


RECOVERY_METHODS = ("lm", "distill")


def check_recovery_method(method: str) -> None:
    if method not in RECOVERY_METHODS:
        raise ValueError(
            f"Unknown recovery method {method!r}; use 'lm' (next-token loss on the text) or 'distill' (match the "
            "unpruned teacher's logits)."
        )


@dataclass
class DistillationConfig:
    """Settings of `method="distill"`: the loss is `KL_T(teacher || student) x T^2 + lm_weight x LM loss +
    hidden_weight x hidden-state loss`.

    Args:
        temperature (`float`, defaults to 1.0): softens both distributions; the KL term is scaled by T^2 so its
            gradients keep their size across temperatures.
        lm_weight (`float`, defaults to 0.0): weight of the ordinary next-token loss on the training text.
        hidden_weight (`float`, defaults to 0.0): weight of the hidden-state term, the mean over decoder layers of
            `MSE(student, teacher) / mean(teacher^2)`. Needs hidden states of the same shape: not after pruning
            `hidden_channels` or removing layers (refused, not skipped).
    """

    temperature: float = 1.0
    lm_weight: float = 0.0
    hidden_weight: float = 0.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"The distillation temperature must be positive, got {self.temperature}.")
        for name in ("lm_weight", "hidden_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be zero or positive, got {getattr(self, name)}.")


def distillation_loss(student_logits, teacher_logits, temperature: float = 1.0, attention_mask=None) -> torch.Tensor:
    """`KL(softmax(teacher / T) || softmax(student / T)) x T^2`, averaged over the (unmasked) token positions.

    Computed in float32 whatever the models' dtype (a bf16 teacher's logits included)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.to(student_logits.device).float() / temperature, dim=-1)
    per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)  # [batch, seq]
    if attention_mask is not None:
        per_token = per_token[attention_mask.to(per_token.device).bool()]
    return per_token.mean() * temperature**2


def hidden_state_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over decoder layers of `MSE / mean(teacher^2)`: each layer weighs alike whatever its scale (the
    embedding output, index 0, is left out)."""
    terms = []
    for student, teacher in zip(student_hidden[1:], teacher_hidden[1:]):
        teacher = teacher.to(student.device).float()
        terms.append(F.mse_loss(student.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def _output_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_teacher(teacher: nn.Module, student: nn.Module, distillation: DistillationConfig) -> None:
    """Refuse a teacher whose logits (or, with hidden-state matching, hidden states) cannot be compared."""
    if teacher is student:
        raise ValueError("The teacher is the pruned model itself; pass the unpruned model (or its path) as teacher.")
    if _output_size(teacher) != _output_size(student):
        raise ValueError(
            f"The teacher's vocabulary ({_output_size(teacher)} logits) differs from the pruned model's "
            f"({_output_size(student)}); distillation needs the unpruned model with the same tokenizer."
        )
    if distillation.hidden_weight > 0:
        shapes = [(m.config.num_hidden_layers, m.config.hidden_size) for m in (teacher, student)]
        if shapes[0] != shapes[1]:
            raise ValueError(
                f"Hidden-state matching needs hidden states of the same shape: the teacher has {shapes[0][0]} layers "
                f"of width {shapes[0][1]}, the pruned model {shapes[1][0]} of width {shapes[1][1]} (layers or hidden "
                "channels were pruned); set hidden_weight=0."
            )


def _trainer_class():
    """The `Trainer` subclass, built on first use so that importing this module does not import Transformers'."""
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """A `Trainer` whose loss is the distillation loss from a frozen teacher (see [`DistillationConfig`])."""

        def __init__(self, *args, teacher: nn.Module, distillation: DistillationConfig, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.distillation = distillation
            # The loss is a per-batch mean: the Trainer divides it by the gradient-accumulation steps.
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False

        def _teacher_outputs(self, inputs: dict, device: torch.device):
            if getattr(self.teacher, "hf_device_map", None) is None and self.teacher.device != device:
                self.teacher.to(device)  # once; an offloaded teacher (`device_map`) stays where its hooks put it
            with torch.no_grad():
                return self.teacher(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs.get("attention_mask"),
                    output_hidden_states=self.distillation.hidden_weight > 0,
                )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            settings = self.distillation
            student_inputs = {k: v for k, v in inputs.items() if k != "labels" or settings.lm_weight > 0}
            outputs = model(**student_inputs, output_hidden_states=settings.hidden_weight > 0)
            teacher = self._teacher_outputs(inputs, outputs.logits.device)
            loss = distillation_loss(
                outputs.logits, teacher.logits, settings.temperature, inputs.get("attention_mask")
            )
            if settings.lm_weight > 0:
                loss = loss + settings.lm_weight * outputs.loss
            if settings.hidden_weight > 0:
                loss = loss + settings.hidden_weight * hidden_state_loss(outputs.hidden_states, teacher.hidden_states)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def _build_trainer(train_model, args, dataset, teacher: nn.Module | None, distillation: DistillationConfig):
    """The plain `Trainer` (LM loss), or the distillation one with the teacher in eval mode when there is one."""
    from transformers import Trainer, default_data_collator

    kwargs = {"model": train_model, "args": args, "train_dataset": dataset, "data_collator": default_data_collator}
    if teacher is None:
        return Trainer(**kwargs)
    teacher.eval()  # no dropout; `no_grad` in the trainer keeps its weights out of the graph
    return _trainer_class()(**kwargs, teacher=teacher, distillation=distillation)


def _training_figures(trainer, output, block_size: int) -> dict:
    """The batch geometry and the Trainer's figures recorded in `pruning_results.json`."""
    args = trainer.args
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
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


def recover_model(
    model: nn.Module,
    train_data,
    spec,
    tokenizer=None,
    lora_config=None,
    training_args=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    method: str = "lm",
    teacher: nn.Module | None = None,
    distillation: DistillationConfig | None = None,
    full_finetune: bool = False,
) -> tuple[nn.Module, dict]:
    """Train `model` with the `Trainer` (LoRA adapters, merged at the end, or every weight with `full_finetune`) on
    the LM loss (`method="lm"`) or by distillation from `teacher` (`method="distill"`); return `(model, info)`.

    The returned model is `model` itself, adapters folded into its Linear weights: same class, same shapes, same
    parameter names. `info` holds the settings and the Trainer's figures (`train_loss`, the first and last logged
    losses, runtime).
    """
    check_recovery_method(method)
    distillation = distillation or DistillationConfig()
    if method == "distill":
        if teacher is None:
            raise ValueError("Distillation recovery needs the unpruned teacher model.")
        check_teacher(teacher, model, distillation)
    dataset = prepare_train_blocks(train_data, tokenizer, block_size)
    if not full_finetune:
        _require_peft()
        lora_config = lora_config if lora_config is not None else default_lora_config(model, spec)
    args = build_training_arguments(training_args)
    if args.gradient_checkpointing and not full_finetune:
        # The frozen embeddings give no grad to the checkpointed blocks' inputs; this lets LoRA's grads flow.
        model.enable_input_require_grads()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    teacher_was_training = method == "distill" and teacher.training
    train_model = model.requires_grad_(True) if full_finetune else _require_peft().get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in train_model.parameters())
    logger.info(
        "%s recovery (%s): %d blocks of %d tokens, %d trainable of %d parameters (%.2f%%).",
        "Distillation" if method == "distill" else "LM",
        "full fine-tuning" if full_finetune else "LoRA",
        len(dataset),
        block_size,
        trainable,
        total,
        100 * trainable / total,
    )
    trainer = _build_trainer(train_model, args, dataset, teacher if method == "distill" else None, distillation)
    output = trainer.train()
    if teacher_was_training:
        teacher.train()
    merged = train_model if full_finetune else train_model.merge_and_unload()
    if args.gradient_checkpointing:
        if not full_finetune:
            merged.disable_input_require_grads()
        merged.gradient_checkpointing_disable()
    merged.eval()
    for name, p in merged.named_parameters():  # get_peft_model froze the base weights; give them back as they were
        p.requires_grad_(requires_grad.get(name, True))
    info = {"method": method, "finetune": "full" if full_finetune else "lora"}
    if not full_finetune:
        target_modules = lora_config.target_modules
        info.update(
            r=lora_config.r,
            lora_alpha=lora_config.lora_alpha,
            target_modules=sorted(target_modules) if not isinstance(target_modules, str) else [target_modules],
        )
    if method == "distill":
        info.update(asdict(distillation), teacher=getattr(teacher, "name_or_path", None) or None)
    info.update(_training_figures(trainer, output, block_size))
    return merged, info
