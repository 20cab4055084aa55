"""Importance criteria, one file each; importing this package registers them."""

from . import bip, block_influence, flap, magnitude, mini_llm, obs, random_, routing, taylor, wanda_sp
from .base import (
    ACTIVATIONS,
    BLOCK_LOSS,
    FISHER,
    FORWARD_LOSS,
    GRADIENTS,
    GROUP_REDUCTIONS,
    IMPORTANCE_REGISTRY,
    INPUT_GRAM,
    NEEDS,
    ROUTING,
    WEIGHTS,
    Importance,
    aggregate,
    get_importance,
    register_importance,
)
from .bip import BIPImportance
from .block_influence import BlockInfluenceImportance
from .flap import FlapImportance, standardize_scores
from .magnitude import MagnitudeImportance
from .mini_llm import MiniLLMImportance
from .obs import OBSImportance
from .random_ import RandomImportance
from .routing import FrequencyImportance, ReapImportance
from .taylor import TaylorImportance
from .wanda_sp import WandaSPImportance


__all__ = [
    "ACTIVATIONS",
    "BLOCK_LOSS",
    "FISHER",
    "FORWARD_LOSS",
    "GRADIENTS",
    "GROUP_REDUCTIONS",
    "IMPORTANCE_REGISTRY",
    "INPUT_GRAM",
    "NEEDS",
    "ROUTING",
    "WEIGHTS",
    "BIPImportance",
    "BlockInfluenceImportance",
    "FlapImportance",
    "FrequencyImportance",
    "Importance",
    "MagnitudeImportance",
    "MiniLLMImportance",
    "OBSImportance",
    "RandomImportance",
    "ReapImportance",
    "TaylorImportance",
    "WandaSPImportance",
    "aggregate",
    "bip",
    "block_influence",
    "flap",
    "get_importance",
    "magnitude",
    "mini_llm",
    "obs",
    "random_",
    "register_importance",
    "routing",
    "standardize_scores",
    "taylor",
    "wanda_sp",
]
