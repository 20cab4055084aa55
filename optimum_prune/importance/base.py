"""The one importance interface: `score(group_set, stats) -> Tensor[num_units]`, higher means keep."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..groups import GroupSet


WEIGHTS = "weights"
ACTIVATIONS = "activations"
GRADIENTS = "gradients"
FISHER = "fisher"
FORWARD_LOSS = "forward_loss"  # forward-only evaluations of the model's LM loss
BLOCK_LOSS = "block_loss"  # forward-only evaluations of each decoder layer's own loss (layer-local)
ROUTING = "routing"  # per expert of every MoE layer: how often the router picks it, and REAP's weighted output norms
INPUT_GRAM = "input_gram"  # the Gram matrix X^T X of each consumer Linear's inputs (float64 [in, in])
NEEDS = (WEIGHTS, ACTIVATIONS, GRADIENTS, FISHER, FORWARD_LOSS, BLOCK_LOSS, ROUTING, INPUT_GRAM)
# How the forward-only loss differences (FORWARD_LOSS, BLOCK_LOSS) are drawn and turned into gradient estimates: the
# criterion validates its arguments against them, calibration runs them.
SPSA_DISTRIBUTIONS = ("gaussian", "rademacher")
SPSA_ESTIMATORS = ("multiply", "divide")

GROUP_REDUCTIONS = ("sum", "mean", "max", "prod", "first", "last")


class Importance(ABC):
    """Base class of every criterion.

    A criterion declares what it `needs` (weights, activations, gradients, Fisher diagonal, forward-only loss
    evaluations) and the pruner collects exactly that; it never assumes the caller ran `backward()`. Variants are
    constructor arguments.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({WEIGHTS})
    # Structures the criterion can score; None means all of them. Checked by `PrunerConfig`.
    structures: ClassVar[tuple[str, ...] | None] = None
    # Constructor arguments of a variant that needs only one layer at a time, for a criterion whose default does not
    # (mini_llm's block-local loss); streaming's errors name it.
    layer_local_variant: ClassVar[dict | None] = None
    # Scores in units that compare across layers (an estimated loss change, a bound on the block output): ranked
    # globally and raw by default (`PrunerConfig.global_ranking` / `global_normalization` unset).
    comparable_across_layers: ClassVar[bool] = False

    @property
    def needs_data(self) -> bool:
        return bool(self.needs - {WEIGHTS})

    @abstractmethod
    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        """One score per unit of `group_set` ([num_units], float32); higher means more important."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def aggregate(per_member: list[torch.Tensor], how: str) -> torch.Tensor:
    """Combine per-member unit scores ([N] each) into group scores, as LLM-Pruner's group reduction does."""
    stacked = torch.stack(per_member)  # [members, N]
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    if how == "prod":
        return stacked.prod(0)
    if how == "first":
        return stacked[0]
    if how == "last":
        return stacked[-1]
    raise ValueError(f"`group_reduction` must be one of {GROUP_REDUCTIONS}, got {how!r}.")


IMPORTANCE_REGISTRY: dict[str, type[Importance]] = {}


def register_importance(name: str):
    """Class decorator: `@register_importance("taylor")`. Keys are lowercase; duplicates raise."""

    def wrap(cls: type[Importance]) -> type[Importance]:
        key = name.lower()
        if key in IMPORTANCE_REGISTRY:
            raise ValueError(f"Importance {key!r} is already registered.")
        if not issubclass(cls, Importance):
            raise TypeError(f"{cls.__name__} must subclass Importance.")
        cls.name = key
        IMPORTANCE_REGISTRY[key] = cls
        return cls

    return wrap


def get_importance(name: str, **kwargs) -> Importance:
    """Instantiate the criterion registered as `name` with its variant arguments."""
    cls = IMPORTANCE_REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"Unknown importance {name!r}. Available: {sorted(IMPORTANCE_REGISTRY)}.")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"Invalid arguments for importance {name!r}: {err}") from None
