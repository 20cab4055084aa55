"""PruningPlan: which units survive, as plain data. The contract between scoring and surgery."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field


PLAN_NAME = "pruning_plan.json"
PLAN_FORMAT_VERSION = 2  # the newest format this version reads
# Plans without bias compensation are written as format 1, so older optimum-prune versions still read them; a plan
# with `bias_means` is format 2: an older reader would otherwise drop the compensation silently.
_BIAS_FORMAT_VERSION = 2


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
    """

    model_type: str
    num_layers: int
    unit_counts: dict[str, int] = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)
    bias_means: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    format_version: int = 1

    def __post_init__(self):
        self.kept = {k: sorted(int(i) for i in v) for k, v in self.kept.items()}
        self.removed_layers = sorted(int(i) for i in self.removed_layers)
        for key, kept in self.kept.items():
            total = self.unit_counts.get(key)
            if total is None:
                raise ValueError(f"Plan entry {key!r} has no unit count.")
            if not kept:
                raise ValueError(f"Plan entry {key!r} keeps no unit; at least one must remain.")
            if kept[-1] >= total or kept[0] < 0 or len(set(kept)) != len(kept):
                raise ValueError(f"Plan entry {key!r} has indices outside [0, {total}) or duplicates.")
        if any(not 0 <= i < self.num_layers for i in self.removed_layers):
            raise ValueError(f"`removed_layers` must be in [0, {self.num_layers}), got {self.removed_layers}.")
        if len(self.removed_layers) >= self.num_layers:
            raise ValueError("A plan cannot remove every decoder layer.")
        self.bias_means = {k: {n: [float(x) for x in v] for n, v in m.items()} for k, m in self.bias_means.items()}
        for key in self.bias_means:
            if key not in self.kept:
                raise ValueError(f"`bias_means` has entry {key!r}, which the plan does not prune.")
        if self.bias_means:
            self.format_version = max(self.format_version, _BIAS_FORMAT_VERSION)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if version > PLAN_FORMAT_VERSION:
            raise ValueError(f"Plan format {version} is newer than this optimum-prune understands.")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, PLAN_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> PruningPlan:
        """Read `pruning_plan.json` from a directory (or the file itself)."""
        file = path if str(path).endswith(".json") else os.path.join(path, PLAN_NAME)
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def kept_widths(self, structure: str) -> dict[int, int]:
        """Kept unit count per layer for `structure` (pruned layers only)."""
        prefix = structure + "."
        return {int(k[len(prefix) :]): len(v) for k, v in self.kept.items() if k.startswith(prefix)}

    def apply(self, model):
        """Prune `model` in place exactly as this plan says and return it (see [`surgery.apply_plan`])."""
        from .surgery import apply_plan

        return apply_plan(model, self)
