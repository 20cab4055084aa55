"""Random scores: the floor every criterion must beat. Seeded, so runs repeat."""

import torch

from ..groups import GroupSet
from .base import Importance, register_importance


@register_importance("random")
class RandomImportance(Importance):
    """Uniform random scores from a generator seeded by `seed` and the group set's key.

    Args:
        seed (`int`, *optional*, defaults to `0`): the `PrunerConfig.seed` is passed here by the pruner.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        key_hash = sum((i + 1) * ord(c) for i, c in enumerate(group_set.key))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key_hash)
        return torch.rand(group_set.num_units, generator=generator)
