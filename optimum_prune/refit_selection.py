"""Choosing a layer's units by the error left after the refit (structured OBS, as SlimGPT and ZipLM do).

With reconstruction, what a consumer's kept columns lose is not their contribution to the output but only the part the
refit of the other columns cannot make up. For the ridge problem of one consumer (`reconstruction.RefitStatistics`:
Gram matrix `G = Xs^T Xs + lambda I` over *all* its input columns, cross term `C = Xs^T Y`) whose solution over a set
A of columns is `B = G_AA^-1 C_A`, removing the columns S of one unit raises the least-squares residual by exactly

    delta(S) = tr(B_S^T [(G_AA^-1)_SS]^-1 B_S),

and after the removal `G^-1` and `B` over A \\ S follow from the same blocks (the block-inverse update). Backward
elimination removes, step by step, the units with the smallest `delta` and updates both; the kept units are refit
afterwards exactly as with any other choice, so the weights are `ridge_refit` of the kept columns' statistics. The
criterion still sets how many units each layer keeps (the allocation); this chooses which.

Each step removes up to `ceil(alive / STEP_FRACTION)` units at once (one at a time for heads; a few percent of the
channels for MLPs), so a layer costs O(log) steps of matrix products instead of one rank-1 update per channel: about
2 n^2 (n - k) multiply-adds in float64 for n columns of which k stay (8.7 s for n = 4096, k = 3000 on one CPU thread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


RECONSTRUCTION_SELECTIONS = ("criterion", "error")  # `PrunerConfig.reconstruction_selection`
RECONSTRUCTION_TARGETS = ("residual", "output")  # `PrunerConfig.reconstruction_target`
STEP_FRACTION = 32  # at most 1/32 of the remaining units are removed per elimination step


@dataclass
class UnitChoice:
    """The units of one plan entry (`key`) that a consumer chooses among: `columns[u]` are unit u's input columns of
    the consumer [units, per unit]; `keep` units stay. `kept` holds the choice once made (ascending)."""

    key: str
    columns: torch.Tensor  # LongTensor [units, per unit]
    keep: int
    kept: list[int] = field(default_factory=list)


def damped_gram(gram: torch.Tensor, columns: int, damping: float) -> torch.Tensor:
    """`gram` with `damping x mean diagonal` added to its first `columns` diagonal entries (an intercept, last, is
    not damped), as `reconstruction.ridge_refit` damps it."""
    gram = gram.clone()
    if damping > 0 and columns:
        diag = torch.arange(columns, device=gram.device)
        gram[diag, diag] += damping * gram.diagonal()[:columns].mean().clamp_min(torch.finfo(gram.dtype).tiny)
    return gram


def _inverse(gram: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_inverse(factor)
    return torch.linalg.pinv(gram, hermitian=True)


def removal_costs(inverse: torch.Tensor, solution: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`delta(S)` of every unit (rows of `columns`): the residual increase if that unit alone were removed now."""
    blocks = inverse[columns.unsqueeze(-1), columns.unsqueeze(-2)]  # [U, d, d]
    rows = solution[columns]  # [U, d, out]
    if columns.shape[1] == 1:
        return rows.squeeze(1).square().sum(-1) / blocks.flatten().clamp_min(torch.finfo(blocks.dtype).tiny)
    return (rows * torch.linalg.solve(blocks, rows)).sum((-2, -1))


def _remove(inverse: torch.Tensor, solution: torch.Tensor, removed: torch.Tensor) -> None:
    """Update the inverse and the solution in place to the columns without `removed` (whose rows become 0). Updating
    in place beats dropping the removed rows and columns, whose copies cost more than the products they save."""
    block = inverse[removed][:, removed]
    columns = inverse[:, removed]  # a copy [n, s]: the in-place products below read no aliased memory
    solution.addmm_(columns, torch.linalg.solve(block, solution[removed]), alpha=-1)
    inverse.addmm_(columns, torch.linalg.solve(block, inverse[removed]), alpha=-1)


def _eliminate(inverse: torch.Tensor, solution: torch.Tensor, columns: torch.Tensor, keep: int):
    """Backward elimination down to `keep` units: yields each step's removed units with their costs then, and updates
    `inverse` and `solution` in place while another step follows (`columns` [units, per unit])."""
    alive = list(range(columns.shape[0]))
    while len(alive) > keep:
        costs = removal_costs(inverse, solution, columns[alive])
        count = min(len(alive) - keep, math.ceil(len(alive) / STEP_FRACTION))
        order = sorted(range(len(alive)), key=lambda i: (float(costs[i]), alive[i]))[:count]
        removed = [alive[i] for i in order]
        yield removed, [float(costs[i]) for i in order]
        alive = [u for u in alive if u not in set(removed)]
        if len(alive) > keep:
            _remove(inverse, solution, columns[removed].flatten())


def choose_units(gram: torch.Tensor, cross: torch.Tensor, choice: UnitChoice, damping: float, intercept: bool) -> list:
    """The `choice.keep` units whose removal of the others leaves the least refit residual, by backward elimination
    (`gram` [n(+1), n(+1)] and `cross` [n(+1), out] over every input column, an intercept last)."""
    inverse = _inverse(damped_gram(gram, gram.shape[0] - int(intercept), damping))
    removed = set()
    for units, _ in _eliminate(inverse, inverse @ cross, choice.columns.to(gram.device), choice.keep):
        removed.update(units)
    return [u for u in range(choice.columns.shape[0]) if u not in removed]


def elimination_costs(gram: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor, damping: float) -> torch.Tensor:
    """Each unit's cost along the backward elimination of a Linear's inputs down to nothing, as one score per unit
    (higher: removed later, more important): the residual increase when it is removed, made non-decreasing along the
    path (a unit removed later never scores below one removed before it). The targets are the Linear's own outputs,
    `C = G W^T` (the unpruned model, whose refit with every column kept returns `W`). `gram` [n, n], `weight`
    [out, n], `columns` [units, per unit]; float64 [units]."""
    inverse = _inverse(damped_gram(gram, gram.shape[0], damping))
    solution = inverse @ (gram @ weight.detach().T.to(gram.dtype))
    costs_along_path = torch.zeros(columns.shape[0], dtype=torch.float64)
    highest = 0.0
    for units, costs in _eliminate(inverse, solution, columns.to(gram.device), keep=0):
        for unit, cost in zip(units, costs):
            highest = max(highest, cost)
            costs_along_path[unit] = highest
    return costs_along_path
