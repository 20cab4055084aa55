"""LLM-BIP: block-wise forward importance propagation (Haihang Wu, arXiv:2412.06419, 2024; no official code).

A unit's score is an upper bound on how much removing it changes its own transformer block's output (L1 norm per
token, averaged over calibration tokens), from one forward pass and no gradients (the paper's Lipschitz bound; the
formulas follow the summary recorded in PAPERS.md, which the paper's text does not let us confirm):

- MLP channel j, with x the input of the down projection (the MLP's consumer member):
  S_j = mean|x_j| · ‖W_D[:, j]‖₁. This is exact, not a bound: removing channel j changes the block output by
  W_D[:, j] · x_j.
- Attention output channel j, with x the input of o_proj (the attention consumer member):
  S_j = mean|x_j| · Σ_i |W_O[i, j]| · (1 + u_i), where the change W_O[:, j] x_j of the attention output reaches the
  block output directly (the 1) and through the MLP, whose Lipschitz gain from hidden channel i is bounded by
  u_i = Σ_k |W_U[k, i]| · ‖W_D[:, k]‖₁ (the paper's |W_U||W_D|). A unit (KV group, head or query
  head) sums its channels.

How the gate enters (`gate`): the paper's product |W_U||W_D| treats the gated activation silu(W_G h) as a gain of
at most one per channel, so only the up projection counts (`gate="up"`, default; for ungated MLPs such as OPT's fc1
the single producer is the "up"). `gate="sum"` treats the gate like the up projection, |W_U| + |W_G| (a looser bound
that also charges the gate path). The up projection is the last producer block of the spec's MLP members (LLaMA lists
gate then up; GLM's fused gate_up holds gate then up). The RMSNorm between attention and MLP is taken as gain one.

Scores are in block-output units, so comparing them across layers (global allocation) is meaningful.
"""

import torch

from ..architectures.base import HEAD_STRUCTURES, MLP_CHANNELS
from ..groups import GroupSet
from ._common import consumer_slices, layer_prefix_of, per_unit_channels
from .base import ACTIVATIONS, WEIGHTS, Importance, register_importance


BIP_GATES = ("up", "sum")


@register_importance("bip")
class BIPImportance(Importance):
    """LLM-BIP's block-output bound for attention heads and MLP channels.

    Args:
        gate (`str`, *optional*, defaults to `"up"`):
            How a gated MLP's gate enters the Lipschitz gain u of the MLP: `"up"` (only |W_U|, the paper's formula) or
            `"sum"` (|W_U| + |W_G|, the gate treated as another up projection).
        mlp_gain (`bool`, *optional*, defaults to `True`):
            Include the (1 + u_i) factor for attention channels; `False` scores attention as mean|x_j|·‖W_O[:, j]‖₁,
            the direct path only.

    Example:

    ```python
    >>> config = PrunerConfig(pruning_ratio=0.2, importance="bip", importance_kwargs={"gate": "up"})
    ```
    """

    comparable_across_layers = True

    needs = frozenset({WEIGHTS, ACTIVATIONS})

    def __init__(self, gate: str = "up", mlp_gain: bool = True):
        if gate not in BIP_GATES:
            raise ValueError(f"`gate` must be one of {BIP_GATES}, got {gate!r}.")
        self.gate = gate
        self.mlp_gain = mlp_gain

    def mlp_lipschitz_gain(self, group_set: GroupSet, stats) -> torch.Tensor:
        """u_i = Σ_k |W_U[k, i]| · ‖W_D[:, k]‖₁ for the MLP of the group set's layer: [hidden]."""
        spec = stats.spec
        if MLP_CHANNELS not in spec.structures:
            raise ValueError(f"The 'bip' criterion needs an {MLP_CHANNELS!r} structure in the spec for attention.")
        prefix = layer_prefix_of(group_set, spec)
        params = stats._params
        members = [m for m in spec.structures[MLP_CHANNELS].members if prefix + m.name in params]
        producers = [m for m in members if not m.consumer and m.dim == 0 and params[prefix + m.name].dim() == 2]
        consumers = [m for m in members if m.consumer and m.dim == 1]
        if not producers or not consumers:
            raise ValueError(
                "The 'bip' criterion needs the MLP's input (rows) and output (columns) members in the spec."
            )
        down_colsum = sum(params[prefix + m.name].detach().float().cpu().abs().sum(dim=0) for m in consumers)  # [I]
        blocks = []  # |W| of each producer block, [I, hidden] each, in spec order (gate before up)
        for m in producers:
            w = params[prefix + m.name].detach().float().cpu().abs()  # [chunks * I, hidden]
            blocks.extend(w.reshape(m.chunks, -1, w.shape[1]).unbind(0))
        up = blocks[-1] if self.gate == "up" else torch.stack(blocks).sum(0)  # [I, hidden]
        return up.t() @ down_colsum  # [hidden]

    def score(self, group_set: GroupSet, stats) -> torch.Tensor:
        if group_set.structure not in (*HEAD_STRUCTURES, MLP_CHANNELS):
            raise ValueError(
                f"'bip' scores {list(HEAD_STRUCTURES)} and {MLP_CHANNELS!r}, got {group_set.structure!r}."
            )
        gain = None
        if group_set.structure in HEAD_STRUCTURES and self.mlp_gain:
            gain = 1 + self.mlp_lipschitz_gain(group_set, stats)  # [hidden]
        total = torch.zeros(group_set.num_units)
        for s in consumer_slices(group_set, self.name):
            w = stats.parameter(s.name).detach().float().cpu().abs()  # [hidden, in]
            column = (w * gain[:, None]).sum(0) if gain is not None else w.sum(0)  # [in]
            per_channel = stats.activation(s.name).mean_abs * column  # [in]
            total += per_unit_channels(group_set, s, per_channel).sum(dim=1)
        return total
