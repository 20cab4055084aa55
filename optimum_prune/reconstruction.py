"""Layer-wise reconstruction: refit the consumer Linears of pruned structures by ridge least squares.

After a layer's units are chosen, every consumer of a pruned structure (the Linear that reads the units: LLaMA's
`o_proj`/`down_proj`, OPT's `out_proj`/`fc2`, BLOOM's `dense`/`dense_4h_to_h`, GLM's `o_proj`/`down_proj`, declared
as `Member(..., consumer=True)` in each family's spec) gets new weights on its kept input columns,

    W' = argmin ||Xs W'^T - Y||^2 + lambda ||W'||^2 = Y^T Xs (Xs^T Xs + lambda I)^-1,

where `Xs` are the *pruned* model's own inputs to that Linear (every earlier layer already pruned and refit, and in
the same layer the consumers before it, as SparseGPT proceeds), `Y` the *unpruned* Linear's outputs on the unpruned
model's inputs, and `lambda = damping * mean(diag(Xs^T Xs))`. Only the Gram matrix `Xs^T Xs` [kept, kept] and the
cross term `Xs^T Y` [kept, out] are accumulated, in float64, batch by batch; never the activations.

The residual target (`reconstruction_target="residual"`, the default; plan `reconstruction["target"]`): where each
sublayer adds its consumer's output straight into the residual stream (`ArchitectureSpec.residual_adds`), `Y` also
makes up the drift between the unpruned and the pruned stream at that point, so the refit corrects what earlier
layers left as well as its own layer's error: attention's consumer is fit to `Y + h_full - h_pruned` (the layer
inputs' difference: the pruned stream after attention then matches the unpruned one as closely as the kept columns
allow), the MLP's to the unpruned layer output less the rest of the pruned layer's output (`_inputs_and_targets`).
Families with a norm after each sublayer (Gemma, GLM-4) keep the layer-local target.

Biases: a consumer that has a bias (OPT, BLOOM) or that bias compensation gives one (the plan has `bias_means` for it)
is fit with an intercept: a ones column is appended to `Xs` and left undamped, which is ridge regression on centred
inputs with the bias fit exactly. FLAP's bias compensation (the removed channels' mean contribution folded into the
bias, weights kept) is the zeroth-order special case; with reconstruction the intercept replaces it. A consumer without
a bias and without compensation is fit without one, so the checkpoint keeps its shape.

Mixture-of-Experts layers (fused experts, `mlp.experts.down_proj` [E, H, I]): attention's `o_proj` is refit as above.
Each kept expert's `down_proj` [H, I] is refit on its kept channels, one ridge problem per expert over the tokens the
pruned layer routes to it, each token's row of `Xs` and `Y` scaled by its gate weight g (so the Gram matrix sums
g^2 x x^T): the layer adds g * expert(x), so this is the least-squares problem of the expert's share of the layer
output, exactly the layer's under top-1 routing and the block-diagonal part of the joint problem under top-k
(`_refit_experts`). `Y` is the unpruned expert's output on the unpruned model's input at that token. Removed experts
have no consumer (their output goes straight into the residual stream): they are refit nothing, and the pruned stream
routes around them (router logits at -inf, `RoutedAround`) so that later consumers and layers see the pruned layer.
Qwen2-MoE's shared expert is never pruned, so it is not refit. Under the residual target the experts' sum ends the
layer, and each routed expert's target also takes a share of the drift, `(T - S) / sum(g)` per token (`T` the
unpruned layer output less the rest of the pruned one, `S` the gate-weighted sum of the routed experts' unpruned
outputs): were every expert fit exactly, the layer would give `T` (`_experts_drift`).

The pass runs on the *unpruned-shaped* layer: the pruned layer computes exactly what the unpruned one computes with
the removed units' consumer columns zeroed (the project's exactness property), so the removed columns are zeroed, the
kept ones refit, and ordinary surgery then slices the layer as the plan says. Every engine (in memory, streaming) runs
this same function on one layer at a time, so they give the same weights.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .architectures.base import EXPERTS, RESIDUAL_SIDES
from .calibration import expert_hidden, layer_output
from .groups import GroupSet, decoder_layers, get_submodule_or_none, layer_prefix
from .refit_selection import UnitChoice, choose_units, damped_gram
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

    def subset(self, columns: torch.Tensor) -> RefitStatistics:
        """The statistics of the input columns `columns` only (the intercept, if any, kept last)."""
        index = columns.to(self.gram.device)
        if self.intercept:
            index = torch.cat([index, torch.tensor([self.gram.shape[0] - 1], device=index.device)])
        return RefitStatistics(self.gram[index][:, index], self.cross[index], self.intercept, self.tokens)

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
    gram = damped_gram(stats.gram, k, damping)
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
    """Peak bytes of one consumer's refit with `in_features` inputs, in float64: choosing units by refit error
    (`refit_selection.choose_units`) holds the Gram matrix, its damped copy, Cholesky factor and inverse [n, n] and the
    cross term and solution [n, out]; `ridge_refit` then holds three [k, k] and three [k, out] of the kept ones."""
    return 8 * max(4 * in_features**2 + 2 * in_features * out_features, 3 * in_features * (in_features + out_features))


def experts_refit_bytes(layers, spec) -> int:
    """Peak bytes of the widest MoE layer's expert refit: every expert's problem is accumulated in one pass over the
    calibration batches, so E workspaces of its channel width at once (0 for a model without fused experts)."""
    path = spec.extra.get("experts_module")
    widest = 0
    for layer in layers if path else ():
        experts = get_submodule_or_none(layer, path)
        if experts is not None:
            num_experts, hidden, width = experts.down_proj.shape
            widest = max(widest, num_experts * refit_workspace_bytes(width, hidden))
    return widest


@dataclass
class Consumer:
    """One Linear of a decoder layer to refit: its path in the layer, the input columns the plan keeps and whether
    its fit has an intercept (its bias)."""

    path: str
    kept_columns: torch.Tensor  # LongTensor [k], ascending
    intercept: bool
    choice: UnitChoice | None = None  # with selection by refit error: the units to choose among
    # With `plan.reconstruction["target"] == "residual"`, where the consumer's output joins the residual stream
    # (`RESIDUAL_SIDES`): "input" (added to the layer's input) or "output" (the last sum, the layer's output).
    residual: str | None = None


@dataclass
class ExpertConsumer:
    """The fused experts of an MoE layer whose channels are pruned (`mlp.experts`: `down_proj` [E, H, I] reads them):
    each kept expert's `down_proj` is refit on its kept columns, on the tokens routed to it (see `_refit_experts`)."""

    path: str
    kept_columns: torch.Tensor  # LongTensor [k], ascending: channels kept in every expert (tied across experts)
    experts: torch.Tensor  # LongTensor: the experts the plan keeps; the removed ones are routed around, not refit
    residual: str | None = None  # "output" with the residual target: the experts' sum ends the layer


