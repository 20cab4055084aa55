"""Criteria on cases with a known answer."""

import torch
from testing_utils import VOCAB, tiny_llama

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.architectures import get_architecture
from optimum_prune.calibration import collect_statistics
from optimum_prune.groups import build_group_sets
from optimum_prune.importance import get_importance


def _scores(model, name, batches=None, **kwargs):
    importance = get_importance(name, **kwargs)
    groups = build_group_sets(model, get_architecture("llama"), ["attention_heads", "mlp_channels"])
    stats = collect_statistics(model, batches, importance.needs)
    return {key: importance.score(gs, stats) for key, gs in groups.items()}


def test_magnitude_zero_unit_scores_lowest():
    model = tiny_llama()
    layer = model.model.layers[1]
    with torch.no_grad():
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[17] = 0
        layer.mlp.down_proj.weight[:, 17] = 0
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight[8:16] = 0
        layer.self_attn.q_proj.weight[16:32] = 0
        layer.self_attn.o_proj.weight[:, 16:32] = 0
    for p in (1, 2):
        scores = _scores(model, "magnitude", p=p)
        assert scores["mlp_channels.1"].argmin() == 17 and scores["mlp_channels.1"][17] == 0
        assert scores["attention_heads.1"].argmin() == 1


def test_magnitude_l1_l2_values():
    model = tiny_llama()
    scores = _scores(model, "magnitude", p=1)["mlp_channels.0"]
    mlp = model.model.layers[0].mlp
    expected = (
        mlp.gate_proj.weight[5].abs().sum()
        + mlp.up_proj.weight[5].abs().sum()
        + mlp.down_proj.weight[:, 5].abs().sum()
    )
    torch.testing.assert_close(scores[5], expected.detach())
    scores2 = _scores(model, "magnitude", p=2)["mlp_channels.0"]
    expected2 = torch.cat([mlp.gate_proj.weight[5], mlp.up_proj.weight[5], mlp.down_proj.weight[:, 5]]).norm()
    torch.testing.assert_close(scores2[5], expected2.detach())


def _calibration(n=4, length=16):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))


def test_taylor_unit_without_effect_on_loss_scores_lowest():
    """A channel whose down_proj column is zero cannot change the loss: its first-order score is exactly 0 even
    though its gate/up weights are large."""
    model = tiny_llama()
    mlp = model.model.layers[2].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 33] = 0
        mlp.gate_proj.weight[33] *= 10
        mlp.up_proj.weight[33] *= 10
    scores = _scores(model, "taylor", batches=_calibration())["mlp_channels.2"]
    assert scores.argmin() == 33 and scores[33] == 0
    assert _scores(model, "magnitude")["mlp_channels.2"].argmin() != 33  # magnitude is fooled


def test_taylor_matches_manual_gradient():
    model = tiny_llama()
    batches = _calibration()
    scores = _scores(model, "taylor", batches=batches)["mlp_channels.0"]
    model.zero_grad()
    model(input_ids=batches, labels=batches).loss.backward()
    mlp = model.model.layers[0].mlp
    expected = (
        sum((w * w.grad)[idx].abs().sum() for w, idx in ((mlp.gate_proj.weight, 7), (mlp.up_proj.weight, 7)))
        + (mlp.down_proj.weight * mlp.down_proj.weight.grad)[:, 7].abs().sum()
    )
    torch.testing.assert_close(scores[7], expected.detach(), rtol=1e-4, atol=1e-7)
    vector = _scores(model, "taylor", batches=batches, granularity="vector")["mlp_channels.0"]
    assert vector[7] <= scores[7] + 1e-7  # |Σ s| <= Σ |s| per member


def test_taylor_variants_and_reductions_run():
    model = tiny_llama()
    batches = _calibration()
    for kwargs in (
        {"order": "second"},
        {"order": "mix"},
        {"group_reduction": "max"},
        {"group_reduction": "prod"},
        {"group_reduction": "mean"},
        {"group_reduction": "first"},
        {"group_reduction": "last"},
    ):
        scores = _scores(model, "taylor", batches=batches, **kwargs)
        assert all(torch.isfinite(s).all() for s in scores.values())
    second = _scores(model, "taylor", batches=batches, order="second")["mlp_channels.0"]
    assert (second >= 0).all()


def test_taylor_restores_requires_grad_and_leaves_no_grads():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    _scores(model, "taylor", batches=_calibration())
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_random_is_seeded():
    first = _scores(tiny_llama(), "random", seed=3)
    again = _scores(tiny_llama(), "random", seed=3)
    other = _scores(tiny_llama(), "random", seed=4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_random_plans_are_seeded():
    plans = [
        AutoPruner.from_model(tiny_llama(), PrunerConfig(pruning_ratio=0.3, importance="random", seed=s)).prune()
        and None
        for s in (0,)
    ]
    assert plans == [None]
    a = AutoPruner.from_model(tiny_llama(), PrunerConfig(pruning_ratio=0.3, importance="random", seed=1))
    b = AutoPruner.from_model(tiny_llama(), PrunerConfig(pruning_ratio=0.3, importance="random", seed=1))
    a.prune(), b.prune()
    assert a.plan == b.plan
