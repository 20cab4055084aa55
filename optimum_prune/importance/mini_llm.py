"""MINI-LLM's feature-map sensitivity with forward-only gradients (Cheng, Zhang, Shi, *MINI-LLM: Memory-Efficient
Structured Pruning for Large Language Models*, arXiv:2407.11681, Algorithm 1, Eq. 7 and Eq. 9; no official code).

Each weight is scored by |W ⊙ Ĝ ⊙ X| (Eq. 9), summed over everything a unit owns in every coupled member:

- Ĝ is the gradient of the LM loss estimated from forward passes only (Eq. 7, read as SPSA as in MeZO):
  d_k = (L(W + εz_k) - L(W - εz_k)) / 2ε over the calibration batches, Ĝ = mean_k d_k · z_k (`estimator="multiply"`,
  MeZO's form, default: it has lower variance) or mean_k d_k / z_k (`"divide"`, classical SPSA as one summary writes
  Eq. 7; the same for Rademacher z). All scored weights are perturbed together; z is regenerated from a per-parameter
  seed and never stored, the weights are never written (see `calibration.spsa_projected_gradients`), so memory stays
  at the gradient-free level: no `.grad` buffers.
- `loss="block"` replaces the LM loss by a block-local one, the change of each decoder layer's output under the
  perturbation (a Gaussian log-likelihood with a sampled target, see `calibration.block_spsa_projected_gradients`):
  every evaluation is a forward of one layer on its own inputs, so the criterion is layer-local and runs in streaming
  mode, and 2n evaluations cost 2n layer forwards instead of 2n model forwards.
- X is the mean |x| of the Linear's input channel over calibration tokens, broadcast over its rows (the per-channel
  reading of "layer input activation"; the paper does not say whether X enters element-wise or as a norm). Biases
  and non-Linear members (norms, embeddings) use X = 1.

Selection follows the paper when allocation is uniform (each layer keeps its top 1 - p groups).
"""

import torch

from ..groups import GroupSet
from .base import (
    ACTIVATIONS,
    BLOCK_LOSS,
    FORWARD_LOSS,
    SPSA_DISTRIBUTIONS,
    SPSA_ESTIMATORS,
    WEIGHTS,
    Importance,
    register_importance,
)


MINI_LLM_LOSSES = ("lm", "block")


@register_importance("mini_llm")
class MiniLLMImportance(Importance):
    """Σ over a unit's weights of |W · Ĝ · X|, Ĝ a forward-only (SPSA) gradient estimate.

    Args:
        num_perturbations (`int`, *optional*, defaults to `8`): n, the number of ±εz pairs (2n calibration passes).
        eps (`float`, *optional*, defaults to `1e-3`): ε, the perturbation scale.
        distribution (`str`, *optional*, defaults to `"gaussian"`): z ~ N(0, I) (`"gaussian"`) or ±1 (`"rademacher"`).
        estimator (`str`, *optional*, defaults to `"multiply"`): `"multiply"` (d·z, MeZO) or `"divide"` (d/z).
        seed (`int`, *optional*, defaults to `0`): seeds every z.
        loss (`str`, *optional*, defaults to `"lm"`): the loss whose gradient is estimated: the model's next-token
            loss (`"lm"`, the paper's) or the block-local loss of each decoder layer (`"block"`: forwards of one layer
            only, so it streams).

    Example:

    ```python
    >>> config = PrunerConfig(pruning_ratio=0.2, importance="mini_llm", importance_kwargs={"num_perturbations": 16})
    ```
    """

    layer_local_variant = {"loss": "block"}

    def __init__(
        self,
        num_perturbations: int = 8,
        eps: float = 1e-3,
        distribution: str = "gaussian",
        estimator: str = "multiply",
        seed: int = 0,
        loss: str = "lm",
    ):
        if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int) or num_perturbations < 1:
            raise ValueError(f"`num_perturbations` must be a positive integer, got {num_perturbations!r}.")
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0, got {eps!r}.")
        if distribution not in SPSA_DISTRIBUTIONS:
            raise ValueError(f"`distribution` must be one of {SPSA_DISTRIBUTIONS}, got {distribution!r}.")
        if estimator not in SPSA_ESTIMATORS:
            raise ValueError(f"`estimator` must be one of {SPSA_ESTIMATORS}, got {estimator!r}.")
        if loss not in MINI_LLM_LOSSES:
            raise ValueError(f"`loss` must be one of {MINI_LLM_LOSSES}, got {loss!r}.")
        self.num_perturbations = num_perturbations
        self.eps = eps
        self.distribution = distribution
        self.estimator = estimator
        self.seed = seed
        self.loss = loss

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({WEIGHTS, ACTIVATIONS, BLOCK_LOSS if self.loss == "block" else FORWARD_LOSS})

    def estimated_gradient(self, stats, name: str) -> torch.Tensor:
        """Ĝ for parameter `name`, shaped like it (float32)."""
        return stats.spsa_gradient(
            name,
            num_perturbations=self.num_perturbations,
            eps=self.eps,
            distribution=self.distribution,
            estimator=self.estimator,
            seed=self.seed,
            loss=self.loss,
        )

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        total = torch.zeros(group_set.num_units)
        for s in group_set.slices:
            w = stats.parameter(s.name).detach().float()
            sensitivity = (w * self.estimated_gradient(stats, s.name)).abs()  # [out, in] or [size]
            if w.dim() == 2 and s.name in stats.activations:
                sensitivity *= stats.activation(s.name).mean_abs.to(w.device)[None, :]  # X broadcast over rows
            total += group_set.reduce(s.name, sensitivity).cpu()
        return total