@dataclass
class RoutedAround:
    """A router (`mlp.gate`) whose removed experts the pruned layer never picks: the pruned stream runs it on its kept
    rows only (softmax and top-k over the kept experts' logits = over all with the others at -inf)."""

    path: str
    kept: torch.Tensor  # LongTensor [kept experts], ascending


def _layer_group_sets(spec, plan, group_sets: dict[str, GroupSet], layer_index: int):
    """`(key, group set, kept units)` of the layer's pruned group sets, in the spec's structure (forward) order."""
    for structure in spec.structures:
        for key, kept in plan.kept.items():
            group_set = group_sets.get(key)
            if group_set is not None and group_set.layer == layer_index and group_set.structure == structure:
                yield key, group_set, kept


def layer_routers(spec, plan, group_sets: dict[str, GroupSet], layer_index: int) -> list[RoutedAround]:
    """The routers of decoder layer `layer_index` whose experts `plan` removes, with the experts kept."""
    found = []
    for _, group_set, kept in _layer_group_sets(spec, plan, group_sets, layer_index):
        if group_set.structure == EXPERTS:
            router = spec.structures[EXPERTS].members[0].name.rpartition(".")[0]  # "mlp.gate"
            found.append(RoutedAround(router, torch.tensor(sorted(kept), dtype=torch.long)))
    return found


