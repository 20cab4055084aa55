"""Architecture specs, one file per family; importing this package registers them."""

from . import bloom, glm, llama, opt
from .base import (
    ARCHITECTURE_REGISTRY,
    ATTENTION_HEADS,
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
)


__all__ = [
    "ARCHITECTURE_REGISTRY",
    "ATTENTION_HEADS",
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
    "get_architecture",
    "glm",
    "llama",
    "opt",
    "register_architecture",
]
