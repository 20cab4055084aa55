"""Groups: the prunable units of one structure in one layer, as the tensor slices each unit owns.

Torch-Pruning builds these by tracing a dependency graph; here they are read from the declarative spec, so building
them is instant and exact for every supported family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architectures.base import HIDDEN_CHANNELS, LAYERS, ArchitectureSpec, Member, StructureSpec, Width


@dataclass
class Slice:
    """One member of a group set, resolved to a full parameter name on a concrete model."""

    name: str
    dim: int
    chunks: int = 1
    consumer: bool = False
    parts: tuple[int, ...] = ()  # sizes of unequal fused parts (`Member.parts`, resolved)
    owned_parts: tuple[int, ...] = ()

    def unit_indices(self, size: int, num_units: int) -> torch.Tensor:
        """Indices along `dim` owned by each unit: a LongTensor [num_units, chunks * block]."""
        if self.parts:
            return self._part_indices(size, num_units)
        if size % (self.chunks * num_units):
            raise ValueError(
                f"{self.name}: dimension {self.dim} of size {size} does not split into {self.chunks} x {num_units} "
                "equal blocks"
            )
        block = size // (self.chunks * num_units)
        part = size // self.chunks
        units = torch.arange(num_units).unsqueeze(1) * block + torch.arange(block).unsqueeze(0)  # [N, block]
        return torch.cat([units + c * part for c in range(self.chunks)], dim=1)  # [N, chunks*block]

    def _owned(self) -> tuple[int, ...]:
        return self.owned_parts or tuple(range(len(self.parts)))

    def _part_indices(self, size: int, num_units: int) -> torch.Tensor:
        """`unit_indices` of unequal parts: each unit's equal block of every owned part, in part order."""
        if sum(self.parts) != size or any(self.parts[p] % num_units for p in self._owned()):
            raise ValueError(
                f"{self.name}: dimension {self.dim} of size {size} does not hold parts {list(self.parts)} that split "
                f"into {num_units} equal blocks"
            )
        offsets = [sum(self.parts[:p]) for p in range(len(self.parts))]
        blocks = []
        for p in self._owned():
            block = self.parts[p] // num_units
            blocks.append(offsets[p] + torch.arange(num_units).unsqueeze(1) * block + torch.arange(block).unsqueeze(0))
        return torch.cat(blocks, dim=1)  # [N, sum of owned blocks]

    def kept_indices(self, size: int, num_units: int, kept: torch.Tensor) -> torch.Tensor:
        """The indices along `dim` that remain when only units `kept` stay: theirs, and every part no unit owns;
        ascending (fused parts keep their order)."""
        index = self.unit_indices(size, num_units)[kept].flatten()
        offset = 0
        for p, part in enumerate(self.parts):
            if p not in self._owned():
                index = torch.cat([index, torch.arange(offset, offset + part)])
            offset += part
        return index.sort().values


