"""Importance criteria, one file each; importing this package registers them."""

from . import magnitude, random_, taylor
from .base import (
    ACTIVATIONS,
    FISHER,
    FORWARD_LOSS,
    GRADIENTS,
    GROUP_REDUCTIONS,
    IMPORTANCE_REGISTRY,
    NEEDS,
    WEIGHTS,
    Importance,
    aggregate,
    get_importance,
    register_importance,
)
from .magnitude import MagnitudeImportance
from .random_ import RandomImportance
from .taylor import TaylorImportance


__all__ = [
    "ACTIVATIONS",
    "FISHER",
    "FORWARD_LOSS",
    "GRADIENTS",
    "GROUP_REDUCTIONS",
    "IMPORTANCE_REGISTRY",
    "NEEDS",
    "WEIGHTS",
    "Importance",
    "MagnitudeImportance",
    "RandomImportance",
    "TaylorImportance",
    "aggregate",
    "get_importance",
    "magnitude",
    "random_",
    "register_importance",
    "taylor",
]
