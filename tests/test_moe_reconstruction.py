"""Reconstruction of the Mixture-of-Experts families (see `optimum_prune.reconstruction`).

Attention `o_proj` is refit as in every family. Each kept expert's `down_proj` is refit on its kept channels by ridge
least squares over the tokens the pruned layer routes to it, each token's row scaled by its gate weight, against the
unpruned expert's output on the unpruned model's input. Removed experts are routed around (router logits at -inf) and
refit nothing. The tests check each refit weight against `torch.linalg.lstsq` / the closed form on the final model's
own activations, that nothing removed means nothing changed, and that streaming gives the in-memory weights.
"""

import pytest
import torch
from test_experts import BUILDERS, NUM_EXPERTS, _config, experts_ratio, masked_router
from test_moe_streaming import _tensors
from test_reconstruction import _ridge
from testing_utils import VOCAB

from optimum_prune import AutoPruner
from optimum_prune.architectures import get_architecture
from optimum_prune.calibration import layer_output
from optimum_prune.reconstruction import (
    Consumer,
    ExpertConsumer,
    RoutedAround,
    pruned_stream,
    reconstruct_layer,
)
from optimum_prune.streaming import capture_layer_inputs, prune_streaming


FAMILIES = sorted(BUILDERS)
SAMPLES, SEQ_LEN = 16, 32  # 512 tokens: about 128 (token, slot) pairs per expert, more than its 32 channels
DATA = torch.randint(0, VOCAB, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(5))


def _recon_config(structures, ratio, **kwargs):
    kwargs.setdefault("reconstruction", True)
    config = _config(structures, ratio, kwargs.pop("importance", "magnitude"), **kwargs)
    config.num_calibration_samples, config.calibration_seq_len = SAMPLES, SEQ_LEN
    return config


