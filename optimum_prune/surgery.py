"""Surgery: slice tensors and write the new widths into the config, in the same function.

It takes a `PruningPlan` and knows nothing of criteria. Every change to a weight is an index selection along one
dimension, so the pruned model computes exactly what the original computes with the removed units zeroed (hidden
channels: with norm statistics compensated, see `NormSpec`).

`plan.py` imports this module (`PruningPlan.apply`), so the plan arguments here are duck-typed (`kept`,
`unit_counts`, `removed_layers`, `bias_means`, `num_layers`, `model_type`) rather than annotated with the class.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from .architectures.base import HEAD_STRUCTURES, HIDDEN_CHANNELS, ArchitectureSpec, get_architecture
from .groups import (
    GroupSet,
    build_group_sets,
    config_divisor,
    decoder_layers,
    derive_field,
    get_submodule_or_none,
    layer_prefix,
    materialize_derived_fields,
    width_of,
)
from .modeling import PRUNED_MODEL_CLASSES
from .modeling.per_layer_config import LayerConfigView
from .utils.compat import fails_transformers_5_validation


logger = logging.getLogger(__name__)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    return model.get_submodule(module_path), attr


def _sync_module_sizes(module: nn.Module) -> None:
    """Keep the size attributes of standard modules in line with their weights."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


