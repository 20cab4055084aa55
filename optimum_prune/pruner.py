"""Pruner: calibrate -> score -> allocate -> plan -> apply. Orchestration only; no tensor slicing here."""

from __future__ import annotations

import gc
import logging
import math
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import (
    CHANNEL_STRUCTURES,
    TOLERANCE,
    ParameterModel,
    allocate_widths,
    layer_allocation,
    select_top,
    uniform_allocation,
)
from .architectures.base import ATTENTION_HEADS, HEAD_STRUCTURES, LAYERS, MLP_CHANNELS, ArchitectureSpec
from .calibration import collect_statistics, prepare_calibration
from .configuration import PrunerConfig
from .errors import PruneInputError
from .evaluation import checkpoint_bytes, count_parameters
from .groups import GroupSet, Slice, build_group_sets, check_tied_groups, decoder_layers, layer_prefix, width_of
from .hub import (
    CHART_NAME,
    build_model_card,
    count_macs_per_token,
    plan_is_uniform,
    plot_layer_widths,
    read_results,
    write_results,
)
from .importance.base import ACTIVATIONS
from .inputs import check_model_source, check_seq_len, load_causal_lm
from .offload import apply_plan_dispatched, is_offloaded, keep_tied_weights
from .output_dir import atomic_directory
from .plan import PruningPlan
from .utils.compat import fails_transformers_5_validation, make_checkpoint_portable
from .utils.safe_weights import weights_loading_kwargs


logger = logging.getLogger(__name__)


