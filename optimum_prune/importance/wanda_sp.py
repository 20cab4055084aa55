"""Wanda-SP: structured Wanda as implemented in the FLAP repository (An et al., AAAI 2024, arXiv:2312.11983, code
github.com/CASIA-IVA-Lab/FLAP `lib/prune.py::prune_wanda_sp`), after Wanda (Sun et al., arXiv:2306.11695, Eq. 1).

Wanda scores a weight by |W_ij| · ‖X_j‖₂, with ‖X_j‖₂ the norm of input channel j over all calibration tokens. The
structured variant scores a channel of the Linear that reads the unit (o_proj / down_proj, the spec's consumer
member) by the mean over output rows of that score, and a head by the sum over its channels, exactly as FLAP's
`W_metric.mean(axis=0).reshape(-1, head_dim).sum(dim=1)`.
"""

import torch

from ..groups import GroupSet
from ._common import consumer_slices, per_unit_channels
from .base import ACTIVATIONS, WEIGHTS, Importance, register_importance


@register_importance("wanda_sp")
class WandaSPImportance(Importance):
    """Σ over a unit's consumer columns j of mean_i |W[i, j]| · ‖X_j‖₂ (no gradients, one forward pass).

    Example:

    ```python
    >>> config = PrunerConfig(pruning_ratio=0.2, importance="wanda_sp")
    ```
    """

    needs = frozenset({WEIGHTS, ACTIVATIONS})

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        total = torch.zeros(group_set.num_units)
        for s in consumer_slices(group_set, self.name):
            w = stats.parameter(s.name).detach().float().cpu()  # [out, in]
            norm = stats.activation(s.name).norm  # [in]
            per_channel = w.abs().mean(dim=0) * norm  # [in]
            total += per_unit_channels(group_set, s, per_channel).sum(dim=1)
        return total