def slice_parameter(model: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    """Replace parameter `name` by its `index_select` along `dim`, keeping dtype, device and `requires_grad`."""
    module, attr = _owner(model, name)
    old = getattr(module, attr)
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    _sync_module_sizes(module)


def prune_group_set(model: nn.Module, group_set: GroupSet, kept: list[int]) -> None:
    """Keep only the units `kept` of one group set."""
    params = dict(model.named_parameters())
    kept_t = torch.tensor(sorted(kept), dtype=torch.long)
    for s in group_set.slices:
        size = params[s.name].shape[s.dim]
        slice_parameter(model, s.name, s.dim, s.kept_indices(size, group_set.num_units, kept_t))


def removed_channels(group_set: GroupSet, slice_, num_units: int, kept: list[int], size: int) -> torch.Tensor:
    """Input channels of consumer `slice_` owned by the units *not* in `kept`, ascending: LongTensor [removed]."""
    removed = sorted(set(range(num_units)) - set(kept))
    if not removed:
        return torch.zeros(0, dtype=torch.long)
    return slice_.unit_indices(size, num_units)[torch.tensor(removed)].flatten().sort().values


def consumer_modules(spec: ArchitectureSpec, group_set: GroupSet) -> list[tuple[object, str]]:
    """`(slice, module path relative to the layer)` of each consumer member (the Linear that reads the units)."""
    members = spec.structures[group_set.structure].members
    found = []
    for s in group_set.slices:
        if not (s.consumer and s.dim == 1):
            continue
        member = next(m for m in members if m.consumer and s.name.endswith(m.name))
        found.append((s, member.name.rpartition(".")[0]))
    return found


def compensate_biases(
    model: nn.Module, spec: ArchitectureSpec, group_set: GroupSet, kept: list[int], means: dict[str, list[float]]
) -> set[str]:
    """FLAP's bias compensation (`compress(..., bias=True)`): before the removed input channels of each consumer are
    sliced away, add their mean contribution to its output bias, b += W[:, removed] @ mean(x[removed]).

    The pruned consumer then computes W[:, kept] x[kept] + b + W[:, removed] E[x[removed]]: exact whenever the removed
    channels are constant over tokens, and right in expectation otherwise. A consumer without a bias gets one (zeros
    first); returns the relative module paths that gained one, for which the config must say so (`bias_fields`).
    """
    params = dict(model.named_parameters())
    added = set()
    for s, module_path in consumer_modules(spec, group_set):
        if s.name not in means:
            continue
        weight = params[s.name]  # [out, in]
        index = removed_channels(group_set, s, group_set.num_units, kept, weight.shape[1])
        mean = torch.tensor(means[s.name], dtype=torch.float64)
        if mean.numel() != index.numel():
            raise ValueError(
                f"`bias_means` of {s.name!r} has {mean.numel()} values; the plan removes {index.numel()} channels."
            )
        delta = weight.detach().double().index_select(1, index.to(weight.device)).cpu() @ mean  # [out]
        module, _ = _owner(model, s.name)
        if module.bias is None:
            if module_path not in spec.bias_fields:
                raise ValueError(
                    f"Bias compensation needs a bias on {module_path!r}, which this family builds without one and "
                    "whose registered pruned type cannot add (no `bias_fields` entry); set `bias_compensation=False`."
                )
            module.bias = nn.Parameter(
                torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                requires_grad=weight.requires_grad,
            )
            added.add(module_path)
        with torch.no_grad():
            module.bias.add_(delta.to(module.bias.device, module.bias.dtype))
    return added


def add_missing_biases(model: nn.Module, spec: ArchitectureSpec, module_paths: set[str]) -> None:
    """Give every decoder layer's `module_paths` a (zero) bias and set the config fields that make the registered type
    build them: the field is per model, so layers without compensation carry a zero bias."""
    for path in sorted(module_paths):
        for i in range(len(decoder_layers(model, spec))):
            module = model.get_submodule(layer_prefix(spec, i) + path)
            if module.bias is None:
                weight = module.weight
                module.bias = nn.Parameter(
                    torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                    requires_grad=weight.requires_grad,
                )
        setattr(model.config, spec.bias_fields[path], True)


def _compensate_norms(model: nn.Module, spec: ArchitectureSpec, old: int, new: int) -> None:
    """RMSNorm over the kept channels equals RMSNorm over all channels with the removed ones zeroed once the weights
    are scaled by sqrt(old/new) and epsilon by old/new, or once the residual stream is scaled (see `NormSpec`)."""
    if spec.norm.kind != "rms" or old == new:
        return
    if spec.norm.compensation == "residual":
        _scale_residual_stream(model, spec, math.sqrt(new / old))
        for name in spec.norm.scaled_embeddings:
            _set_embed_scale(model.get_submodule(name), math.sqrt(new))
        return
    scale = math.sqrt(old / new)
    for name in _residual_norms(model, spec):
        norm = model.get_submodule(name)
        with torch.no_grad():
            norm.weight.mul_(scale)
        if spec.norm.eps_attr:
            setattr(norm, spec.norm.eps_attr, getattr(norm, spec.norm.eps_attr) * old / new)
    if spec.norm.eps_field:
        eps = getattr(model.config, spec.norm.eps_field)
        if spec.norm.fixed_eps_field and getattr(model.config, spec.norm.fixed_eps_field, None) is None:
            setattr(model.config, spec.norm.fixed_eps_field, eps)  # the per-head norms keep it
        setattr(model.config, spec.norm.eps_field, eps * old / new)


def _set_embed_scale(embedding: nn.Module, scale: float) -> None:
    """Gemma's scaled embedding keeps sqrt(hidden_size) as a buffer (and a float copy); Transformers 4.x computes it
    from the config in `forward`, where there is nothing to set."""
    if isinstance(getattr(embedding, "embed_scale", None), torch.Tensor):
        embedding.embed_scale.fill_(scale)
    if hasattr(embedding, "scalar_embed_scale"):
        embedding.scalar_embed_scale = scale


def _residual_norms(model: nn.Module, spec: ArchitectureSpec) -> list[str]:
    """The compensated norms: the model-level ones, then every decoder layer's."""
    names = list(spec.norm.modules)
    for i in range(len(decoder_layers(model, spec))):
        names += [layer_prefix(spec, i) + m for m in spec.norm.layer_modules]
    return names


def _scale_residual_stream(model: nn.Module, spec: ArchitectureSpec, factor: float) -> None:
    """Make the residual stream `factor` (sqrt(H'/H)) times the original's kept channels: RMSNorm over the H' channels
    of the scaled stream then sees the original mean square, with the original epsilon, and the reading norms divide
    `factor` out of their weights. A tied `lm_head` is the scaled embedding, so the final norm also divides its
    factor out."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and bool(spec.norm.embeddings)
    with torch.no_grad():
        for name in spec.norm.embeddings:
            model.get_submodule(name).weight.mul_(factor)
        for i in range(len(decoder_layers(model, spec))):
            for path in spec.norm.residual_writers:
                linear = model.get_submodule(layer_prefix(spec, i) + path)
                linear.weight.mul_(factor)
                if linear.bias is not None:
                    linear.bias.mul_(factor)
        offset = spec.norm.weight_offset
        for name in _residual_norms(model, spec):
            divisor = factor * factor if tied and name in spec.norm.modules else factor
            weight = model.get_submodule(name).weight
            weight.copy_((weight + offset) / divisor - offset)


def write_unit_records(model: nn.Module, spec: ArchitectureSpec, plan) -> None:
    """Keep the spec's `config_writers` fields (original indices of the kept units, per layer) in line with `plan`.

    Runs before `write_config`, while `units_field` still holds the unpruned count. A field is written only when its
    structure is pruned or the config already has it, so untouched models keep a stock config.
    """
    config = model.config
    num_layers = plan.num_layers
    for writer in spec.config_writers:
        prefix = writer.structure + "."
        keys = [k for k in plan.kept if k.startswith(prefix)]
        records = getattr(config, writer.field, None)
        if records is None and not keys:
            continue
        if getattr(config, writer.count_field, None) is None:
            setattr(config, writer.count_field, getattr(config, writer.units_field))
        if records is None:
            records = [list(range(getattr(config, writer.units_field))) for _ in range(num_layers)]
        records = [list(r) for r in records]
        for key in keys:
            i = int(key[len(prefix) :])
            records[i] = [records[i][j] for j in plan.kept[key]]
        setattr(config, writer.field, [r for i, r in enumerate(records) if i not in set(plan.removed_layers)])


def remove_layers(model: nn.Module, spec: ArchitectureSpec, removed: list[int]) -> None:
    """Drop decoder layers and renumber what stores a layer index (the KV cache slots)."""
    if not removed:
        return
    layers = decoder_layers(model, spec)
    kept = [layer for i, layer in enumerate(layers) if i not in set(removed)]
    parent, attr = _owner(model, spec.layers)
    setattr(parent, attr, nn.ModuleList(kept))
    for new_index, layer in enumerate(kept):
        for path in spec.layer_index_attrs:
            owner_path, _, name = path.rpartition(".")
            owner = layer.get_submodule(owner_path) if owner_path else layer
            setattr(owner, name, new_index)
    config = model.config
    setattr(config, spec.num_layers_field, len(kept))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(removed)]


def layer_widths(model: nn.Module, spec: ArchitectureSpec, config=None) -> list[dict[str, int]]:
    """The config widths each decoder layer actually has, read from its tensors (divisors from `config`, by default
    the model's)."""
    config = config if config is not None else model.config
    params = dict(model.named_parameters())
    # A stock config may have dropped a derived field again (Phi-3's `head_dim`) that the widths divide by.
    dropped = {n: derive_field(config, r) for n, r in spec.derived_fields.items() if not hasattr(config, n)}
    config = LayerConfigView(config, dropped) if dropped else config
    widths = []
    for i in range(len(decoder_layers(model, spec))):
        prefix = layer_prefix(spec, i)
        layer = {}
        for structure in spec.structures.values():
            for w in structure.widths:
                if prefix + w.param in params:  # a layer may lack a structure (a dense layer of an MoE model)
                    layer[w.field] = width_of(params, config, w, prefix)
        widths.append(layer)
    return widths


def _per_layer_overrides(per_layer: list[dict[str, int]]) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
    """Global widths (each field's most common value, ties to the larger) and the sparse per-layer differences, in
    the format of Transformers' `per_layer_config` (layer index -> stock field names)."""
    if not per_layer:
        return {}, {}
    global_widths = {}
    for name in dict.fromkeys(name for layer in per_layer for name in layer):
        values = [layer[name] for layer in per_layer if name in layer]
        global_widths[name] = max(set(values), key=lambda v: (values.count(v), v))
    overrides = {}
    for i, layer in enumerate(per_layer):
        diff = {k: v for k, v in layer.items() if v != global_widths[k]}
        if diff:
            overrides[i] = diff
    return global_widths, overrides


def write_config(model: nn.Module, spec: ArchitectureSpec) -> None:
    """Write the widths read from the tensors into `model.config`, switching to the registered pruned type when
    the stock config class cannot express them (per-layer widths always need it: they go to `per_layer_config`)."""
    config = model.config
    params = dict(model.named_parameters())
    for w in spec.hidden.widths:
        setattr(config, w.field, params[w.param].shape[w.dim] // config_divisor(config, w))
    global_widths, overrides = _per_layer_overrides(layer_widths(model, spec))
    for field_name, value in global_widths.items():
        setattr(config, field_name, value)
    # Per-layer widths always need the registered type (`per_layer_config`). Under 4.x also leave the stock type when 5.x would refuse to load it, if the family has a pruned type.
    refused_by_v5 = fails_transformers_5_validation(config) and spec.pruned_model_type in PRUNED_MODEL_CLASSES
    # A kept epsilon of per-head norms (see `NormSpec.fixed_eps_field`) is read only by the registered type.
    fixed_eps = spec.norm.fixed_eps_field is not None and getattr(config, spec.norm.fixed_eps_field, None) is not None
    if not overrides and not refused_by_v5 and not fixed_eps and _stock_config_expresses(model):
        for name, rule in spec.derived_fields.items():
            # The stock class derives it the same way: leave config.json as the stock class writes it.
            declared = hasattr(type(config), name)  # a registered type's own field stays
            if not declared and name in config.__dict__ and getattr(config, name) == derive_field(config, rule):
                delattr(config, name)
    else:
        pruned_type = spec.pruned_model_type
        if pruned_type not in PRUNED_MODEL_CLASSES:
            raise ValueError(f"The pruned shape needs a registered model type, and {pruned_type!r} is not one.")
        config_class, model_class = PRUNED_MODEL_CLASSES[pruned_type]
        if overrides and not hasattr(config_class, "per_layer_overrides"):
            raise ValueError(f"Per-layer widths need `per_layer_config`, which {pruned_type!r} does not support.")
        data = config.to_dict()
        data.pop("model_type", None)
        data.pop("auto_map", None)
        data.pop("per_layer_config", None)
        base_model_type = config.model_type
        model.config = config_class(
            **data,
            per_layer_config={str(i): v for i, v in overrides.items()} or None,
            attn_implementation=config._attn_implementation,  # not serialised, so carried over explicitly
        )
        model.config.base_model_type = getattr(config, "base_model_type", base_model_type)
        # The attention implementation chosen when the model was built is runtime state that `to_dict` drops; BLOOM's
        # eager-only attention needs its explicit causal mask.
        model.config._attn_implementation = getattr(config, "_attn_implementation", None)
        for module in model.modules():  # submodules that keep a config reference (decoders, attention) follow
            if getattr(module, "config", None) is config:
                module.config = model.config
        model.__class__ = model_class
        # A registered type may need its own submodule classes (BLOOM's per-layer ALiBi heads): it converts the
        # stock modules in place, so the model in memory computes what a reloaded checkpoint computes.
        adopt = getattr(model, "adopt_pruned_modules", None)
        if adopt is not None:
            adopt()
        logger.info(
            "The pruned shape needs the registered model type %r (%s).",
            pruned_type,
            f"per-layer widths in {len(overrides)} layers"
            if overrides
            else f"stock {base_model_type!r} cannot express it",
        )


def _stock_config_expresses(model: nn.Module) -> bool:
    """Whether the model's own config class, built on the meta device, reproduces every parameter shape."""
    config = model.config
    try:
        stock = type(config)(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
        with torch.device("meta"):
            reference = type(model)(stock)
    except Exception:  # noqa: BLE001 - any refusal (strict validation, shape errors) means "not expressible"
        return False
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return expected == actual


def check_plan(model: nn.Module, plan, spec: ArchitectureSpec, what: str = "model") -> dict[str, GroupSet]:
    """Refuse, with a ValueError and before any tensor changes, a plan that does not fit `model`: another model type,
    another layer count, a structure the family cannot prune, unit counts that differ, both head structures at once,
    tied groups (query heads per KV group) kept unevenly, or `bias_means` for weights that are not the entry's
    consumers or with the wrong number of values. Returns the group sets of every `unit_counts` key.

    `what` names the target in messages ("checkpoint" for streaming)."""
    config = model.config
    if plan.model_type not in (config.model_type, getattr(config, "base_model_type", None)):
        raise ValueError(f"The plan was made for a {plan.model_type!r} model; this {what} is {config.model_type!r}.")
    num_layers = len(decoder_layers(model, spec))
    if num_layers != plan.num_layers:
        raise ValueError(f"The plan is for {plan.num_layers} decoder layers; this {what} has {num_layers}.")
    structures = sorted({key.split(".")[0] for key in plan.unit_counts})
    unsupported = [s for s in structures if s not in spec.supported_structures]
    if unsupported:
        raise ValueError(
            f"The plan prunes {unsupported}, which {config.model_type!r} models do not have (they have "
            f"{list(spec.supported_structures)})."
        )
    heads = [s for s in HEAD_STRUCTURES if any(key.split(".")[0] == s for key in plan.kept)]
    if len(heads) > 1:
        raise ValueError(f"The plan prunes both {heads[0]!r} and {heads[1]!r}; they slice the same tensors.")
    groups = build_group_sets(model, spec, structures)
    for key, expected in plan.unit_counts.items():
        if groups[key].num_units != expected:
            raise ValueError(
                f"The plan expects {expected} units in {key!r}; this {what} has {groups[key].num_units}. "
                "A plan applies only to a model of the same shape as the one it was made for."
            )
    for key, kept in plan.kept.items():
        _check_tied_groups(groups[key], kept)
    for key, means in plan.bias_means.items():
        _check_bias_means(model, spec, groups[key], plan.kept[key], means)
    return groups


def _check_tied_groups(group_set: GroupSet, kept: list[int]) -> None:
    """Every tied group (the query heads of one KV head) must keep the same number of units, at least one."""
    if group_set.num_groups == 1:
        return
    per_group = [0] * group_set.num_groups
    for unit in kept:
        per_group[unit // group_set.units_per_group] += 1
    if len(set(per_group)) > 1 or not per_group[0]:
        raise ValueError(
            f"Plan entry {group_set.key!r} keeps {per_group} units in its {group_set.num_groups} tied groups; every "
            "group must keep the same number, at least one."
        )


def _check_bias_means(model: nn.Module, spec: ArchitectureSpec, group_set: GroupSet, kept, means: dict) -> None:
    """`bias_means` of one entry: only the entry's consumer weights, each with one mean per removed channel, on a
    Linear that has a bias or that the family's pruned type can give one."""
    params = dict(model.named_parameters())
    consumers = {s.name: (s, module_path) for s, module_path in consumer_modules(spec, group_set)}
    for name, values in means.items():
        if name not in consumers:
            raise ValueError(
                f"`bias_means[{group_set.key!r}]` names {name!r}, which is not a consumer of {group_set.key!r} in "
                f"this model (consumers: {sorted(consumers)})."
            )
        slice_, module_path = consumers[name]
        removed = removed_channels(group_set, slice_, group_set.num_units, kept, params[name].shape[1])
        if len(values) != removed.numel():
            raise ValueError(
                f"`bias_means` of {name!r} has {len(values)} values; the plan removes {removed.numel()} channels."
            )
        module, _ = _owner(model, name)
        if module.bias is None and module_path not in spec.bias_fields:
            raise ValueError(
                f"Bias compensation needs a bias on {module_path!r}, which this family builds without one and "
                "whose registered pruned type cannot add (no `bias_fields` entry); set `bias_compensation=False`."
            )


def apply_width_units(model: nn.Module, spec: ArchitectureSpec, plan, groups, layer=None) -> set[str]:
    """Slice the per-layer width units `plan` keeps (every decoder layer's, or only `layer`'s), compensating biases
    from the plan's means first; returns the layer-relative paths of the consumers compensation gave a bias. The one
    loop both whole-model surgery and the streaming engine's layer pass run."""
    added_biases: set[str] = set()
    for key, kept in plan.kept.items():
        if key == HIDDEN_CHANNELS or (layer is not None and groups[key].layer != layer):
            continue
        if key in plan.bias_means:  # before slicing: the removed columns are still there
            added_biases |= compensate_biases(model, spec, groups[key], kept, plan.bias_means[key])
        prune_group_set(model, groups[key], kept)
    return added_biases


def apply_plan(model: nn.Module, plan, spec: ArchitectureSpec | None = None) -> nn.Module:
    """Prune `model` in place as `plan` says: widths first (original layer indices), then hidden channels, then
    removed layers; then write the config. Returns the model.

    The plan is checked against the model first ([`check_plan`]); a plan that does not fit leaves it untouched."""
    spec = spec or get_architecture(getattr(model.config, "base_model_type", None) or model.config.model_type)
    groups = check_plan(model, plan, spec)
    added_biases = apply_width_units(model, spec, plan, groups)
    add_missing_biases(model, spec, added_biases)  # before hidden-channel pruning, which slices these biases too
    if HIDDEN_CHANNELS in plan.kept:
        hidden = build_group_sets(model, spec, [HIDDEN_CHANNELS])[HIDDEN_CHANNELS]
        prune_group_set(model, hidden, plan.kept[HIDDEN_CHANNELS])
        _compensate_norms(model, spec, hidden.num_units, len(plan.kept[HIDDEN_CHANNELS]))
    write_unit_records(model, spec, plan)
    remove_layers(model, spec, plan.removed_layers)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    for module in model.modules():
        _sync_module_sizes(module)
    write_config(model, spec)
    sync_module_attrs(model, spec)
    return model


def sync_module_attrs(
    model: nn.Module, spec: ArchitectureSpec, config=None, layer_indices: list[int] | None = None
) -> None:
    """Copy the pruned config's widths into module attributes that forward passes read (`spec.module_attrs`).

    `config` defaults to the model's own. `layer_indices` limits the update to those decoder layers and leaves the
    model-level attributes alone: streaming prunes one layer of an otherwise unpruned model at a time and syncs it
    from the planned config.
    """
    config = config if config is not None else model.config
    layers = decoder_layers(model, spec)
    layer_config = getattr(config, "layer_config", None)  # a registered type with per-layer widths

    def field_value(source, field_name):
        if field_name in spec.derived_fields and getattr(source, field_name, None) is None:
            return derive_field(source, spec.derived_fields[field_name])  # dropped again from a stock config
        return getattr(source, field_name)

    for path, field_name in spec.module_attrs:
        if path.startswith("/"):
            if layer_indices is not None:
                continue
            owners = [(model, config)]
        else:
            indices = range(len(layers)) if layer_indices is None else layer_indices
            owners = [(layers[i], layer_config(i) if layer_config is not None else config) for i in indices]
        owner_path, _, attr = path.lstrip("/").rpartition(".")
        for owner, source in owners:
            module = get_submodule_or_none(owner, owner_path) if owner_path else owner
            if module is not None:  # a layer may lack the module (a dense layer of an MoE model)
                setattr(module, attr, field_value(source, field_name))
    if spec.layer_config_modules:
        all_widths = layer_widths(model, spec)
        for i in range(len(layers)) if layer_indices is None else layer_indices:
            for path in spec.layer_config_modules:
                layers[i].get_submodule(path).config = LayerConfigView(model.config, all_widths[i])
    if spec.layer_module_attrs:
        # Per layer, from that layer's own tensor widths (per-layer head counts differ under non-uniform pruning).
        # A derived divisor (Qwen2-MoE's `head_dim`) that `write_config` dropped again from a stock config.
        divisors = copy.copy(config)
        materialize_derived_fields(divisors, spec)
        for layer, widths in zip(layers, layer_widths(model, spec, divisors)):
            for path, rule in spec.layer_module_attrs.items():
                owner_path, _, attr = path.rpartition(".")
                if any(isinstance(x, str) and x not in widths for x in rule):
                    continue  # the layer lacks the structure (a dense layer of an MoE model)
                numerator, denominator, *multiplier = (widths[x] if isinstance(x, str) else x for x in rule)
                value = numerator * (multiplier[0] if multiplier else 1) // denominator
                setattr(layer.get_submodule(owner_path) if owner_path else layer, attr, value)
