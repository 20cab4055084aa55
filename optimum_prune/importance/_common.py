"""Helpers shared by the activation-based criteria: reading a group set through its spec, never by module name."""

from __future__ import annotations

import torch

from ..groups import GroupSet, Slice


def consumer_slices(group_set: GroupSet, criterion: str) -> list[Slice]:
    """The members that *read* the units (o_proj / down_proj columns in LLaMA): their input activations are the units'
    channels. Raises for structures without one (hidden channels, layers)."""
    consumers = [s for s in group_set.slices if s.consumer and s.dim == 1]
    if not consumers:
        raise ValueError(
            f"The {criterion!r} criterion scores units through the Linear that reads them (a consumer member), and "
            f"{group_set.structure!r} has none; use it with 'attention_heads', 'query_heads' or 'mlp_channels'."
        )
    return consumers


def per_unit_channels(group_set: GroupSet, s: Slice, per_channel: torch.Tensor) -> torch.Tensor:
    """Split a per-input-channel vector of consumer `s` ([C]) into the channels each unit owns: [N, C // N]."""
    return per_channel[s.unit_indices(per_channel.numel(), group_set.num_units)]


def layer_prefix_of(group_set: GroupSet, spec) -> str:
    """The parameter-name prefix of the group set's decoder layer (`"model.layers.3."`), from the spec's members."""
    members = spec.structures[group_set.structure].members
    for s in group_set.slices:
        for m in members:
            if s.name.endswith(m.name):
                return s.name[: -len(m.name)]
    raise ValueError(f"Group set {group_set.key!r} does not match the spec's {group_set.structure!r} members.")
