"""The activation and forward-only criteria (wanda_sp, flap, bip, mini_llm, block_influence) on known answers."""

import pytest
import torch
from testing_utils import VOCAB, tiny_llama

from optimum_prune import AutoPruner, PrunerConfig, count_parameters
from optimum_prune.architectures import get_architecture
from optimum_prune.calibration import (
    block_loss_noise,
    collect_statistics,
    layer_output,
    spsa_perturbation,
    spsa_projected_gradients,
)
from optimum_prune.groups import build_group_sets
from optimum_prune.importance import ACTIVATIONS, get_importance, standardize_scores


STRUCTURES = ["attention_heads", "mlp_channels"]


def _calibration(n=6, length=16, seed=3):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _scores(model, name, batches, **kwargs):
    importance = get_importance(name, **kwargs)
    groups = build_group_sets(model, get_architecture("llama"), STRUCTURES)
    names = {s.name for gs in groups.values() for s in gs.slices}
    stats = collect_statistics(model, batches, importance.needs, param_names=names)
    return {key: importance.score(gs, stats) for key, gs in groups.items()}


def _linear_inputs(model, module, batches):
    """Every token's input to `module` over the calibration batches: [tokens, in_features]."""
    seen = []
    handle = module.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for start in range(0, len(batches), 4):
            model(input_ids=batches[start : start + 4])
    handle.remove()
    return torch.cat(seen).double()


def _silence_units(model, layer=1):
    """MLP channel 17 gets a zero input to down_proj (its up row is zero); KV group 1 gets zero values (its v rows),
    so o_proj's input channels 16:32 (query heads 2 and 3) are zero. Both units' activations are exactly zero."""
    block = model.model.layers[layer]
    with torch.no_grad():
        block.mlp.up_proj.weight[17] = 0
        block.self_attn.v_proj.weight[8:16] = 0
    return model


# ---------------------------------------------------------------------------------------------------- statistics