@dataclass
class GroupSet:
    """All units of one structure in one layer (`layer=None` for model-wide hidden channels).

    `num_groups > 1` ties the units in that many equal contiguous groups that must keep equal counts
    (`StructureSpec.tied_groups`: query heads in their KV groups). Scores stay per unit; `select_top(..., groups=)`
    and the allocation (kept counts are positive multiples of `num_groups`) honour the tie.
    """

    structure: str
    layer: int | None
    num_units: int
    slices: list[Slice]
    num_groups: int = 1

    @property
    def units_per_group(self) -> int:
        return self.num_units // self.num_groups

    @property
    def key(self) -> str:
        return self.structure if self.layer is None else f"{self.structure}.{self.layer}"

    def unit_cost(self, params: dict[str, torch.Tensor]) -> int:
        """Parameters removed with one unit (each unit owns an equal share of every member)."""
        cost = 0
        for s in self.slices:
            param = params[s.name]
            owned = s.unit_indices(param.shape[s.dim], self.num_units).shape[1]  # indices along `dim` per unit
            cost += param.numel() // param.shape[s.dim] * owned
        return cost

    def reduce(self, name: str, values: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Reduce a tensor shaped like parameter `name` to one value per unit, over everything the unit owns.

        `reduction="sum"` gives Σ over the unit's elements; `"sum_abs_after"` is handled by callers. Returns [N].
        """
        s = self._slice(name)
        per_index = values.transpose(0, s.dim).reshape(values.shape[s.dim], -1).sum(dim=1)  # [size]
        return per_index[s.unit_indices(per_index.numel(), self.num_units)].sum(dim=1)  # [N]

    def per_unit(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """The elements of `values` (shaped like parameter `name`) that each unit owns: [N, elements per unit]."""
        s = self._slice(name)
        moved = values.transpose(0, s.dim)  # sliced dim first
        idx = s.unit_indices(moved.shape[0], self.num_units)  # [N, k]
        return moved[idx].reshape(self.num_units, -1)

    def _slice(self, name: str) -> Slice:
        for s in self.slices:
            if s.name == name:
                return s
        raise KeyError(name)


def get_submodule_or_none(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def decoder_layers(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    layers = get_submodule_or_none(model, spec.layers)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no module {spec.layers!r}; is the spec for another family?")
    return layers


def config_divisor(config, width: Width) -> int:
    divisor = getattr(config, width.divisor) if width.divisor else 1
    return divisor * width.factor


def width_of(params: dict[str, torch.Tensor], config, width: Width, prefix: str = "") -> int:
    size = params[prefix + width.param].shape[width.dim]
    if width.minus is not None:
        size -= params[prefix + width.minus[0]].shape[width.minus[1]]
    return size // config_divisor(config, width)


def _part_sizes(member: Member, prefix: str, params: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """`member.parts` resolved on this layer's tensors: the named sizes, and the rest split equally among `None`s."""
    if not member.parts:
        return ()
    named = [None if p is None else params[prefix + p[0]].shape[p[1]] for p in member.parts]
    rest = params[prefix + member.name].shape[member.dim] - sum(n for n in named if n is not None)
    shared = rest // max(1, named.count(None))
    return tuple(shared if n is None else n for n in named)


def _resolve(spec_members: tuple[Member, ...], prefix: str, params: dict[str, torch.Tensor]) -> list[Slice]:
    return [
        Slice(prefix + m.name, m.dim, m.chunks, m.consumer, _part_sizes(m, prefix, params), m.owned_parts)
        for m in spec_members
        if prefix + m.name in params
    ]


def unique_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named parameters with tied tensors listed once (under their first name)."""
    return dict(model.named_parameters())


def layer_prefix(spec: ArchitectureSpec, index: int) -> str:
    return f"{spec.layers}.{index}."


def derive_field(config, rule: tuple) -> int:
    """Evaluate a `spec.derived_fields` rule `(numerator, denominator[, multiplier])`: `numerator * multiplier //
    denominator`, where numerator and denominator are config field names or integers."""
    numerator, denominator, *multiplier = (getattr(config, x) if isinstance(x, str) else x for x in rule)
    return numerator * (multiplier[0] if multiplier else 1) // denominator


def materialize_derived_fields(config, spec: ArchitectureSpec) -> None:
    """Write the fields the config leaves implicit (`spec.derived_fields`) while the model still has its original
    shape, so that later width changes cannot change them (a head keeps its `head_dim` when `hidden_size` shrinks)."""
    for name, rule in spec.derived_fields.items():
        if getattr(config, name, None) is None:
            setattr(config, name, derive_field(config, rule))


def check_structure_requirements(config, spec: ArchitectureSpec, structures) -> None:
    """Refuse a structure whose spec requirements this config does not meet, naming the fields."""
    for structure in structures:
        for a, b in spec.structure_requirements.get(structure, ()):
            if getattr(config, a) != getattr(config, b):
                raise ValueError(
                    f"{config.model_type}: `{structure}` pruning is supported only when `{a}` equals `{b}` (got "
                    f"{getattr(config, a)} and {getattr(config, b)}). Prune the other structures "
                    f"({', '.join(s for s in spec.supported_structures if s != structure)}) instead."
                )


def build_group_sets(model: nn.Module, spec: ArchitectureSpec, structures) -> dict[str, GroupSet]:
    """Group sets for the requested width structures, keyed `"<structure>.<layer>"` or `"hidden_channels"`."""
    params = unique_parameters(model)
    config = model.config
    check_structure_requirements(config, spec, structures)
    materialize_derived_fields(config, spec)
    groups: dict[str, GroupSet] = {}
    num_layers = len(decoder_layers(model, spec))
    for structure in structures:
        if structure == LAYERS:
            continue
        if structure == HIDDEN_CHANNELS:
            groups[structure] = hidden_group_set(model, spec)
            continue
        structure_spec: StructureSpec = spec.structures[structure]
        for i in range(num_layers):
            prefix = layer_prefix(spec, i)
            if prefix + structure_spec.units.param not in params:
                continue  # a layer without this structure (Qwen3-MoE's dense layers have no experts)
            num_units = width_of(params, config, structure_spec.units, prefix)
            num_groups = 1
            if structure_spec.tied_groups is not None:
                num_groups = width_of(params, config, structure_spec.tied_groups, prefix)
                if num_groups < 1 or num_units % num_groups:
                    raise ValueError(
                        f"{structure}: layer {i} has {num_units} units, which do not split into {num_groups} equal "
                        f"groups ({structure_spec.tied_groups.field})."
                    )
            gs = GroupSet(structure, i, num_units, _resolve(structure_spec.members, prefix, params), num_groups)
            groups[gs.key] = gs
    return groups


def check_tied_groups(model: nn.Module, spec: ArchitectureSpec, structures) -> None:
    """Refuse a structure with tied groups where every group holds one unit: nothing could be removed.

    `query_heads` on a multi-head model (`num_key_value_heads == num_attention_heads`) is that case; pruning whole
    heads there is `attention_heads`, whose units are then single heads. Called before calibration.
    """
    params = unique_parameters(model)
    materialize_derived_fields(model.config, spec)  # the widths below may divide by a derived `head_dim`
    for structure in structures:
        structure_spec = spec.structures.get(structure)
        if structure_spec is None or structure_spec.tied_groups is None:
            continue
        for i in range(len(decoder_layers(model, spec))):
            prefix = layer_prefix(spec, i)
            units = width_of(params, model.config, structure_spec.units, prefix)
            groups = width_of(params, model.config, structure_spec.tied_groups, prefix)
            if units <= groups:
                raise ValueError(
                    f"'{structure}' removes units inside groups of `{structure_spec.tied_groups.field}` and keeps "
                    f"at least one per group, but layer {i} of this {model.config.model_type} model has {units} units "
                    f"in {groups} groups (one per group: multi-head attention, not grouped-query), so nothing could "
                    "be pruned. Use 'attention_heads' instead."
                )


def hidden_group_set(model: nn.Module, spec: ArchitectureSpec) -> GroupSet:
    """Hidden channels: one group set across the whole model (embeddings, every norm and projection side, head)."""
    params = unique_parameters(model)
    slices = _resolve(spec.hidden.members, "", params)
    for i in range(len(decoder_layers(model, spec))):
        slices += _resolve(spec.hidden_layer_members, layer_prefix(spec, i), params)
    num_units = width_of(params, model.config, spec.hidden.units)
    return GroupSet(HIDDEN_CHANNELS, None, num_units, slices)
