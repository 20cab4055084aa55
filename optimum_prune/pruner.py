"""Pruner: calibrate -> score -> allocate -> plan -> apply. Orchestration only; no tensor slicing here."""

from __future__ import annotations

import gc
import logging
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import ParameterModel, layer_allocation, select_top, uniform_allocation
from .architectures.base import LAYERS, ArchitectureSpec
from .calibration import collect_statistics, prepare_calibration
from .configuration import PrunerConfig
from .evaluation import count_parameters
from .groups import GroupSet, Slice, build_group_sets, decoder_layers, layer_prefix
from .hub import atomic_directory, build_model_card
from .plan import PruningPlan
from .surgery import apply_plan
from .utils.compat import make_checkpoint_portable


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

    def __init__(self, model, spec: ArchitectureSpec, pruner_config: PrunerConfig, tokenizer=None, name_or_path=None):
        unsupported = [s for s in pruner_config.structures if s not in spec.supported_structures]
        if unsupported:
            raise ValueError(
                f"{model.config.model_type} supports structures {list(spec.supported_structures)}, got {unsupported}."
            )
        self.model = model
        self.spec = spec
        self.config = pruner_config
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path or getattr(model, "name_or_path", None) or None
        self.plan: PruningPlan | None = None
        self.params_before = count_parameters(model)
        self.params_after: int | None = None

    @property
    def is_pruned(self) -> bool:
        return self.plan is not None

    def prune(self, calibration_data=None) -> nn.Module:
        """Score, allocate and apply; returns the pruned model (the same object, smaller)."""
        if self.is_pruned:
            raise RuntimeError("This pruner has already pruned its model; build a new one to prune again.")
        importance = self.config.build_importance()
        batches = None
        if importance.needs_data:
            if calibration_data is None:
                raise ValueError(
                    f"The {importance.name!r} criterion needs calibration data (`calibration_data=`); "
                    "'magnitude' and 'random' need none."
                )
            batches = prepare_calibration(
                calibration_data,
                self.tokenizer,
                self.config.num_calibration_samples,
                self.config.calibration_seq_len,
                seed=self.config.seed,
            )
        self.plan = self.make_plan(importance, batches)
        apply_plan(self.model, self.plan, self.spec)
        self.params_after = count_parameters(self.model)
        logger.info(
            "Pruned %s: %d -> %d parameters (%.2f%% removed).",
            self.name_or_path,
            self.params_before,
            self.params_after,
            100 * (1 - self.params_after / self.params_before),
        )
        return self.model

    def make_plan(self, importance, batches) -> PruningPlan:
        """Score every group set and allocate widths; the model is left untouched."""
        structures = self.config.structures
        num_layers = len(decoder_layers(self.model, self.spec))
        if LAYERS in structures:
            group_sets = self._layer_group_sets()
        else:
            group_sets = build_group_sets(self.model, self.spec, structures)
        names = {s.name for gs in group_sets.values() for s in gs.slices}
        stats = collect_statistics(self.model, batches, importance.needs, param_names=names)
        scores = {
            key: importance.score(gs, stats).float()
            for key, gs in tqdm(group_sets.items(), desc=f"Scoring ({importance.name})", leave=False)
        }
        del stats
        gc.collect()
        params = dict(self.model.named_parameters())
        if LAYERS in structures:
            costs = [gs.unit_cost(params) for gs in group_sets.values()]
            n = layer_allocation(costs, ParameterModel(params, {}).total, self.config.pruning_ratio)
            layer_scores = torch.stack([scores[f"{LAYERS}.{i}"][0] for i in range(num_layers)])
            removed = sorted(set(range(num_layers)) - set(select_top(layer_scores, num_layers - n)))
            return PruningPlan(self.model.config.model_type, num_layers, removed_layers=removed)
        kept_counts = uniform_allocation(
            params, group_sets, structures, self.config.pruning_ratio, self.config.round_to
        )
        kept = {key: select_top(scores[key], k) for key, k in kept_counts.items() if k < group_sets[key].num_units}
        counts = {key: gs.num_units for key, gs in group_sets.items()}
        return PruningPlan(self.model.config.model_type, num_layers, unit_counts=counts, kept=kept)

    def _layer_group_sets(self) -> dict[str, GroupSet]:
        """Each decoder layer as one unit that owns all of its parameters (for layer-level criteria)."""
        group_sets = {}
        for i, layer in enumerate(decoder_layers(self.model, self.spec)):
            prefix = layer_prefix(self.spec, i)
            slices = [Slice(prefix + name, 0) for name, _ in layer.named_parameters()]
            group_sets[f"{LAYERS}.{i}"] = GroupSet(LAYERS, i, 1, slices)
        return group_sets

    def model_card(self, repo_or_path: str = "path/to/pruned-model", results=None, license=None):
        self._check_pruned()
        return build_model_card(
            base_model=self.name_or_path,
            pruner_config=self.config,
            plan=self.plan,
            model_config=self.model.config,
            params_before=self.params_before,
            params_after=self.params_after,
            results=results,
            repo_or_path=repo_or_path,
            license=license,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, results: list[dict] | None = None, **kwargs) -> None:
        """Write weights (safetensors), config, tokenizer, `pruner_config.json`, `pruning_plan.json` and a model card.

        Atomic: everything is written to a temporary sibling directory that replaces `save_directory` only when all
        files are written, so a failure leaves no partial directory behind.
        """
        self._check_pruned()
        with atomic_directory(save_directory) as tmp:
            self.model.save_pretrained(tmp, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            make_checkpoint_portable(tmp)  # loads under Transformers 4.57 too
            self.config.save_pretrained(tmp)
            self.plan.save_pretrained(tmp)
            self.model_card(repo_or_path=str(save_directory), results=results).save(os.path.join(tmp, "README.md"))

    def _check_pruned(self):
        if not self.is_pruned:
            raise RuntimeError("Call `prune()` first.")
