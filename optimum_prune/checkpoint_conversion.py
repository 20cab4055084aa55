"""Stored tensor names vs a model's parameter names, for families that Transformers converts when it loads them.

Transformers 5 loads some checkpoints through its conversion mapping (`transformers.conversion_mapping`): Mixtral's
and the Qwen MoE families' per-expert Linears (`block_sparse_moe.experts.{e}.w1/w3/w2`, `mlp.experts.{e}.gate_proj/
up_proj/down_proj`) are stacked into the fused `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj`
[E, H, I], and `save_pretrained` writes them back per expert (the registered `pruned_*` types too: their modeling file
registers the stock family's mapping, so our outputs stream back in). Streaming reads and writes shards itself, so it
runs the same transforms with Transformers' own code: forward on the tensors it reads for one layer ([`StoredNames`]),
reverse on those it writes ([`saved_tensors`], `revert_weight_conversion`, what `save_pretrained` calls). A streamed
checkpoint therefore has the tensor names the in-memory path saves, and no family's expert names are declared here:
they are Transformers' data. Under Transformers 4.x, which loads checkpoints as stored, nothing is converted.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


try:  # Transformers 5
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
        revert_weight_conversion,
    )
except ImportError:  # Transformers 4.x: checkpoints load as stored
    get_model_conversion_mapping = None


class StoredNames:
    """Which stored tensors make each of `model`'s tensors, under the conversions `from_pretrained` applies.

    Args:
        model: the model (a meta skeleton will do) whose names the stored ones are converted to.
        stored: the checkpoint's tensor names (already carrying the model's base prefix where they need it).
    """

    def __init__(self, model: nn.Module, stored: Iterable[str]):
        transforms = get_model_conversion_mapping(model) if get_model_conversion_mapping is not None else []
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        expected = set(model.state_dict())
        self.sources: dict[str, list[str]] = {}  # model name -> stored names, in the order loading stacks them
        self.patterns: dict[str, str] = {}  # stored name -> the converter source pattern it matched
        self.converters: dict[str, object] = {}  # model name -> the converter that builds it
        for name in sorted(stored, key=_natural_key):
            target, pattern = (name, None) if not transforms else rename_source_key(name, renamings, converters)
            if target not in expected and name in expected:
                target, pattern = name, None  # stored under its model name already (a fused checkpoint)
            self.sources.setdefault(target, []).append(name)
            if pattern is not None:
                self.patterns[name] = pattern
                self.converters[target] = by_pattern[pattern]

    def stored_names(self, names: Iterable[str]) -> list[str]:
        """The stored tensors that `names` (model names) are made of."""
        return [stored for name in names for stored in self.sources[name]]

    def build(self, name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model tensor `name` from its stored tensors (`tensors`, by stored name; those used are removed)."""
        if name not in self.converters:
            [stored] = self.sources[name]
            return tensors.pop(stored)
        converter = copy.deepcopy(self.converters[name])  # each target gets its own instance, as when loading
        for stored in self.sources[name]:
            converter.add_tensor(name, stored, self.patterns[stored], tensors.pop(stored))
        return converter.convert(name)[name]


def _natural_key(name: str):
    return dot_natural_key(name) if get_model_conversion_mapping is not None else name


def saved_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (model names) as `model.save_pretrained` would store them: the reverse conversions of `model`'s
    type (per-expert Linears for a stock MoE type), or unchanged. Works on meta tensors too (the output layout)."""
    if get_model_conversion_mapping is None:
        return tensors
    return revert_weight_conversion(model, tensors)


__all__ = ["StoredNames", "saved_tensors"]
