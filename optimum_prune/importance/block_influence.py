"""ShortGPT's Block Influence for layer removal (Men et al., *ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect*, arXiv:2403.03853, Eq. 1).

BI_i = 1 - E_tokens[cos(X_i, X_{i+1})], with X_i the hidden states entering decoder layer i and X_{i+1} those
leaving it, over the calibration tokens. A layer that barely rotates its input has low influence and is removed first.
"""

import torch

from ..architectures.base import LAYERS
from ..groups import GroupSet
from .base import ACTIVATIONS, Importance, register_importance


@register_importance("block_influence")
class BlockInfluenceImportance(Importance):
    """1 - mean cos(layer input, layer output) over calibration tokens, for `structures=["layers"]`.

    Example:

    ```python
    >>> config = PrunerConfig(pruning_ratio=0.25, importance="block_influence", structures=["layers"])
    ```
    """

    needs = frozenset({ACTIVATIONS})
    structures = (LAYERS,)

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        if group_set.structure != LAYERS:
            raise ValueError(
                f"'block_influence' scores whole layers (`structures=['layers']`), got {group_set.key!r}."
            )
        return torch.tensor([stats.layer_influence(group_set.layer)], dtype=torch.float32)