def layer_consumers(layer: nn.Module, spec, plan, group_sets: dict[str, GroupSet], layer_index: int) -> list:
    """The consumers of decoder layer `layer_index` that `plan` prunes, in the layer's forward order (attention
    before MLP: the spec's structure order), with the columns they keep: [`Consumer`]s (Linears) and
    [`ExpertConsumer`]s (fused experts, whose removed experts are not refit). Removing whole experts alone leaves
    no consumer to refit: what reads an expert's output is the residual stream itself.

    With `plan.reconstruction["selection"] == "error"`, a group set read by a single Linear, without bias
    compensation or tied groups, has its units chosen anew by that Linear's refit error (`Consumer.choice`): the
    plan then gives only how many units it keeps."""
    consumers = []
    prefix = layer_prefix(spec, layer_index)
    kept_experts = {r.path: r.kept for r in layer_routers(spec, plan, group_sets, layer_index)}
    selecting = plan.reconstruction.get("selection") == "error"
    residual = plan.reconstruction.get("target") == "residual"
    for key, group_set, kept in _layer_group_sets(spec, plan, group_sets, layer_index):
        linears = consumer_modules(spec, group_set)
        side = RESIDUAL_SIDES.get(group_set.structure) if residual else None
        for s, path in linears:
            module = layer.get_submodule(path)
            removed = removed_channels(group_set, s, group_set.num_units, kept, module.in_features)
            mask = torch.ones(module.in_features, dtype=torch.bool)
            mask[removed] = False
            compensated = s.name in plan.bias_means.get(key, {})
            consumer = Consumer(path, mask.nonzero().flatten(), module.bias is not None or compensated, residual=side)
            if selecting and len(linears) == 1 and group_set.num_groups == 1 and not plan.bias_means.get(key):
                columns = s.unit_indices(module.in_features, group_set.num_units).reshape(group_set.num_units, -1)
                consumer.choice = UnitChoice(key, columns, len(kept))
            consumers.append(consumer)
        for s in group_set.slices:
            if s.consumer and s.dim == 2:  # fused experts' down_proj [E, H, I]
                path = s.name.removeprefix(prefix).rpartition(".")[0]
                num_experts, _, width = layer.get_parameter(s.name.removeprefix(prefix)).shape
                mask = torch.ones(width, dtype=torch.bool)
                mask[removed_channels(group_set, s, group_set.num_units, kept, width)] = False
                router = next(iter(kept_experts), None)
                experts = kept_experts[router] if router is not None else torch.arange(num_experts)
                consumers.append(ExpertConsumer(path, mask.nonzero().flatten(), experts, side))
    return consumers


class _Stop(Exception):
    """Raised by a capture hook once its Linear has run: the rest of the layer's forward is not needed."""


@contextmanager
def _capture(module: nn.Module, store: dict, what: str) -> Iterator[None]:
    """Record `module`'s first input (`what="input"`), all its positional inputs (`"inputs"`) or its output
    (`"output"`) in `store[what]` and stop the forward."""

    def hook(mod, args, output):
        store[what] = {"input": args[0] if args else None, "inputs": args, "output": output}[what]
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _run_until(layer: nn.Module, module: nn.Module, what: str, hidden, args, kwargs):
    """`module`'s input(s) or output when `layer` runs on one batch (the forward stops there)."""
    store: dict = {}
    with _capture(module, store, what):
        try:
            layer(hidden, *args, **kwargs)
        except _Stop:
            pass
    if what not in store:
        raise RuntimeError(f"The layer's forward never ran {type(module).__name__}; it cannot be refit.")
    return store[what]