def test_activation_statistics_match_manual_computation():
    model = tiny_llama()
    batches = _calibration()
    stats = collect_statistics(model, batches, {ACTIVATIONS})
    assert all(p.grad is None for p in model.parameters())
    for module, name in (
        (model.model.layers[1].mlp.down_proj, "model.layers.1.mlp.down_proj.weight"),
        (model.model.layers[2].self_attn.o_proj, "model.layers.2.self_attn.o_proj.weight"),
        (model.model.layers[0].self_attn.q_proj, "model.layers.0.self_attn.q_proj.weight"),
    ):
        x = _linear_inputs(model, module, batches)  # [tokens, C]
        record = stats.activation(name)
        assert record.count == batches.numel() == x.shape[0]
        torch.testing.assert_close(record.mean_abs, x.abs().mean(0).float())
        torch.testing.assert_close(record.mean, x.mean(0).float())
        torch.testing.assert_close(record.mean_sq, (x * x).mean(0).float())
        torch.testing.assert_close(record.norm, x.norm(dim=0).float())
        torch.testing.assert_close(record.variance, x.var(0, unbiased=False).float(), rtol=1e-4, atol=1e-7)
        assert record.sum.shape == (module.in_features,)  # per-channel vectors only
    # q, k and v read the same tensor: one shared reduction, the same statistics.
    for projection in ("k_proj", "v_proj"):
        shared = stats.activation(f"model.layers.0.self_attn.{projection}.weight")
        assert torch.equal(shared.sum_sq, stats.activation("model.layers.0.self_attn.q_proj.weight").sum_sq)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_block_influence_statistic_matches_manual_cosine():
    model = tiny_llama()
    batches = _calibration()
    stats = collect_statistics(model, batches, {ACTIVATIONS})
    captured = {}
    handle = model.model.layers[1].register_forward_hook(
        lambda mod, args, kwargs, out: captured.update(x=args[0] if args else kwargs["hidden_states"], y=out),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    cos = torch.nn.functional.cosine_similarity(captured["x"], captured["y"], dim=-1)
    assert stats.layer_influence(1) == pytest.approx((1 - cos).mean().item(), rel=1e-5)


def test_missing_statistics_say_what_to_declare():
    model = tiny_llama()
    stats = collect_statistics(model, None, {"weights"})
    with pytest.raises(KeyError, match="activations"):
        stats.activation("model.layers.0.mlp.down_proj.weight")
    with pytest.raises(ValueError, match="needs calibration data"):
        collect_statistics(model, None, {ACTIVATIONS})


# ------------------------------------------------------------------------------------------------------ wanda_sp


def test_wanda_sp_values_and_zero_activation_unit_scores_lowest():
    model = _silence_units(tiny_llama())
    batches = _calibration()
    scores = _scores(model, "wanda_sp", batches)
    mlp = scores["mlp_channels.1"]
    heads = scores["attention_heads.1"]
    assert mlp.argmin() == 17 and mlp[17] == 0
    assert heads.argmin() == 1 and heads[1] == 0
    # FLAP's prune_wanda_sp: (|W| * ||X||).mean(axis=0), heads summed over their channels.
    down = model.model.layers[0].mlp.down_proj
    x = _linear_inputs(model, down, batches)
    expected = down.weight.abs().mean(0).double() * x.norm(dim=0)
    torch.testing.assert_close(scores["mlp_channels.0"], expected.float(), rtol=1e-5, atol=1e-6)
    o_proj = model.model.layers[2].self_attn.o_proj
    x = _linear_inputs(model, o_proj, batches)
    per_channel = o_proj.weight.abs().mean(0).double() * x.norm(dim=0)
    torch.testing.assert_close(
        scores["attention_heads.2"], per_channel.view(4, 16).sum(1).float(), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------------------- flap


def test_flap_values_standardisation_and_zero_fluctuation_scores_lowest():
    model = _silence_units(tiny_llama())
    batches = _calibration()
    scores = _scores(model, "flap", batches)
    assert scores["mlp_channels.1"].argmin() == 17
    assert scores["attention_heads.1"].argmin() == 1
    down = model.model.layers[0].mlp.down_proj
    x = _linear_inputs(model, down, batches)
    metric = (x.var(0, unbiased=False) * down.weight.double().pow(2).sum(0)).float()
    expected = (metric - metric.mean()) / metric.std()
    torch.testing.assert_close(scores["mlp_channels.0"], expected, rtol=1e-4, atol=1e-5)
    o_proj = model.model.layers[2].self_attn.o_proj
    x = _linear_inputs(model, o_proj, batches)
    metric = (x.var(0, unbiased=False) * o_proj.weight.double().pow(2).sum(0)).pow(2).float()  # FLAP squares o_proj
    expected = standardize_scores(metric).view(4, 16).mean(1)
    torch.testing.assert_close(scores["attention_heads.2"], expected, rtol=1e-4, atol=1e-5)
    # Standardisation is monotone within a module: the same ranking without it, but not the same values.
    raw = _scores(model, "flap", batches, standardize=False)
    assert torch.equal(raw["mlp_channels.0"].argsort(), scores["mlp_channels.0"].argsort())
    assert scores["mlp_channels.0"].mean().abs() < 1e-5 and raw["mlp_channels.0"].min() >= 0


def test_standardize_scores():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    y = standardize_scores(x)
    assert y.mean().abs() < 1e-6 and (y.std() - 1).abs() < 1e-6
    assert torch.equal(standardize_scores(torch.ones(3)), torch.zeros(3))


# ----------------------------------------------------------------------------------------------------------- bip


def _block_output_change(model, batches, layer, zero):
    """Mean over tokens of the L1 change of decoder layer `layer`'s output when `zero(block)` is applied to it."""
    block = model.model.layers[layer]
    outputs = []
    handle = block.register_forward_hook(
        lambda mod, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)
    )
    state = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        model(input_ids=batches)
        zero(block)
        model(input_ids=batches)
        block.load_state_dict(state)
    handle.remove()
    return (outputs[1] - outputs[0]).abs().sum(-1).mean().item()


def test_bip_mlp_score_is_the_exact_block_output_change():
    model = tiny_llama(intermediate_size=32)
    batches = _calibration()
    scores = _scores(model, "bip", batches)["mlp_channels.1"]

    def zero_channel(j):
        return lambda block: block.mlp.down_proj.weight[:, j].zero_()

    true_change = torch.tensor([_block_output_change(model, batches, 1, zero_channel(j)) for j in range(32)])
    torch.testing.assert_close(scores, true_change, rtol=1e-4, atol=1e-6)
    assert scores.argmin() == true_change.argmin()


def _spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def test_bip_head_scores_rank_like_the_true_block_output_change():
    # 8 KV groups of one head each; pooled over layers, since BIP scores are in block-output units.
    model = tiny_llama(num_key_value_heads=8, seed=1)
    batches = _calibration(n=4)
    true = []
    for layer in range(3):
        for h in range(8):

            def zero_head(block, h=h):
                block.self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8].zero_()

            true.append(_block_output_change(model, batches, layer, zero_head))
    true = torch.tensor(true)
    pooled = {}
    for name, kwargs in (("up", {}), ("sum", {"gate": "sum"}), ("direct", {"mlp_gain": False})):
        scores = _scores(model, "bip", batches, **kwargs)
        pooled[name] = torch.cat([scores[f"attention_heads.{i}"] for i in range(3)])
    assert _spearman(pooled["up"], true) > 0.8
    assert _spearman(pooled["sum"], true) > 0.8
    # The MLP path only adds to the direct one, and the gate variant adds more.
    assert (pooled["up"] > pooled["direct"]).all() and (pooled["sum"] > pooled["up"]).all()


