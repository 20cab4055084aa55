"""OBS: each unit scored by the output error its removal leaves *after the refit* (the structured Optimal Brain
Surgeon view of SlimGPT, Ling et al., arXiv:2412.18110, and ZipLM, Kurtic et al., arXiv:2302.04089).

A unit's consumer columns (o_proj / down_proj) are removed and the other columns refit by ridge least squares to the
Linear's own outputs on the calibration inputs; what remains is the error in the Linear's output, which is added to
the residual stream. Backward elimination over each consumer's input Gram matrix (`refit_selection.elimination_costs`)
gives every unit the cost at which it leaves, so the scores are squared errors in the residual stream: they compare
across layers and are ranked globally by default, which allocates the widths by how well each layer can be refit. A
consumer with a bias (OPT, BLOOM) is refit with it, which absorbs the inputs' means: its Gram matrix is centred.
With `reconstruction_selection="error"` (the default with reconstruction) the units within a layer are then chosen
again on the pruned model's own inputs, by the same objective.
"""

import torch

from ..architectures.base import ATTENTION_HEADS, MLP_CHANNELS, QUERY_HEADS
from ..groups import GroupSet
from ..refit_selection import elimination_costs
from ._common import consumer_slices
from .base import INPUT_GRAM, WEIGHTS, Importance, register_importance


@register_importance("obs")
class OBSImportance(Importance):
    """The residual-stream error each unit's removal leaves after its consumer is refit (one forward pass, the
    consumers' input Gram matrices: O(width^2) per consumer, all layers at once in memory, one layer when streaming).

    Args:
        damping (`float`, defaults to `0.01`): ridge damping of the refit, relative to the mean Gram diagonal (as
            `PrunerConfig.reconstruction_damping`).

    Example:

    ```python
    >>> config = PrunerConfig(pruning_ratio=0.4, importance="obs")
    ```
    """

    needs = frozenset({WEIGHTS, INPUT_GRAM})
    structures = (ATTENTION_HEADS, QUERY_HEADS, MLP_CHANNELS)  # units with a consumer Linear to refit
    comparable_across_layers = True

    def __init__(self, damping: float = 0.01):
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
            raise ValueError(f"`damping` must be a number >= 0, got {damping!r}.")
        self.damping = float(damping)

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        total = torch.zeros(group_set.num_units, dtype=torch.float64)
        for s in consumer_slices(group_set, self.name):
            weight = stats.parameter(s.name).detach().cpu()  # [out, in]
            record = stats.activation(s.name)
            gram = record.gram.cpu()
            if _has_bias(stats.model, s.name):  # the refit fits the bias too: the error of the centred inputs
                mean = record.sum.cpu() / max(record.count, 1)
                gram = gram - record.count * torch.outer(mean, mean)
            columns = s.unit_indices(weight.shape[1], group_set.num_units).reshape(group_set.num_units, -1)
            total += elimination_costs(gram, weight, columns, self.damping)
        return total.float()


def _has_bias(model, weight_name: str) -> bool:
    return getattr(model.get_submodule(weight_name.rpartition(".")[0]), "bias", None) is not None
