"""LLM-Pruner's Taylor importance (Ma et al., NeurIPS 2023, arXiv:2305.11627, Eq. 3-5 and its `taylor` code).

The loss change from removing a weight is approximated by its first-order term |w·g| (`param_first`), the
second-order term ½·w·F·w with the Fisher diagonal F (`param_second`), or their mix (`param_mix`, first − second, as
in its code). Element-wise sums |s| over a unit's weights; vector-wise takes |Σ s| (sum before the absolute value).
Per-member unit scores are combined by `group_reduction` (LLM-Pruner default: sum).
"""

import torch

from ..groups import GroupSet
from .base import FISHER, GRADIENTS, GROUP_REDUCTIONS, WEIGHTS, Importance, aggregate, register_importance


TAYLOR_ORDERS = ("first", "second", "mix")
TAYLOR_GRANULARITIES = ("element", "vector")


@register_importance("taylor")
class TaylorImportance(Importance):
    """Taylor importance of every unit from calibration gradients of the LM loss.

    Args:
        order (`str`, *optional*, defaults to `"first"`): `"first"`, `"second"` or `"mix"`.
        granularity (`str`, *optional*, defaults to `"element"`): `"element"` or `"vector"`.
        group_reduction (`str`, *optional*, defaults to `"sum"`): how member scores combine: sum, mean, max, prod,
            first, last.
    """

    comparable_across_layers = True

    def __init__(self, order: str = "first", granularity: str = "element", group_reduction: str = "sum"):
        if order not in TAYLOR_ORDERS:
            raise ValueError(f"`order` must be one of {TAYLOR_ORDERS}, got {order!r}.")
        if granularity not in TAYLOR_GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {TAYLOR_GRANULARITIES}, got {granularity!r}.")
        if group_reduction not in GROUP_REDUCTIONS:
            raise ValueError(f"`group_reduction` must be one of {GROUP_REDUCTIONS}, got {group_reduction!r}.")
        self.order = order
        self.granularity = granularity
        self.group_reduction = group_reduction

    @property
    def needs(self) -> frozenset[str]:
        needs = {WEIGHTS, GRADIENTS}
        if self.order != "first":
            needs.add(FISHER)
        return frozenset(needs)

    def _salience(self, w: torch.Tensor, stats, name: str) -> torch.Tensor:
        first = w * stats.gradient(name).float()
        if self.order == "first":
            return first
        second = 0.5 * w * stats.fisher(name).float() * w
        return second if self.order == "second" else first - second

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        per_member = []
        for s in group_set.slices:
            w = stats.parameter(s.name).detach().float()
            salience = self._salience(w, stats, s.name)
            if self.granularity == "element":
                per_member.append(group_set.reduce(s.name, salience.abs()).cpu())
            else:
                per_member.append(group_set.reduce(s.name, salience).abs().cpu())
        return aggregate(per_member, self.group_reduction)