class Pruner:
    """Prunes one model with one [`PrunerConfig`]. Build it with [`AutoPruner`].

    Example:

    ```python
    >>> pruner = AutoPruner.from_pretrained("path/to/model", pruner_config=PrunerConfig(importance="magnitude"))
    >>> model = pruner.prune()
    >>> pruner.save_pretrained("out/")
    ```
    """

    def __init__(
        self,
        model,
        spec: ArchitectureSpec,
        pruner_config: PrunerConfig,
        tokenizer=None,
        name_or_path=None,
        offload_folder: str | None = None,
    ):
        unsupported = [s for s in pruner_config.structures if s not in spec.supported_structures]
        if unsupported:
            raise ValueError(
                f"{model.config.model_type} supports structures {list(spec.supported_structures)}, got {unsupported}."
            )
        keep_tied_weights(model)  # an offloaded model's forward unties them (see `offload.keep_tied_weights`)
        check_tied_groups(model, spec, pruner_config.structures)
        self.model = model
        self.spec = spec
        self.config = pruner_config
        self._check_round_to()
        self._resolve_bias_compensation()
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path or getattr(model, "name_or_path", None) or None
        self.plan: PruningPlan | None = None
        self.params_before = count_parameters(model)
        self.params_after: int | None = None
        self.macs_before = count_macs_per_token(model)
        self.calibration_source: str | None = None  # described in the model card and its reproducing command
        self.evaluation: dict = {}  # perplexities measured by `evaluate` / `recover` (see `hub.build_model_card`)
        self.recovery: dict | None = None  # LoRA settings and training figures once `recover` ran
        # Under `device_map` with "disk" modules, the pruned model's offloaded weights go to a folder inside this one.
        self.offload_folder = offload_folder

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

    @property
    def is_pruned(self) -> bool:
        return self.plan is not None

    def prune(self, calibration_data=None) -> nn.Module:
        """Score, allocate and apply; returns the pruned model (the same object, smaller)."""
        if self.is_pruned:
            raise RuntimeError("This pruner has already pruned its model; build a new one to prune again.")
        importance = self.config.build_importance()
        batches = self._calibration_batches(importance, calibration_data)
        if self.config.iterative_steps > 1:
            self.plan = self._prune_iteratively(importance, batches)
            return self._record_pruned()
        return self.apply_plan(self.make_plan(importance, batches))

    def apply_plan(self, plan: PruningPlan) -> nn.Module:
        """Prune the model as `plan` says (from [`~Pruner.compute_plan`] or `PruningPlan.from_pretrained`) and keep
        it as this pruner's result, so `save_pretrained` writes the plan, config and card; returns the model."""
        if self.is_pruned:
            raise RuntimeError("This pruner has already pruned its model; build a new one to prune again.")
        apply_plan_dispatched(self.model, plan, self.spec, self.offload_folder)
        self.plan = plan
        return self._record_pruned()

    def _record_pruned(self) -> nn.Module:
        self.params_after = count_parameters(self.model)
        logger.info(
            "Pruned %s: %d -> %d parameters (%.2f%% removed).",
            self.name_or_path,
            self.params_before,
            self.params_after,
            100 * (1 - self.params_after / self.params_before),
        )
        return self.model

    def compute_plan(self, calibration_data=None) -> PruningPlan:
        """Score and allocate as [`~Pruner.prune`] does, and return the plan; the model is left untouched.

        With a model too large to prune in place (offloaded to disk with `device_map`), write the pruned checkpoint
        from the original shards layer by layer: `prune_streaming(model_dir, pruner.config, plan=plan,
        output_dir=...)`. Not for `iterative_steps > 1`, whose later steps score the pruned model."""
        if self.config.iterative_steps > 1:
            raise ValueError(
                f"`iterative_steps={self.config.iterative_steps}` scores the model pruned by the earlier steps, so its "
                "plan exists only after pruning: call `prune()` and read `pruner.plan`."
            )
        importance = self.config.build_importance()
        return self.make_plan(importance, self._calibration_batches(importance, calibration_data))

    def _calibration_batches(self, importance, calibration_data) -> torch.Tensor | None:
        """The calibration token windows, when the criterion, the layer scorer or bias compensation needs them."""
        self.calibration_source = _describe_data(calibration_data)
        if not (importance.needs_data or self._layer_scorer_needs_data() or self.config.bias_compensation):
            return None
        if calibration_data is None:
            if not (importance.needs_data or self._layer_scorer_needs_data()):
                raise ValueError(
                    "`bias_compensation=True` needs calibration data (`calibration_data=`): it folds the mean "
                    "activations of removed channels into biases. Pass data or set `bias_compensation=False`."
                )
            name = importance.name if importance.needs_data else self.config.layer_scorer().name
            raise ValueError(
                f"The {name!r} criterion needs calibration data (`calibration_data=`); "
                "'magnitude' and 'random' need none."
            )
        check_seq_len(self.config.calibration_seq_len, self.model.config)
        return prepare_calibration(
            calibration_data,
            self.tokenizer,
            self.config.num_calibration_samples,
            self.config.calibration_seq_len,
            seed=self.config.seed,
        )

    def _prune_iteratively(self, importance, batches) -> PruningPlan:
        """Prune in `iterative_steps` steps, re-scoring the current model before each; returns one plan whose
        indices refer to the original model (each step's kept indices mapped through the previous steps').

        Allocation meets a fraction of the *current* model's total, so the original-model target of step k,
        `ratio * k / N`, becomes `1 - (1 - ratio * k / N) * P0 / P_current`.
        """
        config = self.config
        if config.bias_compensation:
            raise ValueError(
                f"`iterative_steps={config.iterative_steps}` cannot compose bias compensation across steps "
                f"(`importance={config.importance!r}` turns it on by default); set `bias_compensation=False`."
            )
        steps = config.iterative_steps
        ratio = config.pruning_ratio
        model_type = self.model.config.model_type  # before surgery may switch to the registered pruned type
        num_layers = len(decoder_layers(self.model, self.spec))
        counts = {key: gs.num_units for key, gs in build_group_sets(self.model, self.spec, config.structures).items()}
        original = {key: list(range(n)) for key, n in counts.items()}
        kept = dict(original)  # original indices of the units the current model still has, per group set
        total_before = ParameterModel(dict(self.model.named_parameters()), {}).total
        for k in range(1, steps + 1):
            total = ParameterModel(dict(self.model.named_parameters()), {}).total
            step_ratio = 1 - (1 - ratio * k / steps) * total_before / total
            if step_ratio <= 0:
                logger.info("Iterative step %d/%d: nothing left to remove.", k, steps)
                continue
            logger.info("Iterative step %d/%d: removing %.2f%% of the current model.", k, steps, 100 * step_ratio)
            try:
                config.pruning_ratio = step_ratio
                plan = self.make_plan(importance, batches)
            finally:
                config.pruning_ratio = ratio
            apply_plan_dispatched(self.model, plan, self.spec, self.offload_folder)
            for key, step_kept in plan.kept.items():
                if plan.unit_counts[key] != len(kept[key]):
                    raise RuntimeError(
                        f"Step {k} saw {plan.unit_counts[key]} units in {key!r}, expected {len(kept[key])}."
                    )
                kept[key] = [kept[key][i] for i in step_kept]
        return PruningPlan(
            model_type,
            num_layers,
            unit_counts=counts,
            kept={key: units for key, units in kept.items() if len(units) < counts[key]},
        )

    def _layer_scorer_needs_data(self) -> bool:
        return LAYERS in self.config.structures and self.config.layer_scorer().needs_data

    def make_plan(self, importance, batches) -> PruningPlan:
        """Score every group set and allocate widths (and whole layers); the model is left untouched."""
        config = self.config
        if config.non_uniform:
            self._check_per_layer_support()
        num_layers = len(decoder_layers(self.model, self.spec))
        width_structures = [s for s in config.structures if s != LAYERS]
        params = dict(self.model.named_parameters())
        removed: list[int] = []
        if LAYERS in config.structures:
            removed = self._choose_layers(batches, params, num_layers, bool(width_structures))
            if not width_structures:
                return PruningPlan(self.model.config.model_type, num_layers, removed_layers=removed)
        all_group_sets = build_group_sets(self.model, self.spec, width_structures)
        group_sets = self._prunable(all_group_sets, num_layers, set(removed))
        means: dict[str, torch.Tensor] | None = {} if config.bias_compensation else None
        scores = self._score(importance, group_sets, batches, means)
        kept_counts = self._kept_counts(params, group_sets, scores, removed, width_structures)
        kept = {
            key: select_top(scores[key], k, group_sets[key].num_groups)
            for key, k in kept_counts.items()
            if k < group_sets[key].num_units
        }
        counts = {key: gs.num_units for key, gs in all_group_sets.items()}
        bias_means = self._bias_means(group_sets, kept, means) if means is not None else {}
        return PruningPlan(
            self.model.config.model_type,
            num_layers,
            unit_counts=counts,
            kept=kept,
            removed_layers=removed,
            bias_means=bias_means,
        )

    def _kept_counts(self, params, group_sets, scores, removed, width_structures) -> dict[str, int]:
        """Kept units per prunable group set: the allocation `config` asks for (scores are read only by
        `global_ranking` and `allocation="flap"`; the streaming path calls this with `scores=None` otherwise)."""
        config = self.config
        if config.non_uniform or config.uniform or removed or config.min_heads > 1 or config.min_channels > 1:
            return self._allocate_non_uniform(params, group_sets, scores, removed, width_structures)
        return uniform_allocation(params, group_sets, width_structures, config.pruning_ratio, config.round_to)

    def _bias_means(self, group_sets, kept, means) -> dict[str, dict[str, list[float]]]:
        """Calibration means of the removed input channels of every consumer (the plan's `bias_means`)."""
        from .surgery import consumer_modules, removed_channels

        params = dict(self.model.named_parameters())
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

    def _score(self, importance, group_sets: dict[str, GroupSet], batches, means=None) -> dict[str, torch.Tensor]:
        """Scores per group set. With a `means` dict, also the per-channel calibration mean of every consumer's input
        ([in_features], float64; bias compensation), collected in the same pass."""
        names = {s.name for gs in group_sets.values() for s in gs.slices}
        needs = set(importance.needs) | ({ACTIVATIONS} if means is not None else set())
        stats = collect_statistics(self.model, batches, needs, param_names=names)
        scores = {
            key: importance.score(gs, stats).float()
            for key, gs in tqdm(group_sets.items(), desc=f"Scoring ({importance.name})", leave=False)
        }
        if means is not None:
            for gs in group_sets.values():
                for s in gs.slices:
                    if s.consumer and s.dim == 1:
                        record = stats.activation(s.name)
                        means[s.name] = record.sum.double().cpu() / max(record.count, 1)  # [in]
        del stats
        gc.collect()
        return scores

    def _choose_layers(self, batches, params, num_layers: int, with_width: bool) -> list[int]:
        """Whole layers to remove, lowest `layer_importance` first. Alone they meet the target; with width
        structures `num_layers_to_remove` of them (default: closest to half the target) go first."""
        layer_sets = self._layer_group_sets()
        scorer = self.config.layer_scorer()
        if scorer.needs_data and batches is None:
            raise ValueError(f"The layer criterion {scorer.name!r} needs calibration data (`calibration_data=`).")
        scores = self._score(scorer, layer_sets, batches)
        costs = [gs.unit_cost(params) for gs in layer_sets.values()]
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
        removed = sorted(set(range(num_layers)) - set(select_top(layer_scores, num_layers - n)))
        logger.info("Removing decoder layers %s (scored by %s).", removed, scorer.name)
        return removed

    def _prunable(self, group_sets: dict[str, GroupSet], num_layers: int, removed: set[int]) -> dict[str, GroupSet]:
        """The group sets that may lose units: in `attention_layers` / `mlp_layers`, not in removed layers."""
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
        num_layers = len(decoder_layers(self.model, self.spec))
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
            allowed = {heads: self._stock_unit_counts(group_sets, heads)}
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
            constraints=f" with {', '.join(described)}",
        )

    def _layer_group_sets(self) -> dict[str, GroupSet]:
        """Each decoder layer as one unit that owns all of its parameters (for layer-level criteria)."""
        group_sets = {}
        for i, layer in enumerate(decoder_layers(self.model, self.spec)):
            prefix = layer_prefix(self.spec, i)
            slices = [Slice(prefix + name, 0) for name, _ in layer.named_parameters()]
            group_sets[f"{LAYERS}.{i}"] = GroupSet(LAYERS, i, 1, slices)
        return group_sets

    def _check_per_layer_support(self) -> None:
        """Fail before calibration when the family's registered type cannot store per-layer widths."""
        from .modeling import PRUNED_MODEL_CLASSES

        entry = PRUNED_MODEL_CLASSES.get(self.spec.pruned_model_type)
        if entry is None or not hasattr(entry[0], "per_layer_overrides"):
            supported = sorted(t for t, (c, _) in PRUNED_MODEL_CLASSES.items() if hasattr(c, "per_layer_overrides"))
            raise ValueError(
                f"Per-layer widths (`attention_layers`, `mlp_layers`, `layer_ratios`, `global_ranking`) need a "
                f"registered type with `per_layer_config`; {self.model.config.model_type!r} has none (supported: "
                f"{supported}). Use uniform allocation for this family."
            )

    def _stock_unit_counts(self, group_sets: dict[str, GroupSet], structure: str = ATTENTION_HEADS) -> list[int]:
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

    @property
    def stage(self) -> str:
        """`"base"` before pruning, `"pruned"` after, `"recovered"` after [`Pruner.recover`]."""
        return "recovered" if self.recovery is not None else "pruned" if self.is_pruned else "base"

    def evaluate(self, eval_data, seq_len: int = 256, max_windows: int | None = 64) -> float:
        """Perplexity of the model now (see [`optimum_prune.perplexity`]), recorded for the current stage.

        Call it before `prune()` to record the base perplexity; the model card and [`Pruner.recover`] report every
        stage measured on the same text. Measuring on other text (or settings) starts a new record.
        """
        from .evaluation import perplexity

        setup = {"eval_data": _describe_data(eval_data), "eval_seq_len": seq_len, "eval_windows": max_windows}
        if any(self.evaluation.get(k) != v for k, v in setup.items()):
            self.evaluation = dict(setup)
        value = perplexity(self.model, eval_data, self.tokenizer, seq_len=seq_len, max_windows=max_windows)
        self.evaluation[f"perplexity_{self.stage}"] = value
        logger.info("Perplexity (%s): %.3f on %s.", self.stage, value, setup["eval_data"])
        return value

    def model_card(self, repo_or_path: str = "path/to/pruned-model", results=None, license=None, chart=None):
        """The [`huggingface_hub.ModelCard`] saved as README.md (see `hub.build_model_card`)."""
        self._check_pruned()
        return build_model_card(
            base_model=self.name_or_path,
            pruner_config=self.config,
            plan=self.plan,
            model_config=self.model.config,
            params_before=self.params_before,
            params_after=self.params_after,
            macs_before=self.macs_before,
            macs_after=count_macs_per_token(self.model),
            evaluation=self.evaluation,
            recovery=self.recovery,
            results=results,
            repo_or_path=repo_or_path,
            calibration=self.calibration_source,
            license=license,
            chart=chart,
        )

    def summary(self) -> dict:
        """What `pruning_results.json` holds: the base, the sizes, the measured perplexities and the recovery."""
        self._check_pruned()
        return {
            "base_model": self.name_or_path,
            "calibration_data": self.calibration_source,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_per_token_before": self.macs_before,
            "macs_per_token_after": count_macs_per_token(self.model),
            "evaluation": self.evaluation,
            "recovery": self.recovery,
        }

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        results: list[dict] | None = None,
        repo_or_path: str | None = None,
        overwrite: bool = False,
        **kwargs,
    ) -> None:
        """Write weights (safetensors), config, tokenizer, `pruner_config.json`, `pruning_plan.json`,
        `pruning_results.json`, a model card and, for non-uniform plans, the per-layer width chart it shows.

        Atomic: everything is written to a temporary sibling directory that replaces `save_directory` only when all
        files are written, so a failure leaves no partial directory behind. A non-empty `save_directory` is replaced
        only when it is a previous optimum-prune output; `overwrite=True` allows any other directory, and then only
        the checkpoint's own files in it are replaced. The input model's directory, its ancestors and the working
        directory are always refused (see `output_dir.check_output_directory`). `repo_or_path` is the name the
        card's loading code uses (defaults to `save_directory`; `push_to_hub` passes the repo id).
        """
        self._check_pruned()
        inputs = (self.name_or_path, getattr(self.model, "name_or_path", None))
        with atomic_directory(save_directory, inputs, overwrite, expected_bytes=checkpoint_bytes(self.model)) as tmp:
            self.model.save_pretrained(tmp, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            make_checkpoint_portable(tmp)  # loads under Transformers 4.57 too
            self.config.save_pretrained(tmp)
            self.plan.save_pretrained(tmp)
            write_results(tmp, self.summary())
            chart = None
            if not plan_is_uniform(self.plan) and plot_layer_widths(self.plan, os.path.join(tmp, CHART_NAME)):
                chart = CHART_NAME
            card = self.model_card(repo_or_path=repo_or_path or str(save_directory), results=results, chart=chart)
            card.save(os.path.join(tmp, "README.md"))

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ):
        """Upload the pruned checkpoint (everything `save_pretrained` writes) to the Hub in one commit.

        Args:
            repo_id (`str`): `"user/name"`; created if missing.
            private (`bool`, *optional*): visibility of a newly created repo.
            token (`str`, *optional*): defaults to the cached login / `HF_TOKEN`. Only sent in the Authorization
                header; never written to the card, the files or the logs.
            revision (`str`, *optional*): branch to commit to; created from `main` when it does not exist.
            commit_message (`str`, *optional*)
            create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing.

        Returns:
            `huggingface_hub.CommitInfo` (its `pr_url` is set when `create_pr=True`).

        Example:

        ```python
        >>> pruner.push_to_hub("me/tiny-llama-pruned-40", private=True)
        ```
        """
        import tempfile

        from .hub import push_folder_to_hub

        self._check_pruned()
        with tempfile.TemporaryDirectory(prefix="optimum-prune-push-") as tmp:
            folder = os.path.join(tmp, "model")
            self.save_pretrained(folder, repo_or_path=repo_id)
            message = commit_message or (
                f"Upload {self.model.config.model_type} pruned {self.config.pruning_ratio:.0%} "
                f"({self.config.importance}) with optimum-prune"
            )
            return push_folder_to_hub(
                folder,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                commit_message=message,
                create_pr=create_pr,
            )

    def recover(
        self,
        train_data,
        lora_config=None,
        training_args=None,
        eval_data=None,
        *,
        block_size: int = 256,
        eval_seq_len: int = 256,
        eval_windows: int | None = 64,
    ) -> dict:
        """LoRA recovery of the pruned model with the Transformers `Trainer`, merged back into plain weights.

        Args:
            train_data: the same inputs as calibration data (a .txt/.jsonl path, a list of strings, a
                `datasets.Dataset`, token ids), concatenated and cut into blocks of `block_size` tokens.
            lora_config (`peft.LoraConfig`, *optional*): defaults to r=8, alpha=16 on the architecture's
                `lora_target_modules` (every attention and MLP projection).
            training_args (`transformers.TrainingArguments` or `dict`, *optional*): a dict overrides the defaults
                (60 steps, batch 8, lr 1e-3; `recovery.DEFAULT_TRAINING_ARGS`), an instance is used as is. Mixed
                precision, gradient checkpointing and `accelerate launch` (DDP, FSDP, DeepSpeed) are configured here.
            eval_data (*optional*): text for perplexity after pruning and after recovery (and before pruning, when
                [`Pruner.evaluate`] measured it on the same text).

        Returns:
            `dict` with `perplexity_base` (if known), `perplexity_pruned`, `perplexity_recovered` (with `eval_data`)
            and the training figures (`train_loss`, `first_logged_loss`, `last_logged_loss`, `train_runtime`).

        Example:

        ```python
        >>> pruner.prune(calibration_data="calibration.txt")
        >>> pruner.recover("train.txt", eval_data="eval.txt", training_args={"max_steps": 60, "bf16": True})
        ```
        """
        from .recovery import recover_model

        self._check_pruned()
        if self.recovery is not None:
            raise RuntimeError("This model was already recovered; build a new pruner to recover again.")
        if is_offloaded(self.model):
            raise ValueError(
                "LoRA recovery trains with the weights on its training devices, and this model has weights offloaded "
                "to the CPU or disk (`device_map`); save it with `save_pretrained` and recover the checkpoint with "
                "`optimum-prune recover` (several GPUs: `accelerate launch -m optimum_prune.commands.cli recover ...`)."
            )
        if eval_data is not None and (
            self.evaluation.get("perplexity_pruned") is None
            or self.evaluation.get("eval_data") != _describe_data(eval_data)
        ):
            self.evaluate(eval_data, eval_seq_len, eval_windows)
        self.model, info = recover_model(
            self.model,
            train_data,
            self.spec,
            tokenizer=self.tokenizer,
            lora_config=lora_config,
            training_args=training_args,
            block_size=block_size,
        )
        info["train_data"] = _describe_data(train_data)
        self.recovery = info
        if eval_data is not None:
            self.evaluate(eval_data, eval_seq_len, eval_windows)
        report = {k: v for k, v in self.evaluation.items() if k.startswith("perplexity_")}
        report.update({k: info[k] for k in ("train_loss", "first_logged_loss", "last_logged_loss", "train_runtime")})
        logger.info(
            "Recovery done: %s.",
            ", ".join(f"{k} {v:.3f}" for k, v in report.items() if isinstance(v, float)),
        )
        return report

    @classmethod
    def from_pruned(cls, path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs) -> Pruner:
        """Reload a saved pruned checkpoint as a pruned [`Pruner`] (to recover, re-save or push it).

        kwargs go to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, ...). The base's parameter and MAC
        counts and the measured perplexities come back from `pruning_results.json`. Pickled weights are refused
        unless `allow_pickle=True` (unpickling can execute code).
        """
        from transformers import AutoTokenizer

        from . import modeling  # noqa: F401 - registers the pruned model types
        from .architectures.base import get_architecture
        from .plan import PLAN_NAME

        check_model_source(path)
        if not os.path.isfile(os.path.join(path, PLAN_NAME)):
            raise ValueError(f"{path} is not a pruned checkpoint (no {PLAN_NAME}); prune it with `AutoPruner` first.")
        safe_kwargs = weights_loading_kwargs(path, allow_pickle)
        model = load_causal_lm(path, **{**kwargs, **safe_kwargs})
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            tokenizer = None
        spec = get_architecture(getattr(model.config, "base_model_type", None) or model.config.model_type)
        saved = read_results(path)
        pruner = cls(
            model, spec, PrunerConfig.from_pretrained(path), tokenizer, name_or_path=saved.get("base_model") or None
        )
        pruner.plan = PruningPlan.from_pretrained(path)
        pruner.params_after = count_parameters(model)
        pruner.params_before = saved.get("params_before", pruner.params_after)
        pruner.macs_before = saved.get("macs_per_token_before", pruner.macs_before)
        pruner.calibration_source = saved.get("calibration_data")
        pruner.evaluation = saved.get("evaluation") or {}
        pruner.recovery = saved.get("recovery")
        return pruner

    def _check_pruned(self):
        if not self.is_pruned:
            raise RuntimeError("Call `prune()` first.")


def _describe_data(data) -> str | None:
    """A short, human-readable name for user data (a file path as given, else its kind and size) for cards."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)) and os.path.isfile(data):
        return os.fspath(data)
    if isinstance(data, str):
        return f"a string of {len(data)} characters"
    if isinstance(data, torch.Tensor):
        return f"token ids {list(data.shape)}"
    if hasattr(data, "column_names"):
        return f"a datasets.Dataset of {len(data)} rows"
    if isinstance(data, (list, tuple)):
        return f"a list of {len(data)} texts"
    return type(data).__name__
