"""`benchmarks/train_families.py`'s cheap routes and `benchmarks/quality.py`'s expert ratios, on tiny random models:
the Phi-3 conversion is the same function, MoEfication with every expert routed is the dense MLP, and an expert
fraction becomes the parameter ratio that removes exactly that many experts per layer."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from test_experts import tiny_mixtral
from testing_utils import VOCAB, input_ids, logits, tiny_llama
from transformers import MixtralConfig, MixtralForCausalLM

from optimum_prune import AutoPruner, PrunerConfig


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_phi3_route_is_the_same_function():
    train = _load("train_families")
    llama = tiny_llama(hidden_size=64, num_hidden_layers=2)  # hidden = heads x head_dim, as Phi-3 derives it
    phi3, _ = train.to_phi3(llama)
    ids = input_ids()
    assert torch.allclose(logits(phi3.eval(), ids), logits(llama, ids), atol=1e-5)


def test_moefy_with_every_expert_routed_is_the_dense_mlp():
    """Two experts of 40 channels, top-2, zero router: each expert weighs 1/2 and the down projections are scaled by
    sqrt(2 x 2) = 2, so the MoE layer sums the two halves of the dense MLP."""
    train = _load("train_families")
    llama = tiny_llama(hidden_size=64, num_hidden_layers=2)  # hidden = heads x head_dim, as Phi-3 derives it
    rope = {"rope_type": "default", "rope_theta": llama.config.rope_parameters["rope_theta"]}
    config = MixtralConfig(
        **train._common(llama.config), intermediate_size=40, num_local_experts=2, rope_parameters=rope
    )
    moe = MixtralForCausalLM(config).eval()
    train.moefy(llama, moe, [torch.arange(80)] * 2, num_experts=2, top_k=2, seed=0)
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.zero_()
    ids = input_ids()
    assert torch.allclose(logits(moe, ids), logits(llama, ids), atol=1e-5)


def test_expert_fraction_removes_that_many_experts(tmp_path):
    quality = _load("quality")
    tiny_mixtral().save_pretrained(tmp_path)
    ratio, removed = quality.experts_pruning_ratio(tmp_path, 0.25)
    assert removed == 2
    config = PrunerConfig(
        importance="frequency",
        pruning_ratio=ratio,
        structures=["experts"],
        num_calibration_samples=4,
        calibration_seq_len=16,
    )
    pruner = AutoPruner.from_model(tiny_mixtral(), config)
    pruner.prune(calibration_data=torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1)))
    assert {len(kept) for kept in pruner.plan.kept.values()} == {6}


def test_qwen2_moe_route_with_every_expert_routed_is_the_dense_model():
    """Shared expert of the 16 strongest channels (zero gate: sigmoid 1/2, down x 2), two routed experts of 32 with
    zero routers and no top-k normalisation (each weighs 1/2, down x 2), zero q/k/v biases: tiny-llama's function."""
    train = _load("train_families")
    llama = tiny_llama(hidden_size=64, num_hidden_layers=2)
    moe, _ = train.to_qwen2_moe(llama, experts=2, top_k=2, shared=16)
    moe.eval()
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.zero_()
    assert moe.model.layers[0].self_attn.q_proj.bias is not None
    assert moe.model.layers[0].mlp.shared_expert.up_proj.weight.shape == (16, 64)
    ids = input_ids()
    assert torch.allclose(logits(moe, ids), logits(llama, ids), atol=1e-5)


def test_routes_come_after_their_sources(tmp_path):
    """`--models` defaults to every route in table order, so a route's source must be trained before it; a missing
    source stops with one line saying which model to train first."""
    train = _load("train_families")
    names = list(train.ROUTES)
    for name, route in train.ROUTES.items():
        assert route.source == "tiny-llama" or names.index(route.source) < names.index(name)
    with pytest.raises(SystemExit, match="train tiny-qwen3 first"):
        train.build("tiny-qwen3-moe", tmp_path, [])