def _set_tensors(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Set the data of the layer's parameters named in `tensors`; returns what they held."""
    previous = {}
    for name, tensor in tensors.items():
        param = layer.get_parameter(name)
        previous[name] = param.data
        param.data = tensor
    return previous


@contextmanager
def _weights(layer: nn.Module, tensors: dict[str, torch.Tensor], routers=()) -> Iterator[None]:
    """Run `layer` with the parameters named in `tensors` set to them and, with `routers`, routing around the removed
    experts as the pruned layer does; then restore."""
    saved = _set_tensors(layer, tensors)
    try:
        with _routed_around(layer, routers):
            yield
    finally:
        _set_tensors(layer, saved)


@contextmanager
def _routed_around(layer: nn.Module, routers) -> Iterator[None]:
    """Each router of `routers` scores only its kept experts (its weight's kept rows: softmax, top-k and
    renormalisation over them equal those over all experts with the removed ones' logits at -inf, the pruned layer's
    routing), and its choices are mapped back to the original expert indices, which the unpruned experts module
    reads."""
    handles, saved = [], {}
    for router in routers:
        module = layer.get_submodule(router.path)
        kept = router.kept.to(module.weight.device)
        saved[f"{router.path}.weight"] = module.weight.data.index_select(0, kept)
        handles.append(module.register_forward_hook(functools.partial(_original_experts, kept=kept)))
    saved = _set_tensors(layer, saved)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _set_tensors(layer, saved)


def _original_experts(module, args, output, kept: torch.Tensor):
    """A router's output (`logits, weights, indices`) with its indices among the kept experts made original ones."""
    return (*output[:-1], kept[output[-1]])


def _add_zero_bias(module: nn.Linear) -> None:
    weight = module.weight
    module.bias = nn.Parameter(
        torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad
    )


def _pruned_start(layer: nn.Module, consumer) -> dict[str, torch.Tensor]:
    """The consumer's parameters as the pruned layer has them before its refit: removed input columns zeroed (the last
    dimension: a Linear's inputs, each expert's channels in the fused `down_proj`), bias unchanged."""
    name = f"{consumer.path}.down_proj" if isinstance(consumer, ExpertConsumer) else f"{consumer.path}.weight"
    weight = layer.get_parameter(name).data
    start = torch.zeros_like(weight)
    columns = consumer.kept_columns.to(weight.device)
    start[..., columns] = weight[..., columns]
    bias = None if isinstance(consumer, ExpertConsumer) else layer.get_submodule(consumer.path).bias
    return {name: start} | ({} if bias is None else {f"{consumer.path}.bias": bias.data.clone()})


def _refit_linear(layer, consumer: Consumer, full, pruned, original, current, routers, damping: float) -> dict:
    """A Linear's ridge problem: its pruned-stream inputs (kept columns) against its unpruned outputs."""
    module = layer.get_submodule(consumer.path)
    choosing = consumer.choice is not None  # then every column's statistics, to choose the kept ones from
    width = module.in_features if choosing else consumer.kept_columns.numel()
    stats = RefitStatistics.empty(width, module.out_features, consumer.intercept, module.weight.device)
    columns = torch.arange(width) if choosing else consumer.kept_columns
    columns = columns.to(module.weight.device)
    for batch_full, batch_pruned in zip(_batches(full), _batches(pruned)):
        inputs, targets = _inputs_and_targets(layer, consumer, batch_full, batch_pruned, original, current, routers)
        stats.add(inputs.index_select(-1, columns), targets)
    if choosing:
        consumer.choice.kept = choose_units(stats.gram, stats.cross, consumer.choice, damping, stats.intercept)
        columns = consumer.choice.columns[consumer.choice.kept].flatten().sort().values.to(columns.device)
        consumer.kept_columns, stats = columns, stats.subset(columns)
    weight, bias = ridge_refit(stats, damping)
    new_weight = torch.zeros_like(module.weight.data)
    new_weight[:, columns] = weight.to(new_weight.dtype)
    return {f"{consumer.path}.weight": new_weight} | ({} if bias is None else {f"{consumer.path}.bias": bias})


def _inputs_and_targets(layer, consumer: Consumer, batch_full, batch_pruned, original, current, routers):
    """One batch of a Linear's ridge problem: its pruned-stream inputs and what its outputs are fit to.

    The target is the unpruned Linear's output on the unpruned stream; with `consumer.residual` it also makes up the
    drift between the two streams where the output joins the residual stream, so that the pruned stream there equals
    the unpruned one as closely as the kept columns allow: on the "input" side (attention) the layers' input hidden
    states differ by `h_full - h_pruned`; on the "output" side (the MLP, the layer's last sum) the pruned layer's
    output less the Linear's own is the rest `r_pruned` of the stream (independent of the Linear's weights), and the
    target is the unpruned layer's output less `r_pruned`."""
    module = layer.get_submodule(consumer.path)
    if consumer.residual != "output":
        with _weights(layer, original):
            targets = _run_until(layer, module, "output", *batch_full)
        with _weights(layer, current, routers):
            inputs = _run_until(layer, module, "input", *batch_pruned)
        if consumer.residual == "input":
            targets = targets + (batch_full[0] - batch_pruned[0]).reshape(targets.shape)
        return inputs, targets
    return _stream_target(layer, module, batch_full, batch_pruned, (original, current, routers))


def _stream_target(layer, module, batch_full, batch_pruned, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """`module`'s input in the pruned layer and what its output must be for the pruned layer's output to equal the
    unpruned one's: the unpruned output less the rest `r_pruned` of the pruned layer's output (less `module`'s own,
    which the layer adds last). Shaped as `module`'s output (OPT's MLP and MoE experts run on flattened tokens)."""
    original, current, routers = weights
    with _weights(layer, original):
        unpruned_output = _forward(layer, *batch_full)
    store: dict = {}
    handle = module.register_forward_hook(lambda mod, args, output: store.update(input=args[0], output=output))
    try:
        with _weights(layer, current, routers):
            pruned_output = _forward(layer, *batch_pruned)
    finally:
        handle.remove()
    own = store["output"]
    return store["input"], unpruned_output.reshape(own.shape) - (pruned_output.reshape(own.shape) - own)


def _forward(layer: nn.Module, hidden, args, kwargs) -> torch.Tensor:
    return layer_output(layer(hidden, *args, **kwargs))


def _refit_experts(layer, consumer: ExpertConsumer, full, pruned, original, current, routers, damping: float) -> dict:
    """Each kept expert's `down_proj` [H, I] on its kept columns: one ridge problem per expert, over the tokens the
    pruned layer routes to it, each token's row (inputs and targets) scaled by its gate weight g.

    The layer adds g_e * down_e(a_e) for each expert e a token is routed to, so an expert's error reaches the layer's
    output scaled by g_e: min sum_t g_t^2 ||W' a'_t - y_t||^2 is the least-squares problem of the expert's share of
    the layer output (with top-1 routing exactly the layer's; with top-k, the block-diagonal part of the joint problem
    over all experts, whose sum bounds it: ||sum_e g_e r_e||^2 <= k sum_e g_e^2 ||r_e||^2). Unweighted rows would fit
    a token the router barely uses as closely as one it relies on. `a'_t` is the expert's intermediate activation in
    the pruned stream (kept channels), `y_t` the unpruned expert's output on the unpruned stream's input. An expert
    the calibration data never routes to keeps its (column-pruned) weights."""
    experts = layer.get_submodule(consumer.path)
    down = original[f"{consumer.path}.down_proj"]  # [E, H, I], unpruned
    columns = consumer.kept_columns.to(down.device)
    stats = {
        e: RefitStatistics.empty(len(columns), down.shape[1], False, down.device) for e in consumer.experts.tolist()
    }
    for batch_full, batch_pruned in zip(_batches(full), _batches(pruned)):
        with _weights(layer, original):
            hidden_full = _run_until(layer, experts, "inputs", *batch_full)[0]  # [T, H]
        with _weights(layer, current, routers):
            hidden, index, gates = _run_until(layer, experts, "inputs", *batch_pruned)[:3]  # [T, H], [T, k], [T, k]
        routed = {}  # expert -> (its tokens, their gates [n, 1], the unpruned expert's outputs [n, H])
        for expert in stats:
            token, slot = torch.where(index == expert)
            targets = nn.functional.linear(expert_hidden(experts, expert, hidden_full[token]), down[expert])
            routed[expert] = (token, gates[token, slot].unsqueeze(-1), targets)
        if consumer.residual == "output":
            share = _experts_drift(
                layer, experts, batch_full, batch_pruned, (original, current, routers), routed, gates
            )
            routed = {e: (token, gate, y + share[token]) for e, (token, gate, y) in routed.items()}
        for expert, (token, gate, targets) in routed.items():
            inputs = expert_hidden(experts, expert, hidden[token]).index_select(-1, columns)
            stats[expert].add(inputs * gate, targets * gate)
    new = current[f"{consumer.path}.down_proj"].clone()
    for expert, record in stats.items():
        if record.tokens:
            new[expert][:, columns] = ridge_refit(record, damping)[0].to(new.dtype)
    return {f"{consumer.path}.down_proj": new}


def _experts_drift(layer, experts, batch_full, batch_pruned, weights, routed, gates) -> torch.Tensor:
    """Under the residual target, what each expert routed to a token makes up beside its unpruned output, per unit of
    its gate [T, H]: `(T - S) / sum(g)`, with `T` the unpruned layer's output less the rest of the pruned layer's (its
    experts' sum taken out) and `S` the gate-weighted sum of the routed experts' unpruned outputs. Were every expert
    fit exactly, `sum_e g_e (y_e + share)` would be `T`: the block-diagonal problem shares the drift out by gates."""
    target = _stream_target(layer, experts, batch_full, batch_pruned, weights)[1]  # [T, H]
    weighted = torch.zeros_like(target)
    for token, gate, outputs in routed.values():
        weighted.index_add_(0, token, (gate * outputs).to(weighted.dtype))
    return (target - weighted) / gates.sum(-1, keepdim=True).to(target.dtype)


@torch.no_grad()
def reconstruct_layer(layer: nn.Module, consumers: list, full, pruned, damping: float, routers=()) -> list[str]:
    """Refit `consumers` of one unpruned-shaped decoder layer in place, then advance both streams to the next layer.

    `full` and `pruned` are the layer's inputs (`streaming.LayerInputs`: hidden states, args, kwargs per batch) in the
    unpruned and in the pruned-and-refit model; `routers` ([`RoutedAround`]) say which experts the pruned layer
    routes around. Consumers are refit in order, each on the pruned stream's inputs with the earlier ones already
    refit. The layer is left with every consumer's removed columns zeroed and its kept columns (and bias, with an
    intercept) refit, ready for surgery to slice; both streams' hidden states are replaced by the layer's outputs.
    Returns the consumer paths that gained a (zero-initialised, then fit) bias.
    """
    added = []
    for consumer in consumers:
        module = layer.get_submodule(consumer.path)
        if isinstance(consumer, Consumer) and consumer.intercept and module.bias is None:
            _add_zero_bias(module)
            added.append(consumer.path)
    current = {name: t for consumer in consumers for name, t in _pruned_start(layer, consumer).items()}
    original = {name: layer.get_parameter(name).data for name in current}
    for consumer in consumers:
        refit = _refit_experts if isinstance(consumer, ExpertConsumer) else _refit_linear
        fitted = refit(layer, consumer, full, pruned, original, current, routers, damping)
        current.update({name: t.to(current[name].dtype) for name, t in fitted.items()})
    with _weights(layer, original):
        _advance(layer, full)
    _set_tensors(layer, current)
    with _routed_around(layer, routers):
        _advance(layer, pruned)
    return added


def _batches(inputs):
    return zip(inputs.hidden, inputs.args, inputs.kwargs)


def _advance(layer: nn.Module, inputs) -> None:
    """Replace each batch's hidden states by `layer`'s output (the next layer's inputs)."""
    for hidden, args, kwargs in _batches(inputs):
        hidden.copy_(_forward(layer, hidden, args, kwargs))


@torch.no_grad()
def reconstruct_planned_layer(layer: nn.Module, spec, plan, group_sets, index: int, full, pruned) -> list[str]:
    """Refit decoder layer `index` as `plan` says (`reconstruct_layer`) and, where the plan chooses units by refit
    error, write the chosen units into `plan.kept` (before surgery slices the layer). Returns the paths that gained a
    bias."""
    consumers = layer_consumers(layer, spec, plan, group_sets, index)
    routers = layer_routers(spec, plan, group_sets, index)
    added = reconstruct_layer(layer, consumers, full, pruned, plan.reconstruction["damping"], routers)
    for consumer in consumers:
        choice = getattr(consumer, "choice", None)
        if choice is not None:
            plan.kept[choice.key] = choice.kept
    logger.info("Layer %d refit (%d consumers).", index, len(consumers))
    return added


@torch.no_grad()
def reconstruct_model(model: nn.Module, spec, plan, full, compute_dtype=None) -> None:
    """Refit every consumer `plan` prunes in `model` (unpruned, all layers in memory, with the plan's damping), layer
    by layer from the first layer's inputs `full` (consumed: they end as the last layer's outputs); `surgery.apply_plan` then slices it. The
    consumers that gained a bias get one in every layer, and the config field that builds it (`bias_fields`).

    With `compute_dtype` (`full` then in that dtype), each layer is refit as a `compute_dtype` copy and cast back, one
    layer at a time, as streaming refits its loaded layer: a bfloat16 model is refit in float32 on CPUs without
    native bfloat16 instead of through PyTorch's slow bfloat16 fallback."""
    group_sets = check_plan(model, plan, spec)
    pruned = pruned_stream(full)
    added: set[str] = set()
    for index, layer in enumerate(decoder_layers(model, spec)):
        full.for_layer(model.config, index)  # the layer's own mask where layers mix kinds (Gemma)
        pruned.for_layer(model.config, index)
        with _layer_in(layer, compute_dtype):
            added.update(reconstruct_planned_layer(layer, spec, plan, group_sets, index, full, pruned))
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
    return type(full)([h.clone() for h in full.hidden], list(full.args), list(full.kwargs), dict(full.by_type))
