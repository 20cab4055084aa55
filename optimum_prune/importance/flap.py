"""FLAP's fluctuation metric (An et al., *Fluctuation-based Adaptive Structured Pruning for Large Language Models*,
AAAI 2024, arXiv:2312.11983, Eq. 4-6; code github.com/CASIA-IVA-Lab/FLAP `lib/prune.py`, metric `WIFV`).

A channel j of the Linear that reads the unit (o_proj / down_proj: the spec's consumer member) is scored by the
fluctuation of its input over the calibration tokens times the squared norm of its weight column,
S_j = Var_tokens(x_j) · ‖W[:, j]‖₂² (Eq. 4). As in the code, the attention module's metric is squared before
standardisation (`metrics[...] ** 2` for o_proj), the metric is standardised per module,
(S - mean(S)) / std(S) (Eq. 6, `standarlization`), and a head scores the *mean* of its channels' standardised values.
Standardised scores are comparable across layers and modules, which is what FLAP's adaptive global allocation ranks.

Implemented here: the score only. FLAP's adaptive global allocation (AL-AM) is `PrunerConfig(allocation="flap")`
(`allocation.allocate_widths(mode="flap")`), and its bias compensation (folding the mean contribution of removed
channels into the output bias) is `PrunerConfig(bias_compensation=True)`, on by default with this criterion
(`surgery.compensate_biases`, from the plan's `bias_means`).
The fluctuation is the population variance over all calibration tokens (Eq. 4). FLAP's code estimates it online, one
window at a time (`BiasGPT.add_batch`): the first window is left out and each window's scatter is taken around the
running mean of the windows so far, so with few windows its ranking differs by a channel or two per layer (on the
multi-head tiny LLaMA, 32 windows: 1-3 of 704 channels per layer). `fluctuation="online"` reproduces that estimator
exactly, for plans identical to FLAP's own code (benchmarks/flap_peers.py); the two agree as windows grow.
"""

import torch

from ..architectures.base import HEAD_STRUCTURES
from ..groups import GroupSet
from ._common import consumer_slices, per_unit_channels
from .base import ACTIVATIONS, WEIGHTS, Importance, register_importance


FLUCTUATIONS = ("variance", "online")


def standardize_scores(scores: torch.Tensor) -> torch.Tensor:
    """FLAP's per-module standardisation (Eq. 6): (x - mean(x)) / std(x) over one module's channels (unbiased std,
    as `torch.std` in its code). A constant vector maps to zeros."""
    std = scores.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / std


@register_importance("flap")
class FlapImportance(Importance):
    """Var(x_j) · ‖W[:, j]‖² of the consumer's input channels, standardised per module, averaged per unit.

    Args:
        standardize (`bool`, *optional*, defaults to `True`):
            Standardise per module as FLAP does (Eq. 6). Within one module this does not change the ranking; it makes
            scores comparable across modules for global allocation.
        attention_power (`float`, *optional*, defaults to `2.0`):
            Power applied to the attention module's channel metric before standardisation (FLAP's code squares the
            o_proj metric; 1 uses the metric of Eq. 4 as written).
        fluctuation (`str`, *optional*, defaults to `"variance"`):
            `"variance"`: the population variance of each input channel over all calibration tokens (Eq. 4).
            `"online"`: FLAP's code's online estimator (first window left out, running mean), window by window in
            calibration order.

    Example:

    ```python
    >>> config = PrunerConfig(pruning_ratio=0.2, importance="flap", importance_kwargs={"standardize": True})
    ```
    """

    needs = frozenset({WEIGHTS, ACTIVATIONS})

    def __init__(self, standardize: bool = True, attention_power: float = 2.0, fluctuation: str = "variance"):
        if fluctuation not in FLUCTUATIONS:
            raise ValueError(f"`fluctuation` must be one of {FLUCTUATIONS}, got {fluctuation!r}.")
        if not isinstance(standardize, bool):
            raise ValueError(f"`standardize` must be True or False, got {standardize!r}.")
        if not attention_power > 0:
            raise ValueError(f"`attention_power` must be > 0, got {attention_power!r}.")
        self.standardize = standardize
        self.attention_power = attention_power
        self.fluctuation = fluctuation

    def channel_metric(self, group_set: GroupSet, stats, name: str) -> torch.Tensor:
        """FLAP's per-channel `WIFV` metric of consumer `name` before standardisation: [in_features]."""
        w = stats.parameter(name).detach().float().cpu()  # [out, in]
        record = stats.activation(name)
        fluctuation = record.variance if self.fluctuation == "variance" else record.flap_fluctuation
        metric = fluctuation * w.pow(2).sum(dim=0)  # [in]
        if group_set.structure in HEAD_STRUCTURES:
            metric = metric.pow(self.attention_power)
        return metric

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        total = torch.zeros(group_set.num_units)
        for s in consumer_slices(group_set, self.name):
            metric = self.channel_metric(group_set, stats, s.name)
            if self.standardize:
                metric = standardize_scores(metric)
            total += per_unit_channels(group_set, s, metric).mean(dim=1)
        return total
