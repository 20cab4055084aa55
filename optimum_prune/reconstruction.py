"""Layer-wise reconstruction: refit the consumer Linears of pruned structures by ridge least squares.

After a layer's units are chosen, every consumer of a pruned structure (the Linear that reads the units: LLaMA's
`o_proj`/`down_proj`, OPT's `out_proj`/`fc2`, BLOOM's `dense`/`dense_4h_to_h`, GLM's `o_proj`/`down_proj`, declared
as `Member(..., consumer=True)` in each family's spec) gets new weights on its kept input columns,

    W' = argmin ||Xs W'^T - Y||^2 + lambda ||W'||^2 = Y^T Xs (Xs^T Xs + lambda I)^-1,

where `Xs` are the *pruned* model's own inputs to that Linear (every earlier layer already pruned and refit, and in
the same layer the consumers before it, as SparseGPT proceeds), `Y` the *unpruned* Linear's outputs on the unpruned
model's inputs, and `lambda = damping * mean(diag(Xs^T Xs))`. Only the Gram matrix `Xs^T Xs` [kept, kept] and the
cross term `Xs^T Y` [kept, out] are accumulated, in float64, batch by batch; never the activations.

Biases: a consumer that has a bias (OPT, BLOOM) or that bias compensation gives one (the plan has `bias_means` for it)
is fit with an intercept: a ones column is appended to `Xs` and left undamped, which is ridge regression on centred
inputs with the bias fit exactly. FLAP's bias compensation (the removed channels' mean contribution folded into the
bias, weights kept) is the zeroth-order special case; with reconstruction the intercept replaces it. A consumer without
a bias and without compensation is fit without one, so the checkpoint keeps its shape.

The pass runs on the *unpruned-shaped* layer: the pruned layer computes exactly what the unpruned one computes with
the removed units' consumer columns zeroed (the project's exactness property), so the removed columns are zeroed, the
kept ones refit, and ordinary surgery then slices the layer as the plan says. Every engine (in memory, streaming) runs
this same function on one layer at a time, so they give the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import layer_output
from .groups import GroupSet, decoder_layers
from .surgery import add_missing_biases, check_plan, consumer_modules, removed_channels


logger = logging.getLogger(__name__)

DEFAULT_DAMPING = 1e-2


@dataclass
class RefitStatistics:
    """What one consumer's refit needs, summed over calibration tokens in float64.

    `gram` is `Xs^T Xs` [k(+1), k(+1)] and `cross` is `Xs^T Y` [k(+1), out], with `Xs` the kept input columns (and a
    ones column last when `intercept`)."""

    gram: torch.Tensor
    cross: torch.Tensor
    intercept: bool
    tokens: int = 0

    @classmethod
    def empty(cls, in_features: int, out_features: int, intercept: bool, device=None) -> RefitStatistics:
        size = in_features + int(intercept)
        gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        return cls(gram, torch.zeros(size, out_features, dtype=torch.float64, device=device), intercept)

    def add(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add tokens: `inputs` [..., k] (the pruned model's kept input columns), `targets` [..., out]."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.gram.device, torch.float64)
        y = targets.reshape(-1, targets.shape[-1]).to(self.gram.device, torch.float64)
        if self.intercept:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        self.gram.addmm_(x.T, x)
        self.cross.addmm_(x.T, y)
        self.tokens += x.shape[0]


def ridge_refit(stats: RefitStatistics, damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Solve the ridge problem of `stats`: returns the weight [out, k] and, with an intercept, the bias [out]
    (float64). `damping=0` is ordinary least squares (the minimum-norm solution when the Gram matrix is singular)."""
    k = stats.gram.shape[0] - int(stats.intercept)
    gram = stats.gram.clone()
    if damping > 0 and k:
        diag = torch.arange(k, device=gram.device)
        gram[diag, diag] += damping * gram.diagonal()[:k].mean().clamp_min(torch.finfo(torch.float64).tiny)
    # Undamped, the Gram matrix may be singular (dependent or silent inputs) while Cholesky still succeeds on its
    # rounding errors: take the minimum-norm least-squares solution from the pseudo-inverse instead.
    factor, info = torch.linalg.cholesky_ex(gram) if damping > 0 else (None, 1)
    if int(info) == 0:
        solution = torch.cholesky_solve(stats.cross, factor)  # [k(+1), out]
    else:
        solution = torch.linalg.pinv(gram, hermitian=True) @ stats.cross
    weight = solution[:k].T.contiguous()
    return weight, (solution[k] if stats.intercept else None)


