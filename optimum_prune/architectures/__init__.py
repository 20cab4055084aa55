"""Architecture specs, one file per family; importing this package registers them."""

from . import bloom, chatglm, glm, llama, opt
from .base import (
    ARCHITECTURE_REGISTRY,
    ATTENTION_HEADS,
    CHECKPOINT_CONVERTERS,
    HIDDEN_CHANNELS,
    LAYERS,
    MLP_CHANNELS,
    STRUCTURES,
    ArchitectureSpec,
    ConfigWriter,
    Member,
    NormSpec,
    StructureSpec,
    Width,
    get_architecture,
    register_architecture,
    register_checkpoint_converter,
)


__all__ = [
    "ARCHITECTURE_REGISTRY",
    "ATTENTION_HEADS",
    "CHECKPOINT_CONVERTERS",
    "HIDDEN_CHANNELS",
    "LAYERS",
    "MLP_CHANNELS",
    "STRUCTURES",
    "ArchitectureSpec",
    "ConfigWriter",
    "Member",
    "NormSpec",
    "StructureSpec",
    "Width",
    "bloom",
    "chatglm",
    "get_architecture",
    "glm",
    "llama",
    "opt",
    "register_architecture",
    "register_checkpoint_converter",
]
