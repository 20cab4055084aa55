"""What streaming pruning can do, checked before any work: layer-local criteria, per-layer structures, families.

`PrunerConfig(streaming=True)` validates itself with [`check_streaming_config`], so these checks sit below both the
config and the streaming engine (`streaming.py` re-exports them).
"""

from __future__ import annotations

from .architectures.base import (
    ATTENTION_HEADS,
    CHECKPOINT_CONVERTERS,
    EXPERTS,
    MLP_CHANNELS,
    QUERY_HEADS,
    streaming_model_types,
)
from .importance import IMPORTANCE_REGISTRY
from .importance.base import ACTIVATIONS, BLOCK_LOSS, INPUT_GRAM, ROUTING, WEIGHTS


# Structures a single layer can be scored and pruned for on its own (a MoE layer's experts and expert channels too).
STREAMING_STRUCTURES = (ATTENTION_HEADS, QUERY_HEADS, MLP_CHANNELS, EXPERTS)
# What a layer-local criterion may need: its layer's weights, the activations of its layer's inputs, forward passes
# of its layer alone (mini_llm's block-local loss), and what its router does on its inputs (frequency, REAP).
LAYER_LOCAL_NEEDS = frozenset({WEIGHTS, ACTIVATIONS, BLOCK_LOSS, ROUTING, INPUT_GRAM})


def layer_local_criteria() -> list[str]:
    """Registered criteria that need nothing beyond one layer's weights and inputs and score per-layer structures; a
    criterion whose default is not layer-local but has a variant that is (mini_llm's block-local loss) is listed with
    that variant's `importance_kwargs`."""
    names = []
    for name, cls in sorted(IMPORTANCE_REGISTRY.items()):
        if cls.structures is not None and not set(cls.structures) & set(STREAMING_STRUCTURES):
            continue
        if cls().needs <= LAYER_LOCAL_NEEDS:
            names.append(name)
        elif cls.layer_local_variant is not None and cls(**cls.layer_local_variant).needs <= LAYER_LOCAL_NEEDS:
            names.append(f"{name} with importance_kwargs={cls.layer_local_variant}")
    return names


def needs_global_scores(pruner_config) -> bool:
    """Whether the widths of a [`PrunerConfig`] follow from every layer's scores (`global_ranking`, `allocation="flap"`): streaming then
    reads the layers twice (scores first, then pruning)."""
    return bool(pruner_config.global_ranking) or pruner_config.allocation == "flap"


def check_streaming_config(pruner_config, model_type: str | None = None) -> None:
    """Refuse a [`PrunerConfig`] the layer-by-layer path cannot run, naming what it can.

    Every allocation is supported: uniform and given widths (`layer_ratios`, `attention_layers`, `mlp_layers`,
    `min_heads`, `min_channels`, `uniform`) in one pass, `global_ranking` and `allocation="flap"` in two.
    """
    importance = pruner_config.build_importance()
    if not importance.needs <= LAYER_LOCAL_NEEDS:
        raise ValueError(
            f"Streaming pruning scores one layer at a time, and the {importance.name!r} criterion needs "
            f"{sorted(importance.needs - LAYER_LOCAL_NEEDS)} of the whole model. Use a layer-local criterion: "
            f"{', '.join(layer_local_criteria())}."
        )
    other = [s for s in pruner_config.structures if s not in STREAMING_STRUCTURES]
    if other:
        raise ValueError(
            f"Streaming pruning supports the per-layer structures {list(STREAMING_STRUCTURES)}, got {other} "
            "(hidden channels and layer removal need every layer at once); prune them in memory."
        )
    if pruner_config.bias_compensation and not needs_global_scores(pruner_config):
        raise ValueError(
            "Streaming compensates biases only with the two-pass allocations (`allocation='flap'` or "
            "`global_ranking=True`), which measure the unpruned model as the in-memory path does; uniform or given "
            "widths stream in one pass on the pruned model's activations. Set `bias_compensation=False` or use one "
            "of those allocations."
        )
    if getattr(pruner_config, "reconstruction", False) and not needs_global_scores(pruner_config):
        raise ValueError(
            "Streaming reconstructs only when the plan is known before the layer pass: with the two-pass allocations "
            "(`allocation='flap'` or `global_ranking=True`) or a given plan (`plan=`); uniform or given widths "
            "stream in one pass that chooses each layer's units as it goes. Use one of those, or prune in memory."
        )
    check_streaming_family(model_type)


def mixed_layer_types(config) -> list[str]:
    """The attention kinds of a model whose decoder layers read different masks (Gemma's sliding-window and global
    layers, Qwen3 with sliding layers); empty when every layer reads the same inputs."""
    kinds = sorted(set(getattr(config, "layer_types", None) or ()))
    return kinds if len(kinds) > 1 else []


def check_streaming_family(model_type: str | None) -> None:
    """Refuse checkpoints the layer-by-layer path has not been checked on (ChatGLM until converted)."""
    if model_type in CHECKPOINT_CONVERTERS:
        raise ValueError(
            f"{model_type!r} checkpoints are converted to a native family when loaded (ChatGLM to `glm`), and "
            "streaming reads a checkpoint's shards as they are. Convert it once first, e.g. "
            "`optimum_prune.convert_chatglm_checkpoint(src, dst)` (this loads the model in memory), then stream the "
            "converted checkpoint; or prune it in memory with `AutoPruner.from_pretrained`, which converts it."
        )
    if model_type is not None and model_type not in streaming_model_types():
        raise ValueError(
            f"Streaming pruning is supported for model types {list(streaming_model_types())}, got {model_type!r}; "
            "prune it in memory (without `streaming`)."
        )


__all__ = [
    "LAYER_LOCAL_NEEDS",
    "STREAMING_STRUCTURES",
    "check_streaming_config",
    "check_streaming_family",
    "layer_local_criteria",
    "needs_global_scores",
]