def test_bip_gate_variants_differ_and_zero_activation_scores_lowest():
    model = _silence_units(tiny_llama())
    batches = _calibration()
    up = _scores(model, "bip", batches)
    both = _scores(model, "bip", batches, gate="sum")
    assert (both["attention_heads.0"] > up["attention_heads.0"]).all()
    assert torch.equal(both["mlp_channels.0"], up["mlp_channels.0"])  # the gate only enters the attention bound
    assert up["mlp_channels.1"].argmin() == 17 and up["attention_heads.1"][1] == 0
    with pytest.raises(ValueError, match="gate"):
        get_importance("bip", gate="silu")


# ------------------------------------------------------------------------------------------------------ mini_llm


def _mlp_param_names(layer=0):
    return [f"model.layers.{layer}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]


def _small_model():
    return tiny_llama(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2, head_dim=8)


def test_spsa_estimate_correlates_with_the_true_gradient_and_restores_weights_bit_exactly():
    model = _small_model()
    batches = _calibration(n=4)
    names = _mlp_param_names()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = collect_statistics(model, batches, {"forward_loss"}, param_names=names)
    estimate = torch.cat([stats.spsa_gradient(n, num_perturbations=64, seed=0).flatten() for n in names])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    params = dict(model.named_parameters())
    model.zero_grad()
    loss = sum(model(input_ids=b[None], labels=b[None]).loss for b in batches) / len(batches)
    loss.backward()
    true = torch.cat([params[n].grad.flatten() for n in names])
    model.zero_grad(set_to_none=True)
    # E[cos] ~ sqrt(n / d) = sqrt(64 / 1152) ~ 0.24 for the MeZO estimator; seeded, so this is deterministic.
    cosine = torch.nn.functional.cosine_similarity(estimate, true, dim=0).item()
    assert cosine > 0.1
    # Calling the estimator directly leaves the weights bit-identical too.
    assert len(spsa_projected_gradients(model, batches, names, num_perturbations=2)) == 2
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_spsa_projected_gradient_is_the_directional_derivative():
    model = _small_model().double()
    batches = _calibration(n=2)
    names = _mlp_param_names()
    stats = collect_statistics(model, batches, {"forward_loss"}, param_names=names)
    estimate = {n: stats.spsa_gradient(n, num_perturbations=1, eps=1e-4, seed=5) for n in names}
    params = dict(model.named_parameters())
    loss = sum(model(input_ids=b[None], labels=b[None]).loss for b in batches) / len(batches)
    loss.backward()
    # With one perturbation Ĝ = d · z, and d = <g, z> up to O(ε²): Ĝ / z is the directional derivative everywhere.
    zs = {n: spsa_perturbation(params[n], n, 0, "gaussian", 5) for n in names}
    directional = sum((params[n].grad.float() * zs[n]).sum() for n in names).item()
    ratio = (estimate[names[0]] / zs[names[0]]).flatten()
    torch.testing.assert_close(ratio, torch.full_like(ratio, directional), rtol=1e-3, atol=1e-7)
    model.zero_grad(set_to_none=True)


def test_spsa_estimators_and_distributions():
    model = _small_model()
    batches = _calibration(n=2)
    names = _mlp_param_names()
    stats = collect_statistics(model, batches, {"forward_loss"}, param_names=names)
    kwargs = dict(num_perturbations=2, distribution="rademacher", seed=1)
    multiply = stats.spsa_gradient(names[2], estimator="multiply", **kwargs)
    divide = stats.spsa_gradient(names[2], estimator="divide", **kwargs)
    torch.testing.assert_close(multiply, divide)  # 1/z = z for z = ±1
    gaussian = stats.spsa_gradient(names[2], num_perturbations=2, seed=1)
    assert not torch.allclose(gaussian, multiply)
    with pytest.raises(ValueError, match="distribution"):
        get_importance("mini_llm", distribution="uniform")
    with pytest.raises(ValueError, match="estimator"):
        get_importance("mini_llm", estimator="mean")


def test_mini_llm_zero_unit_scores_lowest_and_matches_its_formula():
    model = tiny_llama()
    block = model.model.layers[1]
    with torch.no_grad():
        block.mlp.gate_proj.weight[5] = 0
        block.mlp.up_proj.weight[5] = 0
        block.mlp.down_proj.weight[:, 5] = 0
    batches = _calibration(n=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    importance = get_importance("mini_llm", num_perturbations=4)
    groups = build_group_sets(model, get_architecture("llama"), STRUCTURES)
    names = {s.name for gs in groups.values() for s in gs.slices}
    stats = collect_statistics(model, batches, importance.needs, param_names=names)
    scores = {key: importance.score(gs, stats) for key, gs in groups.items()}
    assert scores["mlp_channels.1"].argmin() == 5 and scores["mlp_channels.1"][5] == 0
    assert all((s > 0).sum() >= len(s) - 1 for s in scores.values())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    # Eq. 9 by hand for channel 3 of layer 0: Σ |W ⊙ Ĝ ⊙ X| over gate/up rows and the down column.
    mlp = model.model.layers[0].mlp
    total = 0.0
    for proj_name, index in (("gate_proj", (3, slice(None))), ("up_proj", (3, slice(None))), ("down_proj", (..., 3))):
        proj = getattr(mlp, proj_name)
        g = importance.estimated_gradient(stats, f"model.layers.0.mlp.{proj_name}.weight")
        x = _linear_inputs(model, proj, batches).abs().mean(0).float()
        total += (proj.weight.detach() * g * x[None, :]).abs()[index].sum().item()
    assert scores["mlp_channels.0"][3].item() == pytest.approx(total, rel=1e-4)


def _block_loss_gradients(model, batches, layer_index, names, seed):
    """d L_l / dW by backpropagation, L_l = Σ_t ‖f(x_t; W) - f(x_t; W₀) - ξ_t‖² / 2T, at W₀ (where it is -Jᵀξ / T):
    the layer's inputs are captured by a hook, the layer is re-run with autograd on them."""
    layer = model.model.layers[layer_index]
    calls = []
    handle = layer.register_forward_hook(lambda m, a, kw, o: calls.append((a, kw)), with_kwargs=True)
    with torch.no_grad():
        for start in range(0, len(batches), 4):
            model(input_ids=batches[start : start + 4], use_cache=False)  # no cache for the re-runs to append to
    handle.remove()
    params = dict(model.named_parameters())
    tokens = sum(batch.numel() for batch in batches.split(4))
    model.zero_grad(set_to_none=True)
    for b, (args, kwargs) in enumerate(calls):
        out = layer_output(layer(*args, **kwargs))
        xi = block_loss_noise(out, seed, layer_index, b)
        (-(out.double() * xi).sum() / tokens).backward()
    grads = {n: params[n].grad.detach().clone() for n in names}
    model.zero_grad(set_to_none=True)
    return grads


def test_block_spsa_projected_gradient_is_the_block_loss_directional_derivative():
    model = _small_model().double()
    batches = _calibration(n=6)  # two batches (4 + 2): ξ is drawn per batch
    names = _mlp_param_names(0) + [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = collect_statistics(model, batches, {"block_loss"}, param_names=names)
    estimate = {n: stats.spsa_gradient(n, num_perturbations=1, eps=1e-4, seed=5, loss="block") for n in names}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    params = dict(model.named_parameters())
    for layer_index in (0, 1):
        own = [n for n in names if n.startswith(f"model.layers.{layer_index}.")]
        grads = _block_loss_gradients(model, batches, layer_index, own, seed=5)
        # With one perturbation Ĝ = d · z and d = <∇L_l, z> over the layer's own perturbed weights, up to O(ε²).
        directional = sum((grads[n] * spsa_perturbation(params[n], n, 0, "gaussian", 5).double()).sum() for n in own)
        for n in own:
            ratio = (estimate[n] / spsa_perturbation(params[n], n, 0, "gaussian", 5)).flatten()
            torch.testing.assert_close(ratio, torch.full_like(ratio, directional.item()), rtol=1e-3, atol=1e-7)
        assert abs(directional.item()) > 1e-3  # a real signal: the loss is not flat at W₀ (ξ ≠ 0)


def test_block_spsa_estimate_correlates_with_the_block_loss_gradient():
    model = _small_model()
    batches = _calibration(n=4)
    names = _mlp_param_names(1)
    stats = collect_statistics(model, batches, {"block_loss"}, param_names=names)
    estimate = torch.cat([stats.spsa_gradient(n, num_perturbations=64, loss="block").flatten() for n in names])
    grads = _block_loss_gradients(model, batches, 1, names, seed=0)
    true = torch.cat([grads[n].flatten() for n in names])
    # E[cos] ~ sqrt(n / d) = sqrt(64 / 1152) ~ 0.24, as for the LM loss; seeded, so deterministic.
    assert torch.nn.functional.cosine_similarity(estimate, true, dim=0).item() > 0.1


def test_mini_llm_block_loss_variant():
    importance = get_importance("mini_llm", loss="block", num_perturbations=4)
    assert "block_loss" in importance.needs and "forward_loss" not in importance.needs
    assert "forward_loss" in get_importance("mini_llm").needs
    with pytest.raises(ValueError, match="`loss` must be one of"):
        get_importance("mini_llm", loss="global")
    model = tiny_llama()
    with torch.no_grad():
        block = model.model.layers[1]
        block.mlp.gate_proj.weight[5] = 0
        block.mlp.up_proj.weight[5] = 0
        block.mlp.down_proj.weight[:, 5] = 0
    scores = _scores(model, "mini_llm", _calibration(n=4), loss="block", num_perturbations=4)
    assert scores["mlp_channels.1"].argmin() == 5 and scores["mlp_channels.1"][5] == 0
    assert all((s > 0).sum() >= len(s) - 1 for s in scores.values())


# ----------------------------------------------------------------------------------------------- block_influence


def test_block_influence_removes_the_identity_layer_first():
    model = tiny_llama(num_hidden_layers=4)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    ratio = layer_params / count_parameters(model)
    config = PrunerConfig(
        pruning_ratio=round(ratio, 3),
        importance="block_influence",
        structures=["layers"],
        num_calibration_samples=4,
        calibration_seq_len=16,
    )
    pruner = AutoPruner.from_model(model, config)
    pruner.prune(calibration_data=_calibration(n=8, length=32))
    assert pruner.plan.removed_layers == [2]
    with pytest.raises(ValueError, match="layers"):
        _scores(tiny_llama(), "block_influence", _calibration())


# -------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("importance", ["wanda_sp", "flap", "bip", "mini_llm", "mini_llm-block"])
def test_criteria_prune_end_to_end(importance):
    importance, _, loss = importance.partition("-")
    model = tiny_llama()
    before = count_parameters(model)
    config = PrunerConfig(
        pruning_ratio=0.2,
        importance=importance,
        importance_kwargs={"num_perturbations": 2, "loss": loss or "lm"} if importance == "mini_llm" else {},
        num_calibration_samples=4,
        calibration_seq_len=16,
    )
    pruned = AutoPruner.from_model(model, config).prune(calibration_data=_calibration(n=8, length=32))
    assert abs(1 - count_parameters(pruned) / before - 0.2) <= 0.01
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=_calibration(n=2)).logits).all()


def test_spsa_puts_every_weight_back_when_a_forward_fails():
    model = _small_model()
    names = _mlp_param_names()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def fail(module, args, output):
        raise RuntimeError("boom")

    # Registered before the SPSA hooks, this fails after down_proj ran with its perturbed weight and before the SPSA
    # hook that swaps the original back: the cleanup must restore it.
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        spsa_projected_gradients(model, _calibration(n=2), names, num_perturbations=1)
    handle.remove()
    for n, p in model.named_parameters():
        assert isinstance(p, torch.nn.Parameter) and torch.equal(p, before[n]), n
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
