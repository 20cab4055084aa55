"""Routing criteria for whole experts of Mixture-of-Experts layers, from one calibration pass over the router."""

import torch

from ..architectures.base import EXPERTS
from ..groups import GroupSet
from .base import ROUTING, Importance, register_importance


@register_importance("frequency")
class FrequencyImportance(Importance):
    """How often the router picks each expert: its share of the (token, slot) routing decisions on the calibration
    data. Experts that are rarely routed to contribute little (the frequency baseline of expert pruning)."""

    needs = frozenset({ROUTING})
    structures = (EXPERTS,)

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        routing = stats.expert_routing(group_set.layer)
        return (routing.count / max(routing.tokens, 1)).float()


@register_importance("reap")
class ReapImportance(Importance):
    """REAP (Router-weighted Expert Activation Pruning, arXiv 2510.13999): the mean over the tokens routed to an
    expert of its gate weight x the L2 norm of its output, i.e. the average size of what it adds to the residual
    stream when chosen. Experts never routed to score 0."""

    needs = frozenset({ROUTING})
    structures = (EXPERTS,)

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        routing = stats.expert_routing(group_set.layer)
        return (routing.weighted_norm / routing.count.clamp(min=1)).float()