def _experts_io(model, outputs: bool = False):
    """Per layer, what `mlp.experts` receives on DATA: hidden states [T, H], top-k indices and gate weights; with
    `outputs`, also `(experts' output [T, H], the layer's output [T, H])`."""
    found, produced = {}, {}

    def record(index):
        def hook(module, args, output):
            found[index] = args[:3]
            produced[index] = [output]

        return hook

    def record_layer(index):
        def hook(module, args, output):
            produced[index].append((output[0] if isinstance(output, tuple) else output).flatten(0, -2))

        return hook

    layers = model.model.layers
    handles = [layer.mlp.experts.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(record_layer(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=DATA)
    for handle in handles:
        handle.remove()
    return (found, produced) if outputs else found


def _expert_hidden(experts, expert, hidden):
    gate, up = torch.nn.functional.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


CASES = {
    "channels": (["mlp_channels"], 0.371, {}),
    "channels-own-outputs": (["mlp_channels"], 0.371, {"reconstruction_target": "output"}),
    "heads-channels-experts": (["attention_heads", "mlp_channels", "experts"], 0.4, {"global_ranking": True}),
}


# The unregularised solve is compared with `torch.linalg.lstsq` (slow on every expert): by default on one family, on all
# three with the slow tests; the damped closed form runs on every family.
GRID = [
    pytest.param(family, case, damping, marks=[pytest.mark.slow] if damping == 0.0 and family != "qwen3_moe" else [])
    for family in FAMILIES
    for case in sorted(CASES)
    for damping in (0.0, 0.1)
]


@pytest.mark.parametrize(("family", "case", "damping"), GRID)
def test_every_refit_expert_solves_its_gate_weighted_least_squares_problem(family, case, damping):
    """On the final model's own activations (every earlier layer and the attention refit, removed experts routed
    around): each kept expert's down_proj is the (ridge) solution of min sum_t ||g_t (W a_t - y_t)||^2 over the tokens
    routed to it, `a_t` its kept channels' activations, `y_t` the unpruned expert's output on the unpruned input, plus
    under the residual target its share of the stream's drift, `(T - S) / sum(g)` (built here from activations)."""
    structures, ratio, options = CASES[case]
    original = BUILDERS[family]()
    pruner = AutoPruner.from_model(
        BUILDERS[family](), _recon_config(structures, ratio, reconstruction_damping=damping, **options)
    )
    pruned = pruner.prune(calibration_data=DATA)
    plan = pruner.plan
    assert plan.reconstruction["damping"] == damping
    (targets, unpruned_out), (inputs, final_out) = _experts_io(original, True), _experts_io(pruned, True)
    assert (plan.reconstruction.get("target") == "residual") == ("reconstruction_target" not in options)
    checked = 0
    for i, layer in enumerate(pruned.model.layers):
        channels = plan.kept.get(f"mlp_channels.{i}")
        if channels is None:
            continue
        kept_experts = plan.kept.get(f"experts.{i}", list(range(NUM_EXPERTS)))
        hidden_full = targets[i][0]
        hidden, index, gates = inputs[i]
        experts, unpruned = layer.mlp.experts, original.model.layers[i].mlp.experts
        routed = {}
        for new, old in enumerate(kept_experts):
            token, slot = torch.where(index == new)
            y = torch.nn.functional.linear(_expert_hidden(unpruned, old, hidden_full[token]), unpruned.down_proj[old])
            routed[new] = (token, gates[token, slot].unsqueeze(-1).double(), y.double())
        if plan.reconstruction.get("target") == "residual":  # the drift of the stream, shared out by gates
            experts_out, layer_out = (t.double() for t in final_out[i])
            target = unpruned_out[i][1].double() - (layer_out - experts_out)
            weighted = sum(torch.zeros_like(target).index_add(0, t, g * y) for t, g, y in routed.values())
            share = (target - weighted) / gates.double().sum(-1, keepdim=True)
            routed = {e: (t, g, y + share[t]) for e, (t, g, y) in routed.items()}
        for new, (token, gate, y) in routed.items():
            x = _expert_hidden(experts, new, hidden[token]).double() * gate
            if damping == 0:
                expected = torch.linalg.lstsq(x, y * gate).solution.T
            else:
                expected, _ = _ridge(x, y * gate, damping, intercept=False)
            torch.testing.assert_close(experts.down_proj[new].double(), expected, atol=2e-4, rtol=1e-3)
            checked += 1
    assert checked >= 3 * 4


def test_no_units_removed_gives_the_original_weights():
    """Every column and expert kept: the refit reproduces the layer's weights, o_proj and every expert's down_proj."""
    model = BUILDERS["qwen2_moe"]()
    layer = model.model.layers[0]
    full = capture_layer_inputs(model, get_architecture("qwen2_moe"), DATA)
    pruned = pruned_stream(full)
    original = {n: p.detach().clone() for n, p in layer.named_parameters()}
    consumers = [
        Consumer("self_attn.o_proj", torch.arange(layer.self_attn.o_proj.in_features), False),
        ExpertConsumer("mlp.experts", torch.arange(32), torch.arange(NUM_EXPERTS)),
    ]
    reconstruct_layer(layer, consumers, full, pruned, damping=0.0)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param, original[name], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(full.hidden[0], pruned.hidden[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_experts_refit_nothing_and_are_routed_around(family):
    """Two experts removed, every channel kept: the kept experts' down_proj stay as they are (their problem is solved
    exactly by the original weights), and the pruned stream leaves the layer as the masked-router reference does."""
    model = BUILDERS[family]()
    layer = model.model.layers[0]
    full = capture_layer_inputs(model, get_architecture(family), DATA)
    pruned = pruned_stream(full)
    original = layer.mlp.experts.down_proj.detach().clone()
    kept = torch.tensor([0, 1, 2, 4, 5, 7])
    reference = BUILDERS[family]().model.layers[0]
    reference.mlp.gate.register_forward_hook(masked_router([3, 6]))
    with torch.no_grad():
        expected = [layer_output(reference(h, *a, **k)) for h, a, k in zip(full.hidden, full.args, full.kwargs)]
    consumers = [ExpertConsumer("mlp.experts", torch.arange(32), kept)]
    with torch.no_grad():
        reconstruct_layer(layer, consumers, full, pruned, 0.0, [RoutedAround("mlp.gate", kept)])
    torch.testing.assert_close(layer.mlp.experts.down_proj[kept], original[kept], atol=2e-4, rtol=1e-3)
    for hidden, reference_output in zip(pruned.hidden, expected):
        torch.testing.assert_close(hidden, reference_output, atol=1e-5, rtol=0)


def test_experts_alone_refit_nothing():
    """Removing whole experts has no consumer to refit: the result is pruning without reconstruction, whose plan still
    records it."""
    ratio = experts_ratio(BUILDERS["mixtral"](), 2)
    with_recon = AutoPruner.from_model(BUILDERS["mixtral"](), _recon_config(["experts"], ratio))
    with_recon.prune(calibration_data=DATA)
    without = AutoPruner.from_model(BUILDERS["mixtral"](), _recon_config(["experts"], ratio, reconstruction=False))
    without.prune(calibration_data=DATA)
    assert with_recon.plan.kept == without.plan.kept and with_recon.plan.reconstruction
    after, expected = with_recon.model.state_dict(), without.model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_gives_the_in_memory_weights(family, tmp_path):
    """Two passes (global ranking) with reconstruction: the streamed checkpoint is the in-memory one, and a given plan
    streams to it too."""
    BUILDERS[family]().save_pretrained(tmp_path / "moe", max_shard_size="20KB")
    structures, ratio, options = CASES["heads-channels-experts"]
    pruner = AutoPruner.from_model(BUILDERS[family](), _recon_config(structures, ratio, **options))
    pruner.prune(calibration_data=DATA)
    pruner.save_pretrained(tmp_path / "in_memory")
    expected = _tensors(tmp_path / "in_memory")
    report = prune_streaming(tmp_path / "moe", _recon_config(structures, ratio, **options), DATA, tmp_path / "two")
    assert report["plan"].kept == pruner.plan.kept
    prune_streaming(
        tmp_path / "moe", _recon_config(structures, ratio, **options), DATA, tmp_path / "given", plan=pruner.plan
    )
    for out in ("two", "given"):
        streamed = _tensors(tmp_path / out)
        assert sorted(streamed) == sorted(expected)
        for name, tensor in expected.items():
            torch.testing.assert_close(streamed[name], tensor, atol=1e-5, rtol=1e-5, msg=name)


def test_unset_reconstruction_refits_moe_attention_and_leaves_experts_alone():
    """Unset, reconstruction is on for an MoE model whose heads a data criterion scores (its o_proj is refit), and off
    when only whole experts go (nothing reads an expert's output but the residual stream) or no data is read."""
    heads = AutoPruner.from_model(BUILDERS["mixtral"](), _config(["attention_heads"], 0.1, "wanda_sp"))
    heads.prune(calibration_data=DATA)
    assert heads.config.reconstruction is True and heads.plan.reconstruction["damping"] == 0.01
    experts = _config(["experts"], experts_ratio(BUILDERS["mixtral"](), 2), "frequency")
    assert experts.reconstruction is False
    assert _config(["attention_heads", "mlp_channels"], 0.2).reconstruction is False  # magnitude reads no data
