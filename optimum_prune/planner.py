"""Planner: shapes and scores to a [`PruningPlan`]. What may be pruned, floors, allocation, kept units, bias means.

Every engine (in memory, dispatched, streaming from shards) calls this one planner; it reads parameter shapes and the
model config, never weight values or data, so a weightless skeleton on the meta device plans like the loaded model.
Scores and activation means come from the engine.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .allocation import (
    CHANNEL_STRUCTURES,
    TOLERANCE,
    ParameterModel,
    allocate_widths,
    layer_allocation,
    select_top,
    uniform_allocation,
)
from .architectures.base import (
    ATTENTION_HEADS,
    EXPERTS,
    HEAD_STRUCTURES,
    LAYERS,
    MLP_CHANNELS,
    ArchitectureSpec,
    adds_to_residual,
)
from .configuration import PrunerConfig
from .errors import PruneInputError
from .groups import (
    GroupSet,
    Slice,
    build_group_sets,
    check_tied_groups,
    decoder_layers,
    layer_prefix,
    materialize_derived_fields,
    width_of,
)
from .modeling import PRUNED_MODEL_CLASSES
from .offload import is_offloaded
from .plan import PruningPlan
from .surgery import consumer_modules, removed_channels
from .utils.compat import fails_transformers_5_validation


logger = logging.getLogger(__name__)


def reconstruction_settings(pruner_config, spec, model_config) -> dict:
    """The plan's `reconstruction` entry for a [`PrunerConfig`]: its damping (with a selection by refit error, and a
    fit to the residual stream where `model_config`'s layers add into it straight) when it reconstructs, else empty."""
    if not pruner_config.reconstruction:
        return {}
    settings = {"damping": pruner_config.reconstruction_damping}
    if pruner_config.reconstruction_selection == "error":
        settings["selection"] = "error"
    if pruner_config.reconstruction_target == "residual" and adds_to_residual(spec, model_config):
        settings["target"] = "residual"
    return settings


# Criteria that score the fused 3-D expert tensors of MoE families (`experts`, and `mlp_channels` inside experts):
# weight-only ones read any tensor; the routing criteria read the router. Activation- and gradient-based criteria
# hook `nn.Linear` inputs or pair them with weights, which the fused experts are not.
EXPERT_CRITERIA = ("magnitude", "random", "frequency", "reap")


def check_expert_criterion(model: nn.Module, spec: ArchitectureSpec, config: PrunerConfig) -> None:
    """Refuse, before calibration, an MoE model whose experts are not fused 3-D tensors (Transformers 4.x module
    lists, which the spec does not describe), and a criterion that cannot score the fused expert tensors."""
    if EXPERTS not in spec.structures:
        return
    fused = spec.structures[EXPERTS].members[1].name  # "mlp.experts.gate_up_proj"
    if not any(name.endswith(fused) for name, _ in model.named_parameters()):
        raise ValueError(
            f"optimum-prune prunes {model.config.model_type!r} models whose experts are fused 3-D tensors (`{fused}`, "
            "Transformers 5); this model stores them otherwise (Transformers 4.x module lists). Load it with "
            "Transformers 5 to prune it."
        )
    fused = [s for s in config.structures if s in (EXPERTS, MLP_CHANNELS)]
    if fused and config.importance not in EXPERT_CRITERIA:
        raise ValueError(
            f"`importance={config.importance!r}` cannot score {fused} of {model.config.model_type!r}, whose experts are "
            f"fused 3-D tensors; use one of {list(EXPERT_CRITERIA)} ('frequency' ranks experts best on the trained MoE "
            "models of benchmarks/quality.py)."
        )


