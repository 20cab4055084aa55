"""PruningPlan: which units survive, as plain data. The contract between scoring and surgery."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from .architectures.base import ATTENTION_HEADS, EXPERTS, HIDDEN_CHANNELS, MLP_CHANNELS, QUERY_HEADS
from .refit_selection import RECONSTRUCTION_SELECTIONS, RECONSTRUCTION_TARGETS
from .surgery import apply_plan


PLAN_NAME = "pruning_plan.json"
PLAN_FORMAT_VERSION = 5  # the newest format this version reads
# Plans without bias compensation are written as format 1, so older optimum-prune versions still read them; a plan
# with `bias_means` is format 2: an older reader would otherwise drop the compensation silently. A plan with
# `reconstruction` is format 3, for the same reason (an older reader would slice un-refit weights).
_BIAS_FORMAT_VERSION = 2
_RECONSTRUCTION_FORMAT_VERSION = 3
# Units chosen by refit error (`reconstruction["selection"]`) are format 4: the kept units then depend on the data.
_SELECTION_FORMAT_VERSION = 4
# Consumers fit to the unpruned residual stream (`reconstruction["target"] == "residual"`) are format 5: an older reader
# would refit them to their own outputs instead.
_TARGET_FORMAT_VERSION = 5
RECONSTRUCTION_KEYS = ("damping",)
# Structures with one plan entry per decoder layer (`"<structure>.<layer>"`); hidden channels have one model-wide entry.
LAYER_STRUCTURES = (ATTENTION_HEADS, QUERY_HEADS, MLP_CHANNELS, EXPERTS)


@dataclass
class PruningPlan:
    """The kept units of every pruned structure, and the removed decoder layers.

    Indices always refer to the *original* model, so a plan reproduces the same pruning on any model of the same
    shape (a fine-tune of the same base, say) with [`PruningPlan.apply`].

    Args:
        model_type (`str`): `model_type` of the model the plan was made for.
        num_layers (`int`): decoder layers of the original model.
        unit_counts (`dict[str, int]`): units per group set before pruning, keyed `"<structure>.<layer>"` or
            `"hidden_channels"`; checked against the target model.
        kept (`dict[str, list[int]]`): sorted kept unit indices per pruned group set.
        removed_layers (`list[int]`): original indices of removed decoder layers.
        bias_means (`dict[str, dict[str, list[float]]]`): bias compensation (FLAP's `compress(..., bias=True)`): per
            pruned group set, per consumer weight (full parameter name, e.g. `"model.layers.3.mlp.down_proj.weight"`),
            the calibration mean of each *removed* input channel, in ascending channel order. Surgery adds
            `W[:, removed] @ means` to that Linear's bias, so `apply` re-applies the compensation from the target
            model's own weights (exactly the same result on the model the plan was made for). Empty: no compensation.
        reconstruction (`dict`): `{"damping": float}` when the consumers of the pruned structures were refit by ridge
            least squares on calibration data (see `optimum_prune.reconstruction`). The refit weights are not in the
            plan: such a plan reproduces its checkpoint only from the plan, the same calibration data and seed
            (`Pruner.apply_plan(plan, calibration_data=...)`, or `prune_streaming(..., plan=, calibration_data=)`),
            and [`PruningPlan.apply`] refuses it. Empty: no reconstruction.
    """

    model_type: str
    num_layers: int
    unit_counts: dict[str, int] = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)
    bias_means: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    reconstruction: dict = field(default_factory=dict)
    format_version: int = 1

    def __post_init__(self):
        # Strict: a tampered or hand-edited plan is refused, never coerced ("12" is not [1, 2], 1.7 is not 1).
        if not isinstance(self.model_type, str) or not self.model_type:
            raise ValueError(f"`model_type` must be a non-empty string, got {self.model_type!r}.")
        _check_int("num_layers", self.num_layers, minimum=1)
        _check_int("format_version", self.format_version, minimum=1)
        _check_dict("unit_counts", self.unit_counts)
        for key, total in self.unit_counts.items():
            check_plan_key(key, self.num_layers)
            _check_int(f"unit_counts[{key!r}]", total, minimum=1)
        _check_dict("kept", self.kept)
        for key, kept in self.kept.items():
            if key not in self.unit_counts:
                raise ValueError(f"Plan entry {key!r} has no unit count in `unit_counts`.")
            _check_indices(f"kept[{key!r}]", kept, self.unit_counts[key])
            if not kept:
                raise ValueError(f"Plan entry {key!r} keeps no unit; at least one must remain.")
        _check_indices("removed_layers", self.removed_layers, self.num_layers)
        if len(self.removed_layers) >= self.num_layers:
            raise ValueError("A plan cannot remove every decoder layer.")
        _check_dict("bias_means", self.bias_means)
        for key, means in self.bias_means.items():
            if key not in self.kept:
                raise ValueError(f"`bias_means` has entry {key!r}, which the plan does not prune.")
            _check_dict(f"bias_means[{key!r}]", means)
            for name, values in means.items():
                _check_numbers(f"bias_means[{key!r}][{name!r}]", values)
        self.bias_means = {k: {n: [float(x) for x in v] for n, v in m.items()} for k, m in self.bias_means.items()}
        if self.bias_means:
            self.format_version = max(self.format_version, _BIAS_FORMAT_VERSION)
        _check_reconstruction(self.reconstruction)
        if self.reconstruction:
            selection = self.reconstruction.get("selection", "criterion")
            target = self.reconstruction.get("target", "output")
            self.reconstruction = {"damping": float(self.reconstruction["damping"])}
            self.format_version = max(self.format_version, _RECONSTRUCTION_FORMAT_VERSION)
            if selection == "error":
                self.reconstruction["selection"] = selection
                self.format_version = max(self.format_version, _SELECTION_FORMAT_VERSION)
            if target == "residual":
                self.reconstruction["target"] = target
                self.format_version = max(self.format_version, _TARGET_FORMAT_VERSION)

    def to_dict(self) -> dict:
        """The plan as JSON data; `reconstruction` only when set, so plans without it stay what older versions wrote."""
        data = asdict(self)
        if not data["reconstruction"]:
            del data["reconstruction"]
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        if not isinstance(data, dict):
            raise ValueError(f"A pruning plan is a JSON object, got {_kind(data)}.")
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        _check_int("format_version", version, minimum=1)
        if version > PLAN_FORMAT_VERSION:
            raise ValueError(f"Plan format {version} is newer than this optimum-prune understands.")
        missing = [k for k in ("model_type", "num_layers") if k not in data]
        if missing:
            raise ValueError(f"A pruning plan needs {missing} (it has {sorted(data)}).")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, PLAN_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> PruningPlan:
        """Read `pruning_plan.json` from a directory (or the file itself)."""
        file = os.fspath(path) if str(path).endswith(".json") else os.path.join(path, PLAN_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No pruning plan at {file!r}.")
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"The pruning plan {file!r} is not valid JSON ({err}).") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"The pruning plan {file!r} is invalid: {err}") from None

    def kept_widths(self, structure: str) -> dict[int, int]:
        """Kept unit count per layer for `structure` (pruned layers only)."""
        prefix = structure + "."
        return {int(k[len(prefix) :]): len(v) for k, v in self.kept.items() if k.startswith(prefix)}

    def apply(self, model):
        """Prune `model` in place exactly as this plan says and return it (see [`surgery.apply_plan`]). A plan that
        does not fit the model (type, layers, unit counts, tied groups, bias means) is refused with a ValueError
        before any tensor changes; so is a plan made with reconstruction, whose refit weights only the pruner can
        recompute from calibration data."""
        if self.reconstruction:
            raise ValueError(
                "This plan was made with reconstruction (the consumer weights were refit on calibration data), so "
                "`PruningPlan.apply` would give un-refit weights. Load the pruned checkpoint itself, or reproduce it "
                "from the plan, the same calibration data and seed: `Pruner.apply_plan(plan, calibration_data=...)` "
                "or `prune_streaming(..., plan=plan, calibration_data=...)`."
            )
        return apply_plan(model, self)


def check_plan_key(key, num_layers: int) -> None:
    """A `unit_counts`/`kept` key is `"hidden_channels"` or `"<per-layer structure>.<layer>"` with the layer written
    as a plain decimal in [0, num_layers)."""
    if key == HIDDEN_CHANNELS:
        return
    structure, dot, layer = str(key).partition(".")
    if (
        not isinstance(key, str)
        or not dot
        or structure not in LAYER_STRUCTURES
        or not layer.isascii()
        or not layer.isdigit()
        or layer != str(int(layer))
    ):
        raise ValueError(
            f"Plan key {key!r} is not '{HIDDEN_CHANNELS}' or '<structure>.<layer>' with a structure among "
            f"{list(LAYER_STRUCTURES)} and a layer number."
        )
    if int(layer) >= num_layers:
        raise ValueError(f"Plan key {key!r} names layer {layer}; the plan has {num_layers} decoder layers.")


def _kind(value) -> str:
    return f"{type(value).__name__} {value!r}" if len(repr(value)) <= 40 else type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {_kind(value)}.")


def _check_dict(name: str, value) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be an object (a dict), got {_kind(value)}.")


def _check_indices(name: str, value, bound: int) -> None:
    """A list of distinct integers in [0, bound), ascending."""
    if not isinstance(value, list):
        raise ValueError(f"`{name}` must be a list of integers, got {_kind(value)}.")
    for position, index in enumerate(value):
        if not _is_int(index):
            raise ValueError(f"`{name}` must hold integers only, got {_kind(index)} at position {position}.")
        if not 0 <= index < bound:
            raise ValueError(f"`{name}` has index {index}, outside [0, {bound}).")
        if position and index <= value[position - 1]:
            raise ValueError(
                f"`{name}` must be sorted ascending without duplicates; {index} follows {value[position - 1]}."
            )


def _check_reconstruction(value) -> None:
    """Empty, or `{"damping": finite number >= 0}` with, optionally, `"selection"`: 'criterion' or 'error', and
    `"target"`: 'residual' or 'output'."""
    _check_dict("reconstruction", value)
    if not value:
        return
    if sorted(set(value) - {"selection", "target"}) != sorted(RECONSTRUCTION_KEYS):
        raise ValueError(
            f"`reconstruction` must hold exactly {list(RECONSTRUCTION_KEYS)} (and optionally 'selection' and "
            f"'target'), got {sorted(value)}."
        )
    if value.get("target", "output") not in RECONSTRUCTION_TARGETS:
        raise ValueError(
            f"`reconstruction['target']` must be one of {list(RECONSTRUCTION_TARGETS)}, got {_kind(value['target'])}."
        )
    if value.get("selection", "criterion") not in RECONSTRUCTION_SELECTIONS:
        raise ValueError(
            f"`reconstruction['selection']` must be one of {list(RECONSTRUCTION_SELECTIONS)}, got "
            f"{_kind(value['selection'])}."
        )
    damping = value["damping"]
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"`reconstruction['damping']` must be a finite number >= 0, got {_kind(damping)}.")


def _check_numbers(name: str, value) -> None:
    if not isinstance(value, list):
        raise ValueError(f"`{name}` must be a list of numbers, got {_kind(value)}.")
    for position, x in enumerate(value):
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
            raise ValueError(f"`{name}` must hold finite numbers only, got {_kind(x)} at position {position}.")
