"""PrunerConfig: what to prune and how, as a Transformers-style config (`save_pretrained` / `from_pretrained`)."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields

from transformers.utils import PushToHubMixin

from .architectures.base import EXPERTS, HEAD_STRUCTURES, HIDDEN_CHANNELS, LAYERS, MLP_CHANNELS, STRUCTURES
from .compute_dtype import COMPUTE_DTYPE_CHOICES, check_compute_dtype
from .errors import PruneInputError
from .importance import IMPORTANCE_REGISTRY, get_importance
from .inputs import read_json_object
from .refit_selection import RECONSTRUCTION_SELECTIONS, RECONSTRUCTION_TARGETS
from .streaming_checks import check_streaming_config, needs_global_scores


logger = logging.getLogger(__name__)

CONFIG_NAME = "pruner_config.json"
GLOBAL_NORMALIZATIONS = ("mean", "none")
ALLOCATIONS = (None, "flap")
HEAD_ROUNDINGS = ("nearest", "up")
WIDTH_STRUCTURES = tuple(s for s in STRUCTURES if s != LAYERS)


def _layer_list(name: str, value) -> list[int] | None:
    """Layer indices from a list, a `range`, or a `(start, end)` tuple (end exclusive): sorted and unique."""
    if value is None:
        return None
    if isinstance(value, tuple):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"`{name}` as a tuple must be a `(start, end)` pair of integers, got {value!r}.")
        value = range(*value)
    if not isinstance(value, (list, range)):
        raise TypeError(
            f"`{name}` must be a list of layer indices, a `range` or a `(start, end)` tuple, got {value!r}."
        )
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
        raise ValueError(f"`{name}` must hold non-negative layer indices, got {list(value)}.")
    if len(value) == 0:
        raise ValueError(f"`{name}` is empty; leave it unset to prune every layer, or remove the structure.")
    return sorted(set(value))


def _layer_ratios(value) -> list[float] | dict[int, float] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        try:
            ratios = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            raise ValueError(f"`layer_ratios` keys must be layer indices, got {sorted(value)}.") from None
        values, keys = list(ratios.values()), list(ratios)
    elif isinstance(value, (list, tuple)):
        ratios, values, keys = list(value), list(value), list(range(len(value)))
    else:
        raise TypeError(f"`layer_ratios` must be a list or a {{layer: ratio}} dict, got {type(value).__name__}.")
    if not values or any(k < 0 for k in keys):
        raise ValueError(f"`layer_ratios` must name at least one non-negative layer index, got {value!r}.")
    for r in values:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"`layer_ratios` values must be numbers in [0, 1), got {r!r}.")
    if not any(values):
        raise ValueError("`layer_ratios` are all 0: at least one layer must be pruned.")
    if isinstance(ratios, dict):
        return {k: float(ratios[k]) for k in sorted(ratios)}
    return [float(r) for r in ratios]


@dataclass
class PrunerConfig(PushToHubMixin):
    """Configuration of a structured-pruning run.

    Args:
        pruning_ratio (`float`, *optional*, defaults to `0.2`):
            Fraction of the model's *total* parameters to remove (embeddings and head included), as papers report it.
            The result lands within ±1 point of it, or pruning fails with an error that says why.
        importance (`str`, *optional*, defaults to `"taylor"`):
            A registered criterion: see `optimum_prune.importance.IMPORTANCE_REGISTRY`.
        importance_kwargs (`dict`, *optional*):
            Variant arguments of the criterion, e.g. `{"p": 1}` for L1 magnitude or `{"granularity": "vector"}`.
        structures (`list[str]`, *optional*, defaults to `["attention_heads", "mlp_channels"]`):
            Any of `"attention_heads"`, `"query_heads"`, `"mlp_channels"`, `"hidden_channels"`, `"layers"`.
            `"attention_heads"` removes whole KV groups (a key/value head with the query heads that read it; single
            heads in multi-head models). `"query_heads"` (grouped-query models: LLaMA/Mistral/Qwen2 with
            `num_key_value_heads < num_attention_heads`, GLM) removes query heads *inside* every KV group, the same
            number in each, and keeps every key/value head: a finer step where KV heads are few. Choose one of the
            two.
        num_calibration_samples (`int`, *optional*, defaults to `128`):
            Calibration windows for data-driven criteria and the refit (128 x 128 tokens by default, as SparseGPT and
            Wanda calibrate on 128 samples). Measured with the residual-stream refit, 128 windows instead of 32 lower
            perplexity in 29 of 30 settings for 3-4x the pruning time (README, "Defaults").
        calibration_seq_len (`int`, *optional*, defaults to `128`):
            Tokens per calibration window.
        round_to (`int`, *optional*, defaults to `1`):
            Keep channel widths (MLP and hidden) multiples of this, e.g. 8 for tensor-core friendly shapes.
        seed (`int`, *optional*, defaults to `0`):
            Seeds calibration sampling and the `random` criterion.
        attention_layers (`list[int]`, `range` or `tuple[int, int]`, *optional*):
            Decoder layers (original indices) that may lose attention heads; the others keep every head. A
            `(start, end)` tuple means `range(start, end)` (end exclusive); a list names the layers. Defaults to all
            layers. Stored as the list of indices. LLM-Pruner's recipe spares the first and last layers, e.g.
            `(4, 30)` of 32: the pruned layers then prune harder so that `pruning_ratio` is still met.
        mlp_layers (`list[int]`, `range` or `tuple[int, int]`, *optional*):
            The same for MLP channels.
        layer_ratios (`list[float]` or `dict[int, float]`, *optional*):
            Relative pruning ratio of each layer (a list with one value per layer, or `{layer: ratio}` for some layers;
            unlisted layers are not pruned). When the ratios as given meet `pruning_ratio` (±1 point) they are used
            exactly; otherwise they are scaled by one common factor until they do, keeping their proportions.
        global_ranking (`bool`, *optional*):
            Rank the units of each structure across all prunable layers against one threshold, so widths vary by
            layer (FLAP-style), never below `min_heads` / `min_channels`, channel widths rounded to `round_to`.
            Unset: `True` for criteria whose scores compare across layers (`taylor`'s loss change, `bip`'s
            block-output bound) unless another option sets the widths (`uniform`, `allocation`, `layer_ratios`,
            `attention_layers`, `mlp_layers`, `head_rounding="up"`, `iterative_steps`), else `False`: measured across
            models, ranking Taylor scores globally beats uniform allocation at every ratio (README, "Defaults").
            Per-layer widths need the registered `pruned_*` type; pass `uniform=True` for a stock config.
        global_normalization (`str`, *optional*):
            How scores are made comparable across layers before global ranking: `"mean"` divides each layer's scores
            by their mean (criteria whose scale varies by layer, e.g. magnitude), `"none"` uses the raw scores
            (criteria in comparable units, e.g. Taylor's estimated loss change). Unset: `"none"` for those criteria,
            `"mean"` for the others.
        allocation (`str`, *optional*):
            `"flap"`: FLAP's adaptive structure search (AL-AM): the units of every prunable layer *and* structure
            (attention heads and MLP channels together) are ranked against one threshold on their raw scores, so widths
            vary by layer and by module type; the threshold is placed where the total parameter count meets
            `pruning_ratio` (each unit weighs its parameter cost), and no layer goes below `min_heads` /
            `min_channels`. Scores must be comparable across modules: the `flap` criterion standardises per module.
            Not with `hidden_channels`, `layer_ratios`, `global_ranking` or `uniform`. Unset: the other options decide.
        bias_compensation (`bool`, *optional*):
            FLAP's bias compensation: add the calibration mean contribution of removed input channels to the output
            bias of the Linear that read them (o_proj, down_proj; one is added where the family has none). Needs
            calibration data. Unset: `True` for `importance="flap"` where the family can hold those biases (LLaMA's
            registered type adds them, OPT and BLOOM have them; GLM cannot) and `False` otherwise; the pruner writes
            the resolved value back.
        uniform (`bool`, *optional*, defaults to `False`):
            Require the same widths in every layer (a stock config that tools reading only stock configs load);
            incompatible with `attention_layers`, `mlp_layers`, `layer_ratios` and `global_ranking`.
        min_heads (`int`, *optional*, defaults to `1`):
            Fewest query heads a pruned layer keeps (rounded up to whole KV groups; with `"query_heads"`, to a
            multiple of the KV head count).
        min_channels (`int`, *optional*, defaults to `1`):
            Fewest MLP channels a pruned layer keeps (rounded up to `round_to`).
        head_rounding (`str`, *optional*, defaults to `"nearest"`):
            How the uniform and layer-range allocations round each layer's kept head count: `"nearest"`, or `"up"`,
            which removes the floor of the fraction as FLAP's and LLM-Pruner's code do (more heads kept, the MLP
            channels absorb the rest). Scores decide the widths under `global_ranking` and `allocation="flap"`, so
            `"up"` does not apply there.
        layer_importance (`str`, *optional*):
            Registered criterion that scores whole layers when `structures` contains `"layers"` (e.g.
            `"block_influence"`); defaults to `importance`.
        num_layers_to_remove (`int`, *optional*):
            With `"layers"` and width structures together: how many whole layers to remove before width pruning
            meets the rest of `pruning_ratio`. Defaults to the number closest to half of the target.
        streaming (`bool`, *optional*, defaults to `False`):
            Prune layer by layer from the checkpoint's shards with [`optimum_prune.streaming.prune_streaming`] (for
            models larger than memory): layer-local criteria and per-layer structures only. Uniform or given widths
            take one pass (sequential statistics); `global_ranking` and `allocation="flap"` take two and give the
            in-memory plan (bias compensation only there).
        iterative_steps (`int`, *optional*, defaults to `1`):
            Prune in this many steps (LLM-Pruner's `iterative_steps`): step k removes units until the model has lost
            `pruning_ratio * k / iterative_steps` of the *original* parameters, re-collecting statistics and
            re-scoring the already pruned model before each step. The saved plan still refers to the original model.
            Only for 'attention_heads' (or 'query_heads') and 'mlp_channels' without bias compensation and without `streaming`: whole
            layers, the shared hidden width and compensated biases would need re-planning across steps.
        compute_dtype (`str`, *optional*, defaults to `"auto"`):
            The dtype calibration computes in (statistics, scores, the layers' forwards): `"auto"`, `"float32"`,
            `"bfloat16"` or `"float16"`. The weights keep, and the output is written in, the checkpoint's dtype; the
            layers are cast one at a time (streaming: the one loaded layer; in memory: each layer during its forward),
            never the whole model. `"auto"`: on CUDA the checkpoint's dtype; on the CPU the checkpoint's dtype where
            the CPU computes it natively (bfloat16 with AVX512-BF16 or AMX, float16 with AMX-FP16, as PyTorch's
            `torch.cpu._is_avx512_bf16_supported()` / `_is_amx_tile_supported()` / `_is_amx_fp16_supported()`
            report; `torch.backends.cpu.get_cpu_capability()` names only `AVX2`/`AVX512`), else float32, since
            PyTorch's bfloat16 matmul on other CPUs is a slow fallback (x5-x250 on AVX2). A dtype that would round
            the weights (a float32 checkpoint computed in bfloat16) is not used: the checkpoint's dtype is.
        reconstruction (`bool`, *optional*):
            After the units are chosen, refit the consumer Linears of every pruned structure (o_proj/down_proj, OPT's
            out_proj/fc2, BLOOM's dense/dense_4h_to_h) layer by layer by ridge least squares, so that each pruned
            layer's outputs match the unpruned layer's on the calibration data (see `optimum_prune.reconstruction`).
            Same checkpoint shape; needs calibration data. Only for 'attention_heads' (or 'query_heads') and
            'mlp_channels' (MoE: each kept expert's down_proj, on the tokens routed to it, gate-weighted; 'experts'
            may be removed too, which refits nothing itself), in one step; streaming reconstructs with the two-pass
            allocations or a given plan. Unset: on where it applies, i.e. when the criterion reads calibration data
            anyway (not `magnitude` or `random`), the structures are heads and MLP channels, `iterative_steps=1`, the
            model is not offloaded and streaming (if asked) runs two passes; off otherwise. Measured, it lowers
            perplexity in every pair on every family, MoE included (README, "Layer-wise reconstruction").
        reconstruction_damping (`float`, *optional*, defaults to `0.01`):
            Ridge damping of the refit, relative to the mean diagonal of the inputs' Gram matrix.
        reconstruction_selection (`str`, *optional*, defaults to `"error"`):
            Which units each layer keeps under reconstruction. `"error"`: the units whose removal leaves the least
            output error *after the refit*, chosen layer by layer on the pruned model's own inputs by backward
            elimination (structured OBS, as SlimGPT and ZipLM do; see `optimum_prune.refit_selection`); the criterion
            and the allocation still set how many units each layer keeps. Group sets read by more than one Linear,
            with bias compensation or tied query heads keep the criterion's choice. `"criterion"`: the importance
            scores' top units. Measured, `"error"` is better or within 2% on every dense model and target of
            `benchmarks/defaults.py` (README, "Layer-wise reconstruction").
        reconstruction_target (`str`, *optional*, defaults to `"residual"`):
            What each refit consumer's outputs are fit to. `"residual"`: the unpruned model's residual stream where
            the consumer's output joins it, i.e. its unpruned outputs plus the drift between the unpruned and the
            pruned stream there, so each layer also corrects the error the earlier pruned layers left (attention's
            consumer matches the unpruned stream after attention, the MLP's the unpruned layer output). Only where
            sublayers add straight into the stream (LLaMA, Mistral, Qwen2/3, Phi-3, GLM, the MoE families, pre-LN
            OPT, BLOOM); families with a norm after each sublayer (Gemma 2/3, GLM-4) fit `"output"` instead.
            `"output"`: the unpruned consumer's own outputs (the layer-local problem). Measured, `"residual"` is
            better on every model of the quality benchmark (README, "Layer-wise reconstruction").

    Example:

    ```python
    >>> from optimum_prune import PrunerConfig
    >>> config = PrunerConfig(pruning_ratio=0.2, importance="magnitude", structures=["mlp_channels"])
    >>> config.pruning_ratio
    0.2
    ```
    """

    pruning_ratio: float = field(default=0.2, metadata={"help": "Fraction of total parameters to remove."})
    importance: str = field(default="taylor", metadata={"help": "Registered importance criterion."})
    importance_kwargs: dict = field(default_factory=dict, metadata={"help": "Variant arguments of the criterion."})
    structures: list[str] = field(
        default_factory=lambda: ["attention_heads", "mlp_channels"],
        metadata={"help": f"Structures to prune, any of {list(STRUCTURES)}."},
    )
    num_calibration_samples: int = field(default=128, metadata={"help": "Number of calibration windows."})
    calibration_seq_len: int = field(default=128, metadata={"help": "Tokens per calibration window."})
    round_to: int = field(default=1, metadata={"help": "Keep channel widths multiples of this."})
    seed: int = field(default=0, metadata={"help": "Seed for calibration sampling and random scores."})
    attention_layers: list[int] | None = field(
        default=None, metadata={"help": "Layers that may lose attention heads: indices, a range or (start, end)."}
    )
    mlp_layers: list[int] | None = field(
        default=None, metadata={"help": "Layers that may lose MLP channels: indices, a range or (start, end)."}
    )
    layer_ratios: list[float] | dict[int, float] | None = field(
        default=None, metadata={"help": "Relative per-layer pruning ratios (list or {layer: ratio})."}
    )
    global_ranking: bool | None = field(
        default=None, metadata={"help": "One threshold over all layers per structure (unset: by criterion)."}
    )
    global_normalization: str | None = field(
        default=None,
        metadata={"help": f"Per-layer score normalisation for global ranking: {GLOBAL_NORMALIZATIONS}."},
    )
    allocation: str | None = field(
        default=None, metadata={"help": "'flap': one threshold over every layer's heads and channels together."}
    )
    bias_compensation: bool | None = field(
        default=None, metadata={"help": "Fold removed channels' mean contribution into biases (default: flap only)."}
    )
    uniform: bool = field(default=False, metadata={"help": "Force identical widths in every layer."})
    min_heads: int = field(default=1, metadata={"help": "Fewest query heads a pruned layer keeps."})
    min_channels: int = field(default=1, metadata={"help": "Fewest MLP channels a pruned layer keeps."})
    head_rounding: str = field(
        default="nearest", metadata={"help": f"Rounding of uniform kept head counts: {list(HEAD_ROUNDINGS)}."}
    )
    layer_importance: str | None = field(default=None, metadata={"help": "Criterion for whole layers."})
    num_layers_to_remove: int | None = field(
        default=None, metadata={"help": "Whole layers to remove when combined with width structures."}
    )
    streaming: bool = field(default=False, metadata={"help": "Prune layer by layer from the checkpoint's shards."})
    iterative_steps: int = field(default=1, metadata={"help": "Prune in this many re-scored steps."})
    compute_dtype: str = field(
        default="auto", metadata={"help": f"dtype calibration computes in: {list(COMPUTE_DTYPE_CHOICES)}."}
    )
    reconstruction: bool | None = field(
        default=None,
        metadata={
            "help": "Refit the pruned structures' consumer Linears by ridge least squares (unset: where it applies)."
        },
    )
    reconstruction_damping: float = field(
        default=0.01, metadata={"help": "Ridge damping of the refit, relative to the mean Gram diagonal."}
    )
    reconstruction_selection: str = field(
        default="error",
        metadata={"help": "Units each layer keeps under reconstruction: the criterion's or the least refit error."},
    )
    reconstruction_target: str = field(
        default="residual",
        metadata={"help": "Fit refit consumers to the unpruned residual stream or to their own unpruned outputs."},
    )

    def __post_init__(self):
        if isinstance(self.pruning_ratio, bool) or not isinstance(self.pruning_ratio, (int, float)):
            raise TypeError(f"`pruning_ratio` must be a number in [0, 1), got {self.pruning_ratio!r}.")
        if not 0 <= self.pruning_ratio < 1:
            raise ValueError(f"`pruning_ratio` must be in [0, 1), got {self.pruning_ratio}.")
        self.pruning_ratio = float(self.pruning_ratio)
        if self.importance not in IMPORTANCE_REGISTRY:
            raise ValueError(f"Unknown `importance` {self.importance!r}; choose one of {sorted(IMPORTANCE_REGISTRY)}.")
        if not isinstance(self.importance_kwargs, dict):
            raise TypeError(f"`importance_kwargs` must be a dict, got {type(self.importance_kwargs).__name__}.")
        if isinstance(self.structures, str):
            self.structures = [self.structures]
        self.structures = list(self.structures)
        unknown = [s for s in self.structures if s not in STRUCTURES]
        if unknown or not self.structures:
            raise ValueError(f"`structures` must be a non-empty subset of {list(STRUCTURES)}, got {self.structures}.")
        if len(set(self.structures)) != len(self.structures):
            raise ValueError(f"`structures` has duplicates: {self.structures}.")
        if set(HEAD_STRUCTURES) <= set(self.structures):
            raise ValueError(
                f"`structures` may hold one of {list(HEAD_STRUCTURES)} (both slice q_proj and o_proj): "
                "'attention_heads' removes whole KV groups, 'query_heads' removes query heads inside every KV group."
            )
        for name in ("num_calibration_samples", "calibration_seq_len", "round_to", "min_heads", "min_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
        self._validate_allocation(IMPORTANCE_REGISTRY)
        self._validate_head_rounding()
        self._validate_iterative()
        check_compute_dtype(self.compute_dtype)
        self._validate_reconstruction()
        if not isinstance(self.streaming, bool):
            raise ValueError(f"`streaming` must be True or False, got {self.streaming!r}.")
        if self.streaming:
            check_streaming_config(self)
        # Fail now, not after calibration, on bad criterion arguments or structures it cannot score.
        importance = self.build_importance()
        scored = [s for s in self.structures if not (s == LAYERS and self.layer_importance is not None)]
        if importance.structures is not None and not set(scored) <= set(importance.structures):
            raise ValueError(
                f"`importance={self.importance!r}` scores only {list(importance.structures)}, got `structures="
                f"{self.structures}`."
                + (" Name a criterion for whole layers with `layer_importance`." if LAYERS in scored else "")
            )
        layer_structures = self.layer_scorer().structures if LAYERS in self.structures else None
        if layer_structures is not None and LAYERS not in layer_structures:
            raise ValueError(
                f"`layer_importance={self.layer_importance!r}` scores only {list(layer_structures)}, not 'layers'."
            )

    def _resolve_global_ranking(self, registry) -> None:
        """Unset `global_ranking` / `global_normalization` follow the criterion: scores in units that compare across
        layers (`Importance.comparable_across_layers`) are ranked globally and raw, unless another option already
        decides the widths."""
        comparable = getattr(registry[self.importance], "comparable_across_layers", False)
        if self.global_normalization is None:
            self.global_normalization = "none" if comparable else "mean"
        if self.global_ranking is not None:
            return
        widths_given = any(
            getattr(self, n) for n in ("attention_layers", "mlp_layers", "layer_ratios", "allocation", "uniform")
        )
        per_layer = [s for s in self.structures if s in (*HEAD_STRUCTURES, MLP_CHANNELS)]
        self.global_ranking = bool(
            comparable
            and per_layer
            and not widths_given
            and self.head_rounding == "nearest"
            and self.iterative_steps == 1
        )

    def _validate_head_rounding(self) -> None:
        if self.head_rounding not in HEAD_ROUNDINGS:
            raise ValueError(f"`head_rounding` must be one of {list(HEAD_ROUNDINGS)}, got {self.head_rounding!r}.")
        if self.head_rounding == "up" and (self.global_ranking or self.allocation == "flap"):
            raise ValueError(
                "`head_rounding='up'` rounds uniform or layer-range head counts; with `global_ranking` or "
                "`allocation='flap'` the scores decide the widths: leave `head_rounding='nearest'`."
            )

    def _validate_iterative(self) -> None:
        """Iterative pruning composes per-step kept indices into one plan on the original model; structures whose
        pruning is not a pure selection of units (layers re-number, hidden channels rescale norms, bias compensation
        folds weights that later steps change) or that prune without a loaded model (streaming) are refused."""
        n = self.iterative_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`iterative_steps` must be a positive integer, got {n!r}.")
        if n == 1:
            return
        refused = [s for s in self.structures if s not in (*HEAD_STRUCTURES, MLP_CHANNELS)]
        if refused:
            raise ValueError(
                f"`iterative_steps={n}` prunes only 'attention_heads' and 'mlp_channels' (or 'query_heads' in place of "
                f"'attention_heads'), got `structures={self.structures}`; set `iterative_steps=1` or remove {refused}."
            )
        if self.streaming:
            raise ValueError(
                f"`iterative_steps={n}` needs the whole model loaded; it cannot run with `streaming=True`."
            )
        if self.bias_compensation:
            raise ValueError(
                f"`iterative_steps={n}` cannot compose bias compensation across steps; set `bias_compensation=False`."
            )

    def _validate_reconstruction(self) -> None:
        """Reconstruction refits the consumers of per-layer width structures on an unpruned-shaped layer, in one
        step; whole layers and the hidden width change what every later layer reads."""
        if self.reconstruction is not None and not isinstance(self.reconstruction, bool):
            raise TypeError(
                f"`reconstruction` must be True, False or None (where it applies), got {self.reconstruction!r}."
            )
        damping = self.reconstruction_damping
        if (
            isinstance(damping, bool)
            or not isinstance(damping, (int, float))
            or not math.isfinite(damping)
            or damping < 0
        ):
            raise ValueError(f"`reconstruction_damping` must be a finite number >= 0, got {damping!r}.")
        self.reconstruction_damping = float(damping)
        if self.reconstruction_selection not in RECONSTRUCTION_SELECTIONS:
            raise ValueError(
                f"`reconstruction_selection` must be one of {list(RECONSTRUCTION_SELECTIONS)}, got "
                f"{self.reconstruction_selection!r}."
            )
        if self.reconstruction_target not in RECONSTRUCTION_TARGETS:
            raise ValueError(
                f"`reconstruction_target` must be one of {list(RECONSTRUCTION_TARGETS)}, got "
                f"{self.reconstruction_target!r}."
            )
        if self.reconstruction is None:
            self._resolve_reconstruction()
        if not self.reconstruction:
            return
        other = [s for s in self.structures if s not in (*HEAD_STRUCTURES, MLP_CHANNELS, EXPERTS)]
        if other:
            raise ValueError(
                f"`reconstruction=True` refits the Linears that read 'attention_heads', 'query_heads' and "
                f"'mlp_channels' (with 'experts' of MoE models, which refit nothing themselves); it cannot run with "
                f"{other} in `structures`."
            )
        if self.iterative_steps != 1:
            raise ValueError(
                f"`reconstruction=True` refits once, after the plan is chosen; set `iterative_steps=1` (got "
                f"{self.iterative_steps})."
            )

    def _resolve_reconstruction(self) -> None:
        """Unset `reconstruction` is decided here where the config alone rules it out (structures it cannot refit,
        several steps, one-pass streaming, a criterion that reads no calibration data); the rest (the family) is
        decided by the planner, which writes the value back."""
        refits = all(s in (*HEAD_STRUCTURES, MLP_CHANNELS) for s in self.structures) and self.iterative_steps == 1
        one_pass = self.streaming and not needs_global_scores(self)
        if not refits or one_pass or not self.build_importance().needs_data:
            self.reconstruction = False

    def _validate_allocation(self, registry) -> None:
        self.attention_layers = _layer_list("attention_layers", self.attention_layers)
        self.mlp_layers = _layer_list("mlp_layers", self.mlp_layers)
        self.layer_ratios = _layer_ratios(self.layer_ratios)
        self._resolve_global_ranking(registry)
        for name in ("global_ranking", "uniform"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.global_normalization not in GLOBAL_NORMALIZATIONS:
            raise ValueError(
                f"`global_normalization` must be one of {list(GLOBAL_NORMALIZATIONS)}, got {self.global_normalization!r}."
            )
        for name, structures in (("attention_layers", HEAD_STRUCTURES), ("mlp_layers", (MLP_CHANNELS,))):
            if getattr(self, name) is not None and not set(structures) & set(self.structures):
                raise ValueError(
                    f"`{name}` selects layers for {' or '.join(map(repr, structures))}, which is not in `structures` "
                    f"{self.structures}."
                )
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"`allocation` must be one of {list(ALLOCATIONS)}, got {self.allocation!r}.")
        if self.bias_compensation is not None and not isinstance(self.bias_compensation, bool):
            raise TypeError(f"`bias_compensation` must be True, False or None, got {self.bias_compensation!r}.")
        if self.bias_compensation and not set(self.structures) & {*HEAD_STRUCTURES, MLP_CHANNELS}:
            raise ValueError(
                "`bias_compensation` applies to 'attention_heads', 'query_heads' and 'mlp_channels' (the Linears that "
                "read them); "
                f"`structures` is {self.structures}."
            )
        if self.allocation == "flap":
            conflicting = [n for n in ("layer_ratios",) if getattr(self, n) is not None]
            conflicting += [n for n in ("global_ranking", "uniform") if getattr(self, n)]
            conflicting += [HIDDEN_CHANNELS] if HIDDEN_CHANNELS in self.structures else []
            if conflicting:
                raise ValueError(
                    f"`allocation='flap'` ranks heads and MLP channels of every layer against one threshold; it cannot "
                    f"be combined with {conflicting}."
                )
            if not set(self.structures) & {*HEAD_STRUCTURES, MLP_CHANNELS}:
                raise ValueError(
                    f"`allocation='flap'` needs 'attention_heads', 'query_heads' or 'mlp_channels', got "
                    f"{self.structures}."
                )
        if self.global_ranking and self.layer_ratios is not None:
            raise ValueError("Choose one of `global_ranking=True` (widths from scores) and `layer_ratios` (given).")
        if self.uniform:
            conflicting = [
                n for n in ("attention_layers", "mlp_layers", "layer_ratios") if getattr(self, n) is not None
            ]
            conflicting += ["global_ranking"] if self.global_ranking else []
            if conflicting:
                raise ValueError(
                    f"`uniform=True` gives every layer the same widths, so it cannot be combined with {conflicting}."
                )
        if self.layer_ratios is not None and HIDDEN_CHANNELS in self.structures:
            raise ValueError("`layer_ratios` cannot apply to 'hidden_channels', which every layer shares.")
        width = [s for s in self.structures if s in WIDTH_STRUCTURES]
        if not width:
            options = [n for n in ("attention_layers", "mlp_layers", "layer_ratios") if getattr(self, n) is not None]
            options += [n for n in ("global_ranking", "uniform", "allocation") if getattr(self, n)]
            if options:
                raise ValueError(
                    f"{options} allocate widths, but `structures` {self.structures} has no width structure."
                )
        if LAYERS not in self.structures:
            for name in ("layer_importance", "num_layers_to_remove"):
                if getattr(self, name) is not None:
                    raise ValueError(f"`{name}` applies to `structures` containing 'layers', got {self.structures}.")
        if self.layer_importance is not None and self.layer_importance not in registry:
            raise ValueError(
                f"Unknown `layer_importance` {self.layer_importance!r}; choose one of {sorted(registry)}."
            )
        if self.num_layers_to_remove is not None:
            n = self.num_layers_to_remove
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"`num_layers_to_remove` must be a non-negative integer, got {n!r}.")
            if not width:
                raise ValueError(
                    "`num_layers_to_remove` needs width structures too; with `structures=['layers']` alone the number "
                    "of layers follows from `pruning_ratio`."
                )

    @property
    def non_uniform(self) -> bool:
        """Whether widths may differ between layers."""
        return (
            self.attention_layers is not None
            or self.mlp_layers is not None
            or self.layer_ratios is not None
            or self.global_ranking
            or self.allocation is not None
        )

    def layer_scorer(self):
        """The criterion for whole layers (`layer_importance`, else `importance`)."""
        if self.layer_importance is None or self.layer_importance == self.importance:
            return self.build_importance()
        return get_importance(self.layer_importance)

    def build_importance(self):
        kwargs = dict(self.importance_kwargs)
        if self.importance == "random":
            kwargs.setdefault("seed", self.seed)
        return get_importance(self.importance, **kwargs)

    def to_dict(self) -> dict:
        data = asdict(self)
        if isinstance(self.layer_ratios, dict):  # as JSON writes it, so that to_dict() == json.loads(to_json_string())
            data["layer_ratios"] = {str(k): v for k, v in self.layer_ratios.items()}
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> PrunerConfig:
        """Build from a dict; keys this version does not know are ignored with a warning (newer files)."""
        if not isinstance(data, dict):
            raise PruneInputError(f"A PrunerConfig is built from a dict of its fields, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown PrunerConfig keys %s (written by a newer optimum-prune?).", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write `pruner_config.json` to `save_directory`. `push_to_hub(repo_id)` (from `PushToHubMixin`) uploads it."""
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` ({save_directory}) must be a directory, not a file.")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> PrunerConfig:
        """Load from a directory, a `pruner_config.json` path, or a Hub repo id (kwargs go to `cached_file`)."""
        from transformers.utils import cached_file

        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            file = path
        elif os.path.isdir(path):
            file = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"No {CONFIG_NAME} in {path}.")
        else:
            file = cached_file(path, CONFIG_NAME, **kwargs)
        data = read_json_object(file, "give a pruner_config.json (a JSON object of PrunerConfig fields)")
        return cls.from_dict(data)