class Planner:
    """Plans the pruning of one model with one [`PrunerConfig`].

    Args:
        model: the model whose shapes are planned (loaded, dispatched or a meta-device skeleton). Its parameters are
            read when a plan is made, so a model pruned in between (iterative pruning) is planned as it is then.
        spec ([`ArchitectureSpec`]): the family's spec.
        config ([`PrunerConfig`]): validated here against the model; `bias_compensation=None` is resolved.
        params (`dict`, *optional*): parameter shapes to plan with instead of the model's current ones (streaming
            takes them before materialising the embeddings unties a tied LM head).
    """

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, config: PrunerConfig, params: dict | None = None):
        unsupported = [s for s in config.structures if s not in spec.supported_structures]
        if unsupported:
            raise ValueError(
                f"{model.config.model_type} supports structures {list(spec.supported_structures)}, got {unsupported}."
            )
        materialize_derived_fields(model.config, spec)  # divisors such as an implicit `head_dim`
        check_tied_groups(model, spec, config.structures)
        check_expert_criterion(model, spec, config)
        self.model = model
        self.spec = spec
        self.config = config
        self._params = params
        self._align_round_to()
        self._check_round_to()
        self._resolve_bias_compensation()
        self._resolve_reconstruction()

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self._params if self._params is not None else dict(self.model.named_parameters())

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model, self.spec))

    @property
    def width_structures(self) -> list[str]:
        return [s for s in self.config.structures if s != LAYERS]

    def group_sets(self) -> dict[str, GroupSet]:
        """Every width group set of the model (the plan's `unit_counts`), prunable or not."""
        return build_group_sets(self.model, self.spec, self.width_structures)

    def plan(self, all_group_sets, group_sets, scores, kept_counts, removed=(), means=None) -> PruningPlan:
        """The plan: the top-scored units of each prunable group set at its kept count, the removed layers, and with
        `means` (the consumers' calibration input means) the bias means of the removed channels."""
        kept = {
            key: select_top(scores[key], k, group_sets[key].num_groups)
            for key, k in kept_counts.items()
            if k < group_sets[key].num_units
        }
        return PruningPlan(
            self.model.config.model_type,
            self.num_layers,
            unit_counts={key: gs.num_units for key, gs in all_group_sets.items()},
            kept=kept,
            removed_layers=list(removed),
            bias_means=self.bias_means(group_sets, kept, means) if means is not None else {},
            reconstruction=reconstruction_settings(self.config, self.spec, self.model.config),
        )

    def _resolve_reconstruction(self) -> None:
        """`reconstruction=None` left by `PrunerConfig` (which leaves it only for heads and MLP channels scored from
        calibration data, MoE models included) becomes `True` unless the model is offloaded (`device_map` to CPU or
        disk), which reconstruction refuses."""
        if self.config.reconstruction is None:
            offloaded = is_offloaded(self.model)
            self.config.reconstruction = not offloaded
            if offloaded:
                logger.info("Pruning without reconstruction: offloaded model.")

    def _resolve_bias_compensation(self) -> None:
        """`bias_compensation=None` becomes `True` for the `flap` criterion where every consumer (o_proj, down_proj)
        has a bias or the registered type can add one (`spec.bias_fields`), unless the family defaults it off
        (`spec.bias_compensation_default`); an explicit `True` where it cannot work fails here, before calibration."""
        config = self.config
        structures = [s for s in config.structures if s in self.spec.structures]
        layers = decoder_layers(self.model, self.spec)
        missing = []
        for structure in structures:
            for member in self.spec.structures[structure].members:
                if member.consumer and member.dim == 1:
                    path = member.name.rpartition(".")[0]
                    module = layers[0].get_submodule(path) if layers else None
                    if (
                        module is not None
                        and getattr(module, "bias", None) is None
                        and path not in self.spec.bias_fields
                    ):
                        missing.append(path)
        if config.bias_compensation is None:
            config.bias_compensation = (
                config.importance == "flap"
                and bool(structures)
                and not missing
                and self.spec.bias_compensation_default
            )
        elif config.bias_compensation and missing:
            raise ValueError(
                f"`bias_compensation=True` needs an output bias on {missing}, which {self.model.config.model_type!r} "
                "builds without one and its registered type cannot add; set `bias_compensation=False`."
            )

    def _align_round_to(self) -> None:
        """Channel widths of fused experts must stay multiples of `spec.extra["channel_multiple"]`: Transformers 5
        loads MoE checkpoints with its `grouped_mm` experts kernel, which needs 16-byte aligned rows (8 bf16 values),
        and fails on other widths. `round_to` becomes its least common multiple with that (recorded in the config)."""
        multiple = self.spec.extra.get("channel_multiple", 1)
        if multiple == 1 or not set(self.config.structures) & set(CHANNEL_STRUCTURES):
            return
        aligned = math.lcm(self.config.round_to, multiple)
        if aligned != self.config.round_to:
            logger.info(
                "%s: rounding channel widths to multiples of %d (`round_to=%d`) for the grouped experts kernel.",
                self.model.config.model_type,
                aligned,
                self.config.round_to,
            )
            self.config.round_to = aligned

    def _check_round_to(self) -> None:
        """A `round_to` above every channel width it rounds leaves nothing to prune; say so before calibration."""
        structures = [s for s in self.config.structures if s in CHANNEL_STRUCTURES]
        if self.config.round_to == 1 or not structures:
            return
        widest = max(gs.num_units for gs in build_group_sets(self.model, self.spec, structures).values())
        if self.config.round_to > widest:
            raise PruneInputError(
                f"`round_to={self.config.round_to}` is larger than any width it rounds ({', '.join(structures)}: at "
                f"most {widest} channels); use a `round_to` of at most {widest}."
            )

    def kept_counts(self, group_sets, scores=None, removed=()) -> dict[str, int]:
        """Kept units per prunable group set: the allocation `config` asks for (scores are read only by
        `global_ranking` and `allocation="flap"`; the one-pass streaming engine calls this with `scores=None`)."""
        config = self.config
        params, removed, width_structures = self.params, list(removed), self.width_structures
        if config.non_uniform or config.uniform or removed or config.min_heads > 1 or config.min_channels > 1:
            kept = self._allocate_non_uniform(params, group_sets, scores, removed, width_structures)
        else:
            kept = uniform_allocation(
                params, group_sets, width_structures, config.pruning_ratio, config.round_to, config.head_rounding
            )
        self._check_experts_per_token(group_sets, kept)
        return kept

    def experts_per_token(self) -> int:
        """The router's top-k: every MoE layer keeps at least this many experts."""
        return getattr(self.model.config, self.spec.extra.get("experts_per_token_field", "num_experts_per_tok"), 1)

    def _check_experts_per_token(self, group_sets, kept) -> None:
        top_k = self.experts_per_token()
        for key, count in kept.items():
            if group_sets[key].structure == EXPERTS and count < top_k:
                raise ValueError(
                    f"`pruning_ratio={self.config.pruning_ratio}` would keep {count} experts in layer "
                    f"{group_sets[key].layer}, fewer than the {top_k} the router picks per token "
                    "(`num_experts_per_tok`); lower the ratio or add other structures."
                )

    def bias_means(self, group_sets, kept, means) -> dict[str, dict[str, list[float]]]:
        """Calibration means of the removed input channels of every consumer (the plan's `bias_means`)."""
        params = self.params
        out = {}
        for key, units in kept.items():
            gs = group_sets[key]
            entry = {}
            for s, _ in consumer_modules(self.spec, gs):
                index = removed_channels(gs, s, gs.num_units, units, params[s.name].shape[1])
                entry[s.name] = means[s.name][index].tolist()
            if entry:
                out[key] = entry
        return out

    def layers_to_remove(self, scores: dict[str, torch.Tensor], with_width: bool) -> list[int]:
        """Whole layers to remove, lowest score first (`scores` over `layer_group_sets()`). Alone they meet the
        target; with width structures `num_layers_to_remove` of them (default: closest to half the target) go
        first."""
        params = self.params
        num_layers = self.num_layers
        costs = [gs.unit_cost(params) for gs in self.layer_group_sets().values()]
        total = ParameterModel(params, {}).total
        n = self.config.num_layers_to_remove
        if not with_width:
            n = layer_allocation(costs, total, self.config.pruning_ratio)
        elif n is None:
            n = int(round(self.config.pruning_ratio * total / 2 / (sum(costs) / num_layers)))
        if n >= num_layers or sum(sorted(costs)[:n]) / total > self.config.pruning_ratio + TOLERANCE:
            raise ValueError(
                f"Removing {n} of {num_layers} layers removes more than `pruning_ratio={self.config.pruning_ratio}` "
                "of the parameters (or every layer); lower `num_layers_to_remove`."
            )
        layer_scores = torch.stack([scores[f"{LAYERS}.{i}"][0] for i in range(num_layers)])
        return sorted(set(range(num_layers)) - set(select_top(layer_scores, num_layers - n)))

    def prunable(self, group_sets: dict[str, GroupSet], removed=()) -> dict[str, GroupSet]:
        """The group sets that may lose units: in `attention_layers` / `mlp_layers`, not in removed layers."""
        num_layers = self.num_layers
        removed = set(removed)
        allowed = {}
        options = [(s, "attention_layers") for s in HEAD_STRUCTURES] + [(MLP_CHANNELS, "mlp_layers")]
        for structure, name in options:
            layers = getattr(self.config, name)
            if layers is not None and layers[-1] >= num_layers:
                raise ValueError(f"`{name}` names layer {layers[-1]}, but the model has {num_layers} layers.")
            allowed[structure] = set(range(num_layers) if layers is None else layers)
        return {
            key: gs
            for key, gs in group_sets.items()
            if gs.layer is None
            or (gs.layer not in removed and gs.layer in allowed.get(gs.structure, range(num_layers)))
        }

    def _allocate_non_uniform(self, params, group_sets, scores, removed, structures) -> dict[str, int]:
        config = self.config
        num_layers = self.num_layers
        floors = {}
        for key, gs in group_sets.items():
            if gs.structure in HEAD_STRUCTURES:
                attention = self.spec.structures[gs.structure]
                prefix = layer_prefix(self.spec, gs.layer)
                heads = max(width_of(params, self.model.config, w, prefix) for w in attention.widths)
                if config.min_heads > heads:
                    raise ValueError(f"`min_heads={config.min_heads}` exceeds the model's {heads} heads per layer.")
                # Whole units (KV groups), and for tied query heads whole steps of one head per KV group.
                units = math.ceil(config.min_heads / (heads // gs.num_units))
                floors[key] = math.ceil(units / gs.num_groups) * gs.num_groups
            elif gs.structure == EXPERTS:
                floors[key] = min(gs.num_units, self.experts_per_token())
            else:
                floors[key] = min(gs.num_units, math.ceil(config.min_channels / config.round_to) * config.round_to)
        ratios = config.layer_ratios
        if isinstance(ratios, list):
            if len(ratios) != num_layers:
                raise ValueError(f"`layer_ratios` has {len(ratios)} values; the model has {num_layers} layers.")
            ratios = dict(enumerate(ratios))
        if ratios is not None and max(ratios) >= num_layers:
            raise ValueError(f"`layer_ratios` names layer {max(ratios)}, but the model has {num_layers} layers.")
        if config.allocation == "flap":
            mode = "flap"
        else:
            mode = "global" if config.global_ranking else "ratios" if ratios is not None else "uniform"
        described = [
            f"{name}={getattr(config, name)}"
            for name in ("attention_layers", "mlp_layers", "layer_ratios")
            if getattr(config, name) is not None
        ]
        described += [f"removed layers {removed}"] if removed else []
        described += [f"min_heads={config.min_heads}", f"min_channels={config.min_channels}"]
        prefixes = tuple(layer_prefix(self.spec, i) for i in removed)
        allowed = None
        heads = next((s for s in HEAD_STRUCTURES if s in structures), None)
        if config.uniform and heads is not None:
            allowed = {heads: self.stock_unit_counts(group_sets, heads)}
            head_floor = max(floors[k] for k, gs in group_sets.items() if gs.structure == heads)
            if max(allowed[heads], default=0) < head_floor:
                raise ValueError(
                    f"`uniform=True`: no head count of at least `min_heads={config.min_heads}` gives a shape that "
                    f"the stock {type(self.model.config).__name__} accepts; lower `min_heads` or set `uniform=False`."
                )
        return allocate_widths(
            params,
            group_sets,
            structures,
            config.pruning_ratio,
            mode=mode,
            scores=scores,
            layer_ratios=ratios,
            normalization=config.global_normalization,
            floors=floors,
            round_to=config.round_to,
            removed_params=frozenset(n for n in params if prefixes and n.startswith(prefixes)),
            allowed=allowed,
            head_rounding=config.head_rounding,
            constraints=f" with {', '.join(described)}",
        )

    def layer_group_sets(self) -> dict[str, GroupSet]:
        """Each decoder layer as one unit that owns all of its parameters (for layer-level criteria)."""
        group_sets = {}
        for i, layer in enumerate(decoder_layers(self.model, self.spec)):
            prefix = layer_prefix(self.spec, i)
            slices = [Slice(prefix + name, 0) for name, _ in layer.named_parameters()]
            group_sets[f"{LAYERS}.{i}"] = GroupSet(LAYERS, i, 1, slices)
        return group_sets

    def check_per_layer_support(self) -> None:
        """Fail before calibration when the family's registered type cannot store per-layer widths."""
        entry = PRUNED_MODEL_CLASSES.get(self.spec.pruned_model_type)
        if entry is None or not hasattr(entry[0], "per_layer_overrides"):
            supported = sorted(t for t, (c, _) in PRUNED_MODEL_CLASSES.items() if hasattr(c, "per_layer_overrides"))
            raise ValueError(
                f"Per-layer widths (`attention_layers`, `mlp_layers`, `layer_ratios`, `global_ranking`) need a "
                f"registered type with `per_layer_config`; {self.model.config.model_type!r} has none (supported: "
                f"{supported}). Use uniform allocation for this family."
            )

    def stock_unit_counts(self, group_sets: dict[str, GroupSet], structure: str = ATTENTION_HEADS) -> list[int]:
        """Unit counts of head structure `structure` whose widths the model's stock config class accepts
        (`uniform=True` keeps a stock config: LLaMA's, for one, rejects head counts that do not divide
        `hidden_size`). Tied query heads count only in whole steps of one head per KV group."""
        config = self.model.config
        attention = self.spec.structures[structure]
        first = next(gs for gs in group_sets.values() if gs.structure == structure)
        units = first.num_units
        data = {k: v for k, v in config.to_dict().items() if k != "model_type"}
        allowed = []
        for k in range(first.num_groups, units + 1, first.num_groups):
            widths = {w.field: getattr(config, w.field) * k // units for w in attention.widths}
            try:
                candidate = type(config)(**{**data, **widths})
            except Exception:  # noqa: BLE001 - any refusal (strict validation) means "not a stock shape"
                continue
            if fails_transformers_5_validation(candidate):  # under 4.x: a shape that 5.x would refuse
                continue
            allowed.append(k)
        return allowed
