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

from .architectures.base import ATTENTION_HEADS, HIDDEN_CHANNELS, LAYERS, MLP_CHANNELS
from .groups import GroupSet


logger = logging.getLogger(__name__)

TOLERANCE = 0.01  # ±1 point of total parameters
# Coarse structures are rounded first; the last one present absorbs the residual.
ALLOCATION_ORDER = (ATTENTION_HEADS, HIDDEN_CHANNELS, MLP_CHANNELS)
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


def _min_units(structure: str, num_units: int, round_to: int) -> int:
    # Heads may round to 0 here so that the caller can say which layer would lose every head.
    return min(num_units, round_to) if structure in CHANNEL_STRUCTURES else 0


def _round_units(structure: str, value: float, num_units: int, round_to: int) -> int:
    step = round_to if structure in CHANNEL_STRUCTURES else 1
    rounded = int(round(value / step)) * step
    return max(_min_units(structure, num_units, round_to), min(num_units, rounded))


def uniform_allocation(
    params: dict[str, torch.Tensor],
    group_sets: dict[str, GroupSet],
    structures: list[str],
    pruning_ratio: float,
    round_to: int = 1,
) -> dict[str, int]:
    """Kept units per group set, the same fraction in every layer, meeting `pruning_ratio` of total parameters."""
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
    n = group_sets[keys[0]].num_units
    step = round_to if finest in CHANNEL_STRUCTURES else 1
    finest_candidates = sorted({_round_units(finest, k, n, round_to) for k in range(0, n + step, step)})

    def coarse_options(structure: str) -> list[int]:
        """Rounding down and up: the finest structure then absorbs whichever leaves it the smaller residual."""
        units = group_sets[by_structure[structure][0]].num_units
        step = round_to if structure in CHANNEL_STRUCTURES else 1
        exact = fraction * units
        return sorted(
            {
                _round_units(structure, math.floor(exact / step) * step, units, round_to),
                _round_units(structure, math.ceil(exact / step) * step, units, round_to),
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

    if ATTENTION_HEADS in structures:
        for key in by_structure[ATTENTION_HEADS]:
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


def select_top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the `k` highest scores, ties broken towards lower indices, sorted."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


__all__ = ["LAYERS", "ParameterModel", "layer_allocation", "select_top", "uniform_allocation"]
