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
from .hub import (
    CHART_NAME,
    atomic_directory,
    build_model_card,
    count_macs_per_token,
    plan_is_uniform,
    plot_layer_widths,
    read_results,
    write_results,
)
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
        self.macs_before = count_macs_per_token(model)
        self.calibration_source: str | None = None  # described in the model card and its reproducing command
        self.evaluation: dict = {}  # perplexities measured by `evaluate` / `recover` (see `hub.build_model_card`)
        self.recovery: dict | None = None  # LoRA settings and training figures once `recover` ran

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
        self.calibration_source = _describe_data(calibration_data)
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
        **kwargs,
    ) -> None:
        """Write weights (safetensors), config, tokenizer, `pruner_config.json`, `pruning_plan.json`,
        `pruning_results.json`, a model card and, for non-uniform plans, the per-layer width chart it shows.

        Atomic: everything is written to a temporary sibling directory that replaces `save_directory` only when all
        files are written, so a failure leaves no partial directory behind. `repo_or_path` is the name the card's
        loading code uses (defaults to `save_directory`; `push_to_hub` passes the repo id).
        """
        self._check_pruned()
        with atomic_directory(save_directory) as tmp:
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
    def from_pruned(cls, path: str | os.PathLike, **kwargs) -> Pruner:
        """Reload a saved pruned checkpoint as a pruned [`Pruner`] (to recover, re-save or push it).

        kwargs go to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, ...). The base's parameter and MAC
        counts and the measured perplexities come back from `pruning_results.json`.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from . import modeling  # noqa: F401 - registers the pruned model types
        from .architectures.base import get_architecture
        from .plan import PLAN_NAME

        if not os.path.isfile(os.path.join(path, PLAN_NAME)):
            raise ValueError(f"{path} is not a pruned checkpoint (no {PLAN_NAME}); prune it with `AutoPruner` first.")
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
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