def refit_workspace_bytes(in_features: int, out_features: int) -> int:
    """Peak bytes of one consumer's refit with `in_features` kept inputs: the float64 Gram matrix, its damped copy and
    Cholesky factor [k, k], and the cross term, solution and transposed weight [k, out] (what `ridge_refit` holds)."""
    return 8 * 3 * in_features * (in_features + out_features)


@dataclass
class Consumer:
    """One Linear of a decoder layer to refit: its path in the layer, the input columns the plan keeps and whether
    its fit has an intercept (its bias)."""

    path: str
    kept_columns: torch.Tensor  # LongTensor [k], ascending
    intercept: bool


def layer_consumers(layer: nn.Module, spec, plan, group_sets: dict[str, GroupSet], layer_index: int) -> list[Consumer]:
    """The consumers of decoder layer `layer_index` that `plan` prunes, in the layer's forward order (attention
    before MLP: the spec's structure order), with the columns they keep."""
    consumers = []
    for structure in spec.structures:
        for key, kept in plan.kept.items():
            group_set = group_sets.get(key)
            if group_set is None or group_set.layer != layer_index or group_set.structure != structure:
                continue
            for s, path in consumer_modules(spec, group_set):
                module = layer.get_submodule(path)
                removed = removed_channels(group_set, s, group_set.num_units, kept, module.in_features)
                mask = torch.ones(module.in_features, dtype=torch.bool)
                mask[removed] = False
                compensated = s.name in plan.bias_means.get(key, {})
                consumers.append(Consumer(path, mask.nonzero().flatten(), module.bias is not None or compensated))
    return consumers


class _Stop(Exception):
    """Raised by a capture hook once its Linear has run: the rest of the layer's forward is not needed."""


@contextmanager
def _capture(module: nn.Module, store: dict, what: str) -> Iterator[None]:
    """Record `module`'s input (`what="input"`) or output (`"output"`) in `store[what]` and stop the forward."""

    def hook(mod, args, output):
        store[what] = args[0] if what == "input" else output
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _run_until(layer: nn.Module, module: nn.Module, what: str, hidden, args, kwargs) -> torch.Tensor:
    """`module`'s input or output when `layer` runs on one batch (the forward stops there)."""
    store: dict = {}
    with _capture(module, store, what):
        try:
            layer(hidden, *args, **kwargs)
        except _Stop:
            pass
    if what not in store:
        raise RuntimeError(f"The layer's forward never ran {type(module).__name__}; it cannot be refit.")
    return store[what]


