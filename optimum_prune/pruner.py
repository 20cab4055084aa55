"""Pruner: calibrate -> score -> allocate -> plan -> apply. Orchestration only; no tensor slicing here."""

from __future__ import annotations

import gc
import logging
import os
import tempfile

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import modeling  # noqa: F401 - registers the pruned model types (`from_pruned` loads them)
from .allocation import (
    ParameterModel,
)
from .architectures.base import LAYERS, ArchitectureSpec, get_architecture
from .calibration import collect_statistics, prepare_calibration
from .compute_dtype import compute_in, resolve_compute_dtype
from .configuration import PrunerConfig
from .groups import GroupSet, build_group_sets, decoder_layers
from .hub import count_macs_per_token, push_folder_to_hub, read_results
from .importance.base import ACTIVATIONS
from .inputs import check_model_source, check_seq_len, load_causal_lm
from .metrics import count_parameters, perplexity
from .offload import apply_plan_dispatched, input_device, is_offloaded, keep_tied_weights
from .output_dir import atomic_directory, checkpoint_bytes
from .plan import PLAN_NAME, PruningPlan
from .planner import Planner
from .reconstruction import reconstruct_model
from .recovery import DistillationConfig, check_recovery_method, recover_model
from .streaming import capture_layer_inputs
from .utils.safe_weights import weights_loading_kwargs
from .writer import describe_data, run_summary, summary_card, write_run_files


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
        keep_tied_weights(model)  # an offloaded model's forward unties them (see `offload.keep_tied_weights`)
        self.planner = Planner(model, spec, pruner_config)  # validates the config against the model
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
        # Under `device_map` with "disk" modules, the pruned model's offloaded weights go to a folder inside this one.
        self.offload_folder = offload_folder

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
        return self._apply(self.make_plan(importance, batches), batches)

    def apply_plan(self, plan: PruningPlan, calibration_data=None) -> nn.Module:
        """Prune the model as `plan` says (from [`~Pruner.compute_plan`] or `PruningPlan.from_pretrained`) and keep
        it as this pruner's result, so `save_pretrained` writes the plan, config and card; returns the model.

        A plan made with reconstruction (`plan.reconstruction`) refits the consumer weights first, on
        `calibration_data` (the data the plan was made with, sampled with this pruner's config and seed)."""
        if self.is_pruned:
            raise RuntimeError("This pruner has already pruned its model; build a new one to prune again.")
        batches = self._reconstruction_batches(calibration_data) if plan.reconstruction else None
        return self._apply(plan, batches)

    def _reconstruction_batches(self, calibration_data) -> torch.Tensor:
        """The calibration windows a reconstruction plan is refit on (a clear error without data)."""
        if calibration_data is None:
            raise ValueError(
                "This plan was made with reconstruction (refit consumer weights), which needs the calibration data "
                "it was made with: pass `calibration_data=`."
            )
        self.calibration_source = describe_data(calibration_data)
        check_seq_len(self.config.calibration_seq_len, self.model.config)
        return prepare_calibration(
            calibration_data,
            self.tokenizer,
            self.config.num_calibration_samples,
            self.config.calibration_seq_len,
            seed=self.config.seed,
        )

    def _apply(self, plan: PruningPlan, batches: torch.Tensor | None) -> nn.Module:
        """Refit the consumers when the plan says so, then slice the model as the plan says."""
        if plan.reconstruction:
            self._reconstruct(plan, batches)
        apply_plan_dispatched(self.model, plan, self.spec, self.offload_folder)
        self.plan = plan
        return self._record_pruned()

    def _reconstruct(self, plan: PruningPlan, batches: torch.Tensor) -> None:
        """Refit every pruned consumer layer by layer on the calibration windows (see `optimum_prune.reconstruction`),
        before surgery slices the model."""
        if is_offloaded(self.model):
            raise ValueError(
                "Reconstruction runs every decoder layer twice per calibration batch on its own device, and this model "
                "has weights offloaded to the CPU or disk (`device_map`); load it on one device, or stream it with "
                "`prune_streaming(..., plan=plan, calibration_data=...)`."
            )
        device = next(self.model.parameters()).device
        with self._computing():  # the first layer's inputs in the compute dtype, as streaming captures them
            full = capture_layer_inputs(self.model, self.spec, batches.to(device))
        dtype = resolve_compute_dtype(self.config.compute_dtype, self.model.dtype, input_device(self.model))
        reconstruct_model(self.model, self.spec, plan, full, compute_dtype=dtype)

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
        self.calibration_source = describe_data(calibration_data)
        needs = (importance.needs_data, self._layer_scorer_needs_data(), self.config.bias_compensation)
        if not (any(needs) or self.config.reconstruction):
            return None
        if calibration_data is None:
            if self.config.reconstruction and not any(needs):
                raise ValueError(
                    "`reconstruction=True` needs calibration data (`calibration_data=`): it refits the consumer "
                    "weights so the pruned layers' outputs match the unpruned ones on it."
                )
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
        """Score every group set and let the planner allocate widths (and whole layers); the model is untouched."""
        planner = self.planner
        if self.config.non_uniform:
            planner.check_per_layer_support()
        width_structures = planner.width_structures
        removed: list[int] = []
        if LAYERS in self.config.structures:
            removed = self._choose_layers(batches, bool(width_structures))
            if not width_structures:
                return PruningPlan(self.model.config.model_type, planner.num_layers, removed_layers=removed)
        all_group_sets = planner.group_sets()
        group_sets = planner.prunable(all_group_sets, removed)
        means: dict[str, torch.Tensor] | None = {} if self.config.bias_compensation else None
        scores = self._score(importance, group_sets, batches, means)
        kept_counts = planner.kept_counts(group_sets, scores, removed)
        return planner.plan(all_group_sets, group_sets, scores, kept_counts, removed, means)

    def _choose_layers(self, batches, with_width: bool) -> list[int]:
        """Score every decoder layer with `layer_importance`; the planner picks the layers to remove."""
        scorer = self.config.layer_scorer()
        if scorer.needs_data and batches is None:
            raise ValueError(f"The layer criterion {scorer.name!r} needs calibration data (`calibration_data=`).")
        scores = self._score(scorer, self.planner.layer_group_sets(), batches)
        removed = self.planner.layers_to_remove(scores, with_width)
        logger.info("Removing decoder layers %s (scored by %s).", removed, scorer.name)
        return removed

    def _score(self, importance, group_sets: dict[str, GroupSet], batches, means=None) -> dict[str, torch.Tensor]:
        """Scores per group set. With a `means` dict, also the per-channel calibration mean of every consumer's input
        ([in_features], float64; bias compensation), collected in the same pass."""
        names = {s.name for gs in group_sets.values() for s in gs.slices}
        needs = set(importance.needs) | ({ACTIVATIONS} if means is not None else set())
        with self._computing():  # forward-only criteria run their forwards while scoring (SPSA)
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

    def _computing(self):
        """Calibration forwards in `config.compute_dtype` (resolved for the model's dtype and device), one layer's
        weights cast at a time; the model's own weights keep their dtype."""
        dtype = resolve_compute_dtype(self.config.compute_dtype, self.model.dtype, input_device(self.model))
        return compute_in(self.model, decoder_layers(self.model, self.spec), dtype)

    @property
    def stage(self) -> str:
        """`"base"` before pruning, `"pruned"` after, `"recovered"` after [`Pruner.recover`]."""
        return "recovered" if self.recovery is not None else "pruned" if self.is_pruned else "base"

    def evaluate(self, eval_data, seq_len: int = 256, max_windows: int | None = 64) -> float:
        """Perplexity of the model now (see [`optimum_prune.perplexity`]), recorded for the current stage.

        Call it before `prune()` to record the base perplexity; the model card and [`Pruner.recover`] report every
        stage measured on the same text. Measuring on other text (or settings) starts a new record.
        """
        setup = {"eval_data": describe_data(eval_data), "eval_seq_len": seq_len, "eval_windows": max_windows}
        if any(self.evaluation.get(k) != v for k, v in setup.items()):
            self.evaluation = dict(setup)
        value = perplexity(self.model, eval_data, self.tokenizer, seq_len=seq_len, max_windows=max_windows)
        self.evaluation[f"perplexity_{self.stage}"] = value
        logger.info("Perplexity (%s): %.3f on %s.", self.stage, value, setup["eval_data"])
        return value

    def model_card(self, repo_or_path: str = "path/to/pruned-model", results=None, license=None, chart=None):
        """The [`huggingface_hub.ModelCard`] saved as README.md (see `hub.build_model_card`)."""
        self._check_pruned()
        return summary_card(
            self.summary(), self.config, self.plan, self.model.config, repo_or_path, results, license, chart
        )

    def summary(self) -> dict:
        """What `pruning_results.json` holds: the base, the sizes, the measured perplexities and the recovery."""
        self._check_pruned()
        return run_summary(
            self.name_or_path,
            self.calibration_source,
            (self.params_before, self.params_after),
            (self.macs_before, count_macs_per_token(self.model)),
            self.evaluation,
            self.recovery,
        )

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
            write_run_files(
                tmp,
                tokenizer=self.tokenizer,
                pruner_config=self.config,
                plan=self.plan,
                summary=self.summary(),
                model_config=self.model.config,
                repo_or_path=repo_or_path or str(save_directory),
                results=results,
            )

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
        method: str = "lm",
        teacher=None,
        distillation: DistillationConfig | dict | None = None,
        full_finetune: bool = False,
        teacher_kwargs: dict | None = None,
        allow_pickle: bool = False,
    ) -> dict:
        """Recovery training of the pruned model with the Transformers `Trainer`: LoRA adapters merged back into plain
        weights (or every weight, `full_finetune=True`), on the LM loss or by distillation from the unpruned model.

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
            method (`str`, defaults to `"lm"`): `"lm"` trains on the text's next tokens; `"distill"` matches the
                teacher's temperature-softened logits (KL divergence, see [`~recovery.DistillationConfig`]).
            teacher (*optional*): with `"distill"`, the unpruned model, or its path or Hub id; defaults to the model
                this pruner pruned (`name_or_path`, also what `from_pruned` reads from `pruning_results.json`).
            distillation (`DistillationConfig` or `dict`, *optional*): temperature, LM-loss and hidden-state weights.
            full_finetune (`bool`, defaults to `False`): train every weight instead of LoRA adapters (lower the
                learning rate, e.g. 5e-5).
            teacher_kwargs (`dict`, *optional*): passed to `from_pretrained` when the teacher is loaded from a path,
                e.g. `{"dtype": torch.bfloat16}` or `{"device_map": "auto"}` (an offloaded teacher stays offloaded).
            allow_pickle (`bool`, defaults to `False`): load a teacher whose only weights are pickled.

        Returns:
            `dict` with `perplexity_base` (if known), `perplexity_pruned`, `perplexity_recovered` (with `eval_data`)
            and the training figures (`train_loss`, `first_logged_loss`, `last_logged_loss`, `train_runtime`).

        Example:

        ```python
        >>> pruner.prune(calibration_data="calibration.txt")
        >>> pruner.recover("train.txt", eval_data="eval.txt", training_args={"max_steps": 60, "bf16": True})
        >>> # or: pruner.recover("train.txt", method="distill", distillation={"temperature": 1.0})
        ```
        """
        self._check_pruned()
        if self.recovery is not None:
            raise RuntimeError("This model was already recovered; build a new pruner to recover again.")
        check_recovery_method(method)
        if isinstance(distillation, dict):
            distillation = DistillationConfig(**distillation)
        if method == "distill":
            teacher = self._distillation_teacher(teacher, teacher_kwargs, allow_pickle)
        elif teacher is not None:
            raise ValueError("A teacher is only used by `method='distill'` (`--method distill`); drop it or distil.")
        if is_offloaded(self.model):
            raise ValueError(
                "LoRA recovery trains with the weights on its training devices, and this model has weights offloaded "
                "to the CPU or disk (`device_map`); save it with `save_pretrained` and recover the checkpoint with "
                "`optimum-prune recover` (several GPUs: `accelerate launch -m optimum_prune.commands.cli recover ...`)."
            )
        if eval_data is not None and (
            self.evaluation.get("perplexity_pruned") is None
            or self.evaluation.get("eval_data") != describe_data(eval_data)
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
            method=method,
            teacher=teacher,
            distillation=distillation,
            full_finetune=full_finetune,
        )
        info["train_data"] = describe_data(train_data)
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

    def _distillation_teacher(self, teacher, teacher_kwargs: dict | None, allow_pickle: bool) -> nn.Module:
        """The teacher as a model: given, or loaded (safetensors unless `allow_pickle`) from its path or this
        pruner's base model."""
        if isinstance(teacher, nn.Module):
            return teacher
        source = teacher if teacher is not None else self.name_or_path
        if not source:
            raise ValueError(
                "Distillation needs the unpruned teacher and this pruner does not know where its base model came "
                "from; pass the unpruned model or its path as `teacher=` (`--teacher DIR` on the command line)."
            )
        logger.info("Loading the teacher %s.", source)
        return load_causal_lm(source, **{**(teacher_kwargs or {}), **weights_loading_kwargs(source, allow_pickle)})

    @classmethod
    def from_pruned(cls, path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs) -> Pruner:
        """Reload a saved pruned checkpoint as a pruned [`Pruner`] (to recover, re-save or push it).

        kwargs go to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, ...). The base's parameter and MAC
        counts and the measured perplexities come back from `pruning_results.json`. Pickled weights are refused
        unless `allow_pickle=True` (unpickling can execute code).
        """
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
