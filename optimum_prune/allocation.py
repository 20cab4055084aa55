"""Allocation: how many units each group set keeps so that the model loses `pruning_ratio` of its total parameters.

The parameter count of any candidate shape is predicted exactly from the group sets: a tensor sliced along several
dimensions (q_proj rows by heads, columns by hidden channels) keeps the product of the kept fractions. Uniform
allocation gives every structure the same kept fraction, rounds the coarse structures (heads) and lets the finest
one (MLP channels) absorb the rest, so the target is met within a fraction of a point.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict

import torch

from .architectures.base import (
    ATTENTION_HEADS,
    EXPERTS,
    HEAD_STRUCTURES,
    HIDDEN_CHANNELS,
    LAYERS,
    MLP_CHANNELS,
    QUERY_HEADS,
)
from .groups import GroupSet


logger = logging.getLogger(__name__)

TOLERANCE = 0.01  # ±1 point of total parameters
# Coarse structures are rounded first; the last one present absorbs the residual.
ALLOCATION_ORDER = (ATTENTION_HEADS, QUERY_HEADS, EXPERTS, HIDDEN_CHANNELS, MLP_CHANNELS)
CHANNEL_STRUCTURES = (MLP_CHANNELS, HIDDEN_CHANNELS)


class ParameterModel:
    """Predicts the total parameter count for any kept-unit counts of the given group sets."""

    def __init__(self, params: dict[str, torch.Tensor], group_sets: dict[str, GroupSet]):
        self.numel = {name: p.numel() for name, p in params.items()}
        self.total = sum(self.numel.values())
        self.units = {key: gs.num_units for key, gs in group_sets.items()}
        self.touches: dict[str, list[str]] = defaultdict(list)
        for key, gs in group_sets.items():
            for s in gs.slices:
                self.touches[s.name].append(key)

    def count(self, kept: dict[str, float], removed_params: frozenset[str] = frozenset()) -> float:
        total = 0.0
        for name, numel in self.numel.items():
            if name in removed_params:
                continue
            value = float(numel)
            for key in self.touches.get(name, ()):
                value *= kept.get(key, self.units[key]) / self.units[key]
            total += value
        return total


def unit_step(structure: str, round_to: int, groups: int = 1) -> int:
    """Granularity of a structure's kept count: `round_to` for channels, the tie-group count for heads (query heads
    keep equal counts in every KV group, `GroupSet.num_groups`; 1 for untied heads)."""
    return round_to if structure in CHANNEL_STRUCTURES else groups


def _min_units(structure: str, num_units: int, round_to: int, groups: int = 1) -> int:
    # Untied heads may round to 0 here so that the caller can say which layer would lose every head. Tied heads keep
    # one per group: equal counts of zero would leave no attention at all, and a KV head nobody reads.
    if structure in CHANNEL_STRUCTURES:
        return min(num_units, round_to)
    return groups if groups > 1 else 0


def _round_units(structure: str, value: float, num_units: int, round_to: int, groups: int = 1) -> int:
    step = unit_step(structure, round_to, groups)
    rounded = int(round(value / step)) * step
    return max(_min_units(structure, num_units, round_to, groups), min(num_units, rounded))


def uniform_allocation(
    params: dict[str, torch.Tensor],
    group_sets: dict[str, GroupSet],
    structures: list[str],
    pruning_ratio: float,
    round_to: int = 1,
    head_rounding: str = "nearest",
) -> dict[str, int]:
    """Kept units per group set, the same fraction in every layer, meeting `pruning_ratio` of total parameters.

    The coarse structures (heads) are rounded down or up, whichever leaves the finest one nearer the uniform
    fraction; `head_rounding="up"` always rounds kept heads up (removes the floor of the fraction, as FLAP's and
    LLM-Pruner's code do)."""
    model = ParameterModel(params, group_sets)
    target = model.total * (1 - pruning_ratio)
    order = [s for s in ALLOCATION_ORDER if s in structures]
    by_structure = {s: [k for k, gs in group_sets.items() if gs.structure == s] for s in order}

    def kept_at(fraction: float) -> dict[str, float]:
        return {key: fraction * group_sets[key].num_units for keys in by_structure.values() for key in keys}

    if model.count(kept_at(0.0)) > target:
        floor = 1 - model.count(kept_at(0.0)) / model.total
        raise ValueError(
            f"`pruning_ratio={pruning_ratio}` is out of reach with structures {structures}: removing all of them "
            f"would remove only {floor:.1%} of the parameters. Add structures or lower the ratio."
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):  # continuous kept fraction that meets the target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model.count(kept_at(mid)) < target else (lo, mid)
    fraction = (lo + hi) / 2

    finest = order[-1]
    keys = by_structure[finest]
    n, groups = group_sets[keys[0]].num_units, group_sets[keys[0]].num_groups
    step = unit_step(finest, round_to, groups)
    finest_candidates = sorted({_round_units(finest, k, n, round_to, groups) for k in range(0, n + step, step)})

    def coarse_options(structure: str) -> list[int]:
        """Rounding down and up: the finest structure then absorbs whichever leaves it the smaller residual."""
        first = group_sets[by_structure[structure][0]]
        units, groups = first.num_units, first.num_groups
        step = unit_step(structure, round_to, groups)
        exact = fraction * units
        if head_rounding == "up" and structure in HEAD_STRUCTURES:
            return [_round_units(structure, _ceil_steps(exact, step), units, round_to, groups)]
        return sorted(
            {
                _round_units(structure, math.floor(exact / step) * step, units, round_to, groups),
                _round_units(structure, math.ceil(exact / step) * step, units, round_to, groups),
            }
        )

    def best_finest(kept: dict[str, int]) -> dict[str, int]:
        """Bisection over the finest structure's widths (the count grows with the kept width)."""
        lo, hi = 0, len(finest_candidates) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if model.count({**kept, **dict.fromkeys(keys, finest_candidates[mid])}) < target:
                lo = mid + 1
            else:
                hi = mid
        options = [{**kept, **dict.fromkeys(keys, finest_candidates[i])} for i in {max(lo - 1, 0), lo}]
        return min(options, key=lambda c: abs(model.count(c) - target))

    ranked = []
    for combination in itertools.product(*(coarse_options(s) for s in order[:-1])):
        candidate = best_finest({key: k for s, k in zip(order[:-1], combination) for key in by_structure[s]})
        error = abs(model.count(candidate) - target) / model.total
        deviation = sum(
            abs(k / group_sets[by_structure[s][0]].num_units - fraction) for s, k in zip(order, combination)
        )
        # Any combination within 0.1 point is as good on the target: prefer the one closest to a uniform fraction.
        ranked.append((error > 1e-3, deviation, error, candidate))
    kept = min(ranked, key=lambda r: r[:3])[3]

    for structure in HEAD_STRUCTURES:
        for key in by_structure.get(structure, ()):
            if kept[key] < 1:
                raise ValueError(
                    f"`pruning_ratio={pruning_ratio}` would remove every attention head of layer "
                    f"{group_sets[key].layer}; lower the ratio or also prune 'mlp_channels'."
                )
    achieved = 1 - model.count(kept) / model.total
    if abs(achieved - pruning_ratio) > TOLERANCE:
        raise ValueError(
            f"Uniform pruning of {structures} with round_to={round_to} reaches {achieved:.1%} of the parameters, "
            f"not {pruning_ratio:.1%} ±1 point: the units are too coarse. Add 'mlp_channels' or lower `round_to`."
        )
    return kept


def layer_allocation(layer_costs: list[int], total: int, pruning_ratio: float) -> int:
    """How many whole layers to remove to come closest to `pruning_ratio` of `total` parameters."""
    cost = sum(layer_costs) / len(layer_costs)
    best = min(range(len(layer_costs)), key=lambda n: abs(n * cost / total - pruning_ratio))
    achieved = best * cost / total
    if abs(achieved - pruning_ratio) > TOLERANCE:
        options = ", ".join(f"{n} layers = {n * cost / total:.1%}" for n in range(1, min(len(layer_costs), 6)))
        raise ValueError(
            f"Removing whole layers cannot reach {pruning_ratio:.1%} ±1 point of the parameters ({options}). "
            "Choose one of those ratios or prune width structures instead."
        )
    return best


ALLOCATION_MODES = ("uniform", "ratios", "global", "flap")


def _ceil_steps(value: float, step: int) -> int:
    """The smallest multiple of `step` not below `value` (a float a rounding error above a multiple counts as it)."""
    return math.ceil(value / step - 1e-9) * step


def _round_kept(value: float, num_units: int, floor: int, step: int, up: bool = False) -> int:
    """Nearest multiple of `step` (or the next one up with `up`; monotone in `value`), never below `floor` nor above
    `num_units`."""
    rounded = _ceil_steps(value, step) if up else int(round(value / step)) * step
    return max(floor, min(num_units, rounded))


class _StructureWidths:
    """Kept units of one structure's group sets as a monotone function of one pruning level `f`.

    - `"uniform"`: every group set keeps `(1 - f)` of its units (f in [0, 1]).
    - `"ratios"`: the group set of layer `l` keeps `1 - min(1, f * ratio[l])` (f scales the given ratios).
    - `"global"`: the `f` fraction of removable units with the lowest normalised scores across all layers is removed
      (f in [0, 1]); a layer's units below its floor are never removable.
    - `"flap"`: as `"global"`, but over one removal order shared by every structure (`joint_order`, see
      `flap_removal_order`): the `f` fraction of all removable heads *and* channels with the lowest raw scores is
      removed, which is FLAP's single threshold.

    Tied units (`GroupSet.num_groups > 1`, query heads in KV groups) step by their group count and keep at least one
    per group; under global ranking a layer's count of removed units is rounded to whole steps, and which units go is
    decided per group afterwards (`select_top(..., groups=)`).
    """

    def __init__(
        self,
        structure,
        keys,
        group_sets,
        floors,
        step,
        mode,
        ratios=None,
        scores=None,
        normalization="mean",
        allowed=None,
        joint_order=None,
        round_up=False,
    ):
        self.structure = structure
        self.round_up = round_up  # uniform and ratio modes: kept counts round up (`head_rounding="up"`)
        self.allowed = sorted(allowed) if allowed else None
        self.keys = keys
        self.units = {k: group_sets[k].num_units for k in keys}
        # `step`: one int, or one per key (tied heads step by their group count, which may differ by layer).
        self.step = step if isinstance(step, dict) else dict.fromkeys(keys, step)
        # Tied units keep at least one per group, in whole steps.
        self.floors = {
            k: min(self.units[k], -(-max(floors.get(k, 0), group_sets[k].num_groups) // self.step[k]) * self.step[k])
            if group_sets[k].num_groups > 1
            else min(self.units[k], floors.get(k, 0))
            for k in keys
        }
        self.mode = mode
        self.ratios = {k: ratios.get(group_sets[k].layer, 0.0) for k in keys} if mode == "ratios" else None
        if mode == "global":
            # The removal order: each layer's lowest-scoring units above its floor, ranked together.
            entries = []
            for position, key in enumerate(keys):
                score = scores[key].float()
                if normalization == "mean" and len(keys) > 1:
                    score = score / score.abs().mean().clamp_min(1e-12)
                removable = self.units[key] - self.floors[key]
                lowest = sorted(range(score.numel()), key=lambda i: (float(score[i]), i))[:removable]
                entries += [(float(score[i]), position, i) for i in lowest]
            entries.sort()
            self.order = torch.tensor([position for _, position, _ in entries], dtype=torch.long)
        if mode == "flap":
            # Positions of this structure's keys in the shared order; -1 marks another structure's unit.
            position = {k: p for p, k in enumerate(keys)}
            self.order = torch.tensor([position.get(k, -1) for k in joint_order], dtype=torch.long)

    def kept(self, f: float) -> dict[str, int]:
        kept = self._kept(f)
        if self.allowed:  # snap to the nearest allowed count (ties to the larger): still monotone in f
            kept = {
                k: min((a for a in self.allowed if a >= self.floors[k]), key=lambda a: (abs(a - v), -a))
                for k, v in kept.items()
            }
        return kept

    def _kept(self, f: float) -> dict[str, int]:
        if self.mode in ("global", "flap"):
            n = int(round(f * self.order.numel()))
            head = self.order[:n]
            removed = torch.bincount(head[head >= 0], minlength=len(self.keys)).tolist()
            return {
                k: _round_kept(self.units[k] - removed[p], self.units[k], self.floors[k], self.step[k])
                for p, k in enumerate(self.keys)
            }
        return {
            k: _round_kept(
                self.units[k] * (1 - min(1.0, f * (self.ratios[k] if self.ratios else 1.0))),
                self.units[k],
                self.floors[k],
                self.step[k],
                up=self.round_up,
            )
            for k in self.keys
        }


def flap_removal_order(
    group_sets: dict[str, GroupSet], scores: dict[str, torch.Tensor], floors: dict[str, int]
) -> list[str]:
    """FLAP's AL-AM order: every removable unit of every group set, lowest raw score first (ties: key order, then
    unit index), as the key of the group set it belongs to. Each group set contributes its lowest-scoring units
    above its floor, so walking the order lowers one threshold over all layers and structures together."""
    entries = []
    for position, (key, gs) in enumerate(group_sets.items()):
        score = scores[key].float()
        floor = max(floors.get(key, 0), gs.num_groups if gs.num_groups > 1 else 0)  # tied: one unit per group
        removable = gs.num_units - min(gs.num_units, floor)
        lowest = sorted(range(score.numel()), key=lambda i: (float(score[i]), i))[:removable]
        entries += [(float(score[i]), position, i, key) for i in lowest]
    entries.sort()
    return [key for *_, key in entries]


def allocate_widths(
    params: dict[str, torch.Tensor],
    group_sets: dict[str, GroupSet],
    structures: list[str],
    pruning_ratio: float,
    *,
    mode: str = "uniform",
    scores: dict[str, torch.Tensor] | None = None,
    layer_ratios: dict[int, float] | None = None,
    normalization: str = "mean",
    floors: dict[str, int] | None = None,
    round_to: int = 1,
    removed_params: frozenset[str] = frozenset(),
    allowed: dict[str, list[int]] | None = None,
    constraints: str = "",
    head_rounding: str = "nearest",
) -> dict[str, int]:
    """Kept units per prunable group set so that the model loses `pruning_ratio` of its total parameters (±1 point).

    `group_sets` are the prunable ones only (layer ranges applied by the caller); parameters of other layers count
    at full size and `removed_params` (removed layers) count as removed. Every structure moves with one shared
    pruning level (see `_StructureWidths`); the coarse ones (heads) are then fixed and the finest one (MLP channels)
    absorbs the rounding. `allowed` restricts a structure's kept counts (e.g. head counts a stock config accepts);
    `constraints` describes the caller's restrictions for the error messages. `head_rounding="up"` rounds kept head
    counts up in the uniform and ratio modes (see `uniform_allocation`).

    `mode="flap"` is FLAP's adaptive allocation (AL-AM, `prune_flap` in github.com/CASIA-IVA-Lab/FLAP): one threshold
    over the raw scores of heads and channels of every layer. FLAP places it where the kept units, each weighted by
    its parameter cost (a head 512/3 channels at LLaMA-7B's shape), sum to `1 - pruning_ratio` of the *layers'*
    units; here it is placed where the *total* parameter count meets `pruning_ratio`, which is the same rule with
    exact costs and the embeddings counted. Deviations: per-layer floors (`floors`) bound what a layer may lose
    (FLAP's pure threshold kept 19 of 48 heads at 40% in BENCHMARKS.md), and after the shared threshold fixes the
    heads, the MLP channels alone are re-thresholded to absorb the head rounding (a finer step than one head).
    """
    if mode not in ALLOCATION_MODES:
        raise ValueError(f"Allocation `mode` must be one of {ALLOCATION_MODES}, got {mode!r}.")
    floors = floors or {}
    model = ParameterModel(params, group_sets)
    target = model.total * (1 - pruning_ratio)
    order = [s for s in ALLOCATION_ORDER if s in structures and any(gs.structure == s for gs in group_sets.values())]
    if not order:
        raise ValueError(f"No layer may be pruned for {structures}{constraints}; allow some layers.")
    ratios = dict(layer_ratios or {})
    per_structure = _structure_widths(
        order, group_sets, mode, scores, ratios, normalization, floors, round_to, allowed or {}, head_rounding
    )
    f_max = 1.0
    if mode == "ratios":
        positive = [r for r in ratios.values() if r > 0]
        f_max = 1 / min(positive)

    def kept_at(f: float, widths=per_structure) -> dict[str, int]:
        return {k: v for w in widths for k, v in w.kept(f).items()}

    def achieved(kept: dict[str, int]) -> float:
        return 1 - model.count(kept, removed_params) / model.total

    most = achieved(kept_at(f_max))
    if most < pruning_ratio - TOLERANCE:
        raise ValueError(
            f"`pruning_ratio={pruning_ratio}` is out of reach: pruning {order}{constraints} as far as the floors allow "
            f"removes only {most:.1%} of the parameters. Allow more layers, lower `min_heads`/`min_channels`, add "
            "structures or lower the ratio."
        )
    if mode == "ratios" and abs(achieved(kept_at(1.0)) - pruning_ratio) <= TOLERANCE:
        return kept_at(1.0)  # the ratios as given meet the target: use them exactly

    kept = _closest(per_structure, model, target, f_max, removed_params, achieved, pruning_ratio)
    reached = achieved(kept)
    if abs(reached - pruning_ratio) > TOLERANCE:
        raise ValueError(
            f"Pruning {order}{constraints} with round_to={round_to} reaches {reached:.1%} of the parameters, not "
            f"{pruning_ratio:.1%} ±1 point: the units are too coarse. Add 'mlp_channels', lower `round_to` or allow "
            "more layers."
        )
    return kept


def _structure_widths(
    order, group_sets, mode, scores, ratios, normalization, floors, round_to, allowed, head_rounding
):
    """One `_StructureWidths` per structure in allocation order (FLAP: one removal order over all of them)."""
    joint_order = None
    if mode == "flap":
        if HIDDEN_CHANNELS in order:
            raise ValueError(
                "`mode='flap'` ranks per-layer heads and channels; it does not apply to 'hidden_channels'."
            )
        joint_order = flap_removal_order(group_sets, scores, floors)
    per_structure = []
    for s in order:
        keys = [k for k, gs in group_sets.items() if gs.structure == s]
        step = {k: unit_step(s, round_to, group_sets[k].num_groups) for k in keys}
        structure_mode = "uniform" if s == HIDDEN_CHANNELS else mode  # hidden channels are shared by every layer
        widths = _StructureWidths(
            s,
            keys,
            group_sets,
            floors,
            step,
            structure_mode,
            ratios,
            scores,
            normalization,
            allowed.get(s),
            joint_order,
            round_up=head_rounding == "up" and s in HEAD_STRUCTURES,
        )
        per_structure.append(widths)
    return per_structure


def _closest(per_structure, model, target, f_max, removed_params, achieved, pruning_ratio) -> dict[str, int]:
    """The kept counts closest to the target: bisect the shared pruning level of every structure, then fix the
    coarse ones and bisect the finest (last) one alone to absorb their rounding."""

    def kept_at(f: float, widths) -> dict[str, int]:
        return {k: v for w in widths for k, v in w.kept(f).items()}

    def bisect(widths, fixed: dict[str, int]) -> list[dict[str, int]]:
        """The two candidates around the target for the pruning level of `widths` (others `fixed`)."""
        lo, hi = 0.0, f_max
        for _ in range(60):
            mid = (lo + hi) / 2
            if model.count({**fixed, **kept_at(mid, widths)}, removed_params) > target:
                lo = mid
            else:
                hi = mid
        return [{**fixed, **kept_at(lo, widths)}, {**fixed, **kept_at(hi, widths)}]

    finest = set(per_structure[-1].keys)
    candidates = []
    for joint in bisect(per_structure, {}):
        coarse = {k: v for k, v in joint.items() if k not in finest}
        candidates += bisect(per_structure[-1:], coarse) if len(per_structure) > 1 else [joint]
    if not any(w.round_up for w in per_structure[:-1]):
        return min(candidates, key=lambda c: abs(achieved(c) - pruning_ratio))

    def preference(kept: dict[str, int]) -> tuple:
        """Rounding up: on target, the candidate that keeps more coarse units (the upper side of the head step)."""
        error = abs(achieved(kept) - pruning_ratio)
        return error > TOLERANCE, -sum(v for k, v in kept.items() if k not in finest), error

    return min(candidates, key=preference)


def select_top(scores: torch.Tensor, k: int, groups: int = 1) -> list[int]:
    """Indices of the `k` highest scores, ties broken towards lower indices, sorted.

    With `groups > 1` the scores form that many equal contiguous groups (`GroupSet.num_groups`, query heads in their
    KV groups) and each group keeps its own `k // groups` highest: `k` must be a multiple of `groups`.
    """
    if groups == 1:
        order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
        return sorted(order[:k])
    n = scores.numel()
    if n % groups or k % groups:
        raise ValueError(f"Cannot keep {k} of {n} units in {groups} equal groups: both must be multiples of {groups}.")
    size = n // groups
    kept = []
    for g in range(groups):
        kept += [g * size + i for i in select_top(scores[g * size : (g + 1) * size], k // groups)]
    return kept


__all__ = [
    "ALLOCATION_MODES",
    "LAYERS",
    "ParameterModel",
    "allocate_widths",
    "flap_removal_order",
    "layer_allocation",
    "select_top",
    "uniform_allocation",
]