@contextmanager
def _weights(layer: nn.Module, tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> Iterator[None]:
    """Run `layer` with the consumers' weights and biases set to `tensors` ({path: (weight, bias)}), then restore."""
    saved = {}
    for path, (weight, bias) in tensors.items():
        module = layer.get_submodule(path)
        saved[path] = (module.weight.data, None if module.bias is None else module.bias.data)
        module.weight.data = weight
        if bias is not None:
            module.bias.data = bias
    try:
        yield
    finally:
        for path, (weight, bias) in saved.items():
            module = layer.get_submodule(path)
            module.weight.data = weight
            if bias is not None:
                module.bias.data = bias


def _add_zero_bias(module: nn.Linear) -> None:
    weight = module.weight
    module.bias = nn.Parameter(
        torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad
    )


def _pruned_start(module: nn.Linear, consumer: Consumer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The consumer as the pruned layer has it before its refit: removed input columns zeroed."""
    weight = torch.zeros_like(module.weight.data)
    columns = consumer.kept_columns.to(weight.device)
    weight[:, columns] = module.weight.data[:, columns]
    return weight, None if module.bias is None else module.bias.data.clone()


@torch.no_grad()
def reconstruct_layer(layer: nn.Module, consumers: list[Consumer], full, pruned, damping: float) -> list[str]:
    """Refit `consumers` of one unpruned-shaped decoder layer in place, then advance both streams to the next layer.

    `full` and `pruned` are the layer's inputs (`streaming.LayerInputs`: hidden states, args, kwargs per batch) in the
    unpruned and in the pruned-and-refit model. Consumers are refit in order, each on the pruned stream's inputs with
    the earlier ones already refit. The layer is left with every consumer's removed columns zeroed and its kept
    columns (and bias, with an intercept) refit, ready for surgery to slice; both streams' hidden states are replaced
    by the layer's outputs. Returns the consumer paths that gained a (zero-initialised, then fit) bias.
    """
    added = []
    for consumer in consumers:
        module = layer.get_submodule(consumer.path)
        if consumer.intercept and module.bias is None:
            _add_zero_bias(module)
            added.append(consumer.path)
    original = {c.path: (layer.get_submodule(c.path).weight.data, layer.get_submodule(c.path).bias) for c in consumers}
    original = {p: (w, None if b is None else b.data) for p, (w, b) in original.items()}
    current = {c.path: _pruned_start(layer.get_submodule(c.path), c) for c in consumers}
    for consumer in consumers:
        module = layer.get_submodule(consumer.path)
        stats = RefitStatistics.empty(
            consumer.kept_columns.numel(), module.out_features, consumer.intercept, module.weight.device
        )
        columns = consumer.kept_columns.to(module.weight.device)
        for (h_full, a_full, k_full), (h_pruned, a_pruned, k_pruned) in zip(_batches(full), _batches(pruned)):
            with _weights(layer, original):
                targets = _run_until(layer, module, "output", h_full, a_full, k_full)
            with _weights(layer, current):
                inputs = _run_until(layer, module, "input", h_pruned, a_pruned, k_pruned)
            stats.add(inputs.index_select(-1, columns), targets)
        weight, bias = ridge_refit(stats, damping)
        new_weight = torch.zeros_like(module.weight.data)
        new_weight[:, columns] = weight.to(new_weight.dtype)
        new_bias = current[consumer.path][1]
        if bias is not None:
            new_bias = bias.to(module.bias.dtype)
        current[consumer.path] = (new_weight, new_bias)
    with _weights(layer, original):
        _advance(layer, full)
    for path, (weight, bias) in current.items():
        module = layer.get_submodule(path)
        module.weight.data = weight
        if bias is not None:
            module.bias.data = bias
    _advance(layer, pruned)
    return added


def _batches(inputs):
    return zip(inputs.hidden, inputs.args, inputs.kwargs)


def _advance(layer: nn.Module, inputs) -> None:
    """Replace each batch's hidden states by `layer`'s output (the next layer's inputs)."""
    for hidden, args, kwargs in _batches(inputs):
        hidden.copy_(layer_output(layer(hidden, *args, **kwargs)))


@torch.no_grad()
def reconstruct_model(model: nn.Module, spec, plan, full, damping: float, compute_dtype=None) -> None:
    """Refit every consumer `plan` prunes in `model` (unpruned, all layers in memory), layer by layer from the first
    layer's inputs `full` (consumed: they end as the last layer's outputs); `surgery.apply_plan` then slices it. The
    consumers that gained a bias get one in every layer, and the config field that builds it (`bias_fields`).

    With `compute_dtype` (`full` then in that dtype), each layer is refit as a `compute_dtype` copy and cast back, one
    layer at a time, as streaming refits its loaded layer: a bfloat16 model is refit in float32 on CPUs without
    native bfloat16 instead of through PyTorch's slow bfloat16 fallback."""
    group_sets = check_plan(model, plan, spec)
    pruned = pruned_stream(full)
    added: set[str] = set()
    for index, layer in enumerate(decoder_layers(model, spec)):
        consumers = layer_consumers(layer, spec, plan, group_sets, index)
        with _layer_in(layer, compute_dtype):
            added.update(reconstruct_layer(layer, consumers, full, pruned, damping))
        logger.info("Layer %d refit (%d consumers).", index, len(consumers))
    add_missing_biases(model, spec, added)


@contextmanager
def _layer_in(layer: nn.Module, dtype) -> Iterator[None]:
    """`layer`'s floating-point parameters in `dtype` while active, then each back in its own dtype (a parameter
    added meanwhile, such as a fitted bias, takes its module's weight dtype). Nothing happens with `dtype=None`."""
    own = {name: p.dtype for name, p in layer.named_parameters() if p.is_floating_point() and p.dtype != dtype}
    if dtype is None or not own:
        yield
        return
    for name, param in layer.named_parameters():
        if name in own:
            param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for name, param in layer.named_parameters():
            owner = name.rpartition(".")[0]
            back = own.get(name, own.get(f"{owner}.weight" if owner else "weight"))
            if back is not None and param.is_floating_point() and param.dtype != back:
                param.data = param.data.to(back)


def pruned_stream(full):
    """The pruned model's first-layer inputs: the same as the unpruned model's (width pruning changes nothing before
    the first layer), as a separate copy of the hidden states."""
    return type(full)([h.clone() for h in full.hidden], list(full.args), list(full.kwargs))
