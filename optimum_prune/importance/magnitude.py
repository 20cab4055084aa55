"""Weight magnitude: the Lp norm of everything a unit owns. The gradient-free baseline of every paper."""

import torch

from ..groups import GroupSet
from .base import Importance, register_importance


@register_importance("magnitude")
class MagnitudeImportance(Importance):
    """‖W_unit‖_p over all the tensors a unit owns (its rows and columns in every coupled member).

    Args:
        p (`int`, *optional*, defaults to `2`): 1 for L1, 2 for L2 (LLM-Pruner's `l2` baseline).
    """

    def __init__(self, p: int = 2):
        if p not in (1, 2):
            raise ValueError(f"`p` must be 1 or 2, got {p!r}.")
        self.p = p

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        total = torch.zeros(group_set.num_units)
        for s in group_set.slices:
            w = stats.parameter(s.name).detach().float()
            total += group_set.reduce(s.name, w.abs().pow(self.p)).cpu()
        return total.pow(1.0 / self.p)
