"""Mixture-of-Experts families (Mixtral, Qwen3-MoE): the `experts` structure and the others on their fused experts.

References need no pruning code: removed experts are the original model with their router logits set to -inf (a
forward hook on `mlp.gate` routing again from the masked logits, as the installed router does: softmax, top-k, and
renormalisation where the family does it); removed heads and expert channels are zeroed on their consumer side;
removed hidden channels are zeroed in every residual write; removed layers are skipped.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from family_table import LLAMA_LAYOUT, cpu_and_disk_map
from testing_utils import (
    VOCAB,
    _randomize,
    fresh_process_logits,
    input_ids,
    logits,
    skip_layers,
    tiny_llama,
    word_text,
    word_tokenizer,
)
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.calibration import collect_statistics
from optimum_prune.groups import build_group_sets
from optimum_prune.importance import ROUTING, get_importance


ATOL = 1e-5
NUM_EXPERTS = 8
CALIBRATION = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))


def _tiny_moe(config_class, model_class, seed: int, overrides: dict):
    """3 layers of 8 query heads in 4 KV groups (head_dim 8, hidden 48) and 8 experts of width 32, top-2; float32."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    kwargs.update(overrides)
    if config_class is Qwen2MoeConfig:
        del kwargs["head_dim"]  # derived: hidden_size // num_attention_heads
    return _randomize(model_class(config_class(**kwargs)).eval())


def tiny_qwen3_moe(seed: int = 0, **overrides):
    """Qwen3-MoE without top-k renormalisation (`norm_topk_prob=False`), so the reference's softmax weights count."""
    overrides = {"num_experts": NUM_EXPERTS, "moe_intermediate_size": 32, "intermediate_size": 64, **overrides}
    return _tiny_moe(Qwen3MoeConfig, Qwen3MoeForCausalLM, seed, overrides)


def tiny_mixtral(seed: int = 0, **overrides):
    overrides = {"num_local_experts": NUM_EXPERTS, "intermediate_size": 32, **overrides}
    return _tiny_moe(MixtralConfig, MixtralForCausalLM, seed, overrides)


def tiny_qwen2_moe(seed: int = 0, **overrides):
    """Qwen2-MoE: q/k/v biases, implicit `head_dim` (48 // 6 = 8: 6 query heads in 3 KV groups), a shared expert of
    width 24 behind its sigmoid gate."""
    overrides = {
        "num_experts": NUM_EXPERTS,
        "moe_intermediate_size": 32,
        "intermediate_size": 64,
        "shared_expert_intermediate_size": 24,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        **overrides,
    }
    return _tiny_moe(Qwen2MoeConfig, Qwen2MoeForCausalLM, seed, overrides)


BUILDERS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe}


def masked_router(removed: list[int]):
    """A forward hook on a top-k router: route again with the `removed` experts' logits at -inf."""

    def hook(module, args, output):
        router_logits = output[0].clone()
        router_logits[:, removed] = float("-inf")
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, experts = torch.topk(probs, module.top_k, dim=-1)
        if getattr(module, "norm_topk_prob", True):  # Mixtral always renormalises
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return output[0], weights.to(output[1].dtype), experts

    return hook


def zeroed_reference(model, plan):
    """The untouched `model` computing what `model` pruned by `plan` computes (see the module docstring)."""
    reference = copy.deepcopy(model)
    layers = reference.model.layers
    for key, kept in plan.kept.items():
        structure, _, layer = key.partition(".")
        removed = sorted(set(range(plan.unit_counts[key])) - set(kept))
        with torch.no_grad():
            if structure == "experts":
                layers[int(layer)].mlp.gate.register_forward_hook(masked_router(removed))
            elif structure == "mlp_channels":
                layers[int(layer)].mlp.experts.down_proj[:, :, removed] = 0
            elif structure == "hidden_channels":
                reference.model.embed_tokens.weight[:, removed] = 0
                reference.lm_head.weight[:, removed] = 0
                for block in layers:
                    block.self_attn.o_proj.weight[removed] = 0
                    block.mlp.experts.down_proj[:, removed] = 0
                    if hasattr(block.mlp, "shared_expert"):
                        block.mlp.shared_expert.down_proj.weight[removed] = 0
            else:
                field = "num_attention_heads" if structure == "query_heads" else "num_key_value_heads"
                o_proj = layers[int(layer)].self_attn.o_proj
                width = o_proj.in_features // getattr(reference.config, field)
                for unit in removed:
                    o_proj.weight[:, unit * width : (unit + 1) * width] = 0
    skip_layers(reference, plan.removed_layers)
    return reference


def experts_ratio(model, experts: int) -> float:
    """The pruning ratio that removes `experts` experts of every layer."""
    per_expert = sum(
        p[0].numel()
        for n, p in model.named_parameters()
        if n.endswith(("mlp.gate.weight", "gate_up_proj", "down_proj"))
    )
    return round(experts * per_expert / sum(p.numel() for p in model.parameters()), 4)


def _config(structures, ratio, importance="magnitude", **kwargs):
    return PrunerConfig(
        importance=importance,
        pruning_ratio=ratio,
        structures=structures,
        num_calibration_samples=4,
        calibration_seq_len=16,
        **kwargs,
    )


def _prune(family, config, **overrides):
    pruner = AutoPruner.from_model(BUILDERS[family](**overrides), config)
    return pruner.prune(calibration_data=CALIBRATION), pruner.plan


def _check_exact_and_reload(family, model, plan, tmp_path, stock: bool, **overrides):
    ids = input_ids()
    reference = zeroed_reference(BUILDERS[family](**overrides), plan)
    pruned = logits(model, ids)
    assert torch.allclose(pruned, logits(reference, ids), atol=ATOL)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(reloaded).__name__.startswith("Pruned") is not stock
    assert torch.allclose(logits(reloaded, ids), pruned, atol=ATOL)


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("importance", ["magnitude", "frequency", "reap", "random"])
def test_experts_equal_masked_router(family, importance, tmp_path):
    """Two experts of every layer go; the pruned model is the original with their router logits at -inf, and its
    checkpoint (stock type: one expert count in every layer) reloads with the same logits."""
    ratio = experts_ratio(BUILDERS[family](), 2)
    model, plan = _prune(family, _config(["experts"], ratio, importance))
    assert {key: len(kept) for key, kept in plan.kept.items()} == {f"experts.{i}": 6 for i in range(3)}
    assert model.config.num_local_experts == 6 if family == "mixtral" else model.config.num_experts == 6
    _check_exact_and_reload(family, model, plan, tmp_path, stock=True)


# Two fresh interpreters per family: one family by default, the others with the slow tests.
@pytest.mark.parametrize(
    "family", [f if f == "mixtral" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(BUILDERS)]
)
def test_experts_per_layer_counts(family, tmp_path):
    """REAP with per-layer ratios keeps different expert counts per layer: the registered per-layer type, exact, and
    reloaded in a fresh process with and without optimum-prune installed."""
    ratio = experts_ratio(BUILDERS[family](), 3)
    model, plan = _prune(family, _config(["experts"], ratio, "reap", layer_ratios=[0.125, 0.375, 0.625]))
    counts = [len(plan.kept.get(f"experts.{i}", range(NUM_EXPERTS))) for i in range(3)]
    assert counts == [7, 5, 3]
    assert [layer.mlp.gate.weight.shape[0] for layer in model.model.layers] == counts
    _check_exact_and_reload(family, model, plan, tmp_path, stock=False)
    expected = logits(model, input_ids())
    for import_package in (True, False):
        [(fresh, name)] = fresh_process_logits(
            [tmp_path / "pruned"], input_ids(), trust_remote_code=True, import_package=import_package
        )
        assert name.startswith("Pruned") and torch.allclose(fresh, expected, atol=ATOL)


# Ratios that remove units of every layer of the tiny models (expert channels and hidden channels round to 8).
STRUCTURE_RATIOS = {"attention_heads": 0.05, "query_heads": 0.062, "mlp_channels": 0.371, "layers": 0.312}


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("structure", sorted(STRUCTURE_RATIOS))
def test_moe_structures_equal_zeroed_reference(family, structure, tmp_path):
    ratio = 0.046 if (family, structure) == ("qwen2_moe", "query_heads") else STRUCTURE_RATIOS[structure]
    model, plan = _prune(family, _config([structure], ratio))
    assert plan.kept or plan.removed_layers
    _check_exact_and_reload(family, model, plan, tmp_path, stock=True)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_moe_per_layer_heads_experts_and_channels(family, tmp_path):
    """Heads, experts and expert channels together with global ranking: per-layer widths of all three, exact."""
    config = _config(["attention_heads", "mlp_channels", "experts"], 0.4, global_ranking=True)
    model, plan = _prune(family, config)
    assert {key.split(".")[0] for key in plan.kept} == {"attention_heads", "mlp_channels", "experts"}
    assert all(len(plan.kept[key]) % 8 == 0 for key in plan.kept if key.startswith("mlp_channels"))
    _check_exact_and_reload(family, model, plan, tmp_path, stock=False)


@pytest.mark.parametrize(
    "family", [f if f == "mixtral" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(BUILDERS)]
)
def test_moe_hidden_channels(family, tmp_path):
    """Hidden channels (router, experts, attention, norms compensated), 40 of 48 kept: a multiple of 8 for the grouped
    experts kernel. Qwen3-MoE's per-head q/k norms keep their epsilon, which only the registered type can say, so its
    checkpoint (reloaded in a fresh process too) is that type; Mixtral's and Qwen2-MoE's stay stock."""
    model, plan = _prune(family, _config(["hidden_channels"], 0.167), rms_norm_eps=0.05)  # an epsilon that shows
    assert len(plan.kept["hidden_channels"]) == 40
    _check_exact_and_reload(family, model, plan, tmp_path, stock=family != "qwen3_moe", rms_norm_eps=0.05)
    [(fresh, _)] = fresh_process_logits(
        [tmp_path / "pruned"], input_ids(), trust_remote_code=True, import_package=False
    )
    assert torch.allclose(fresh, logits(model, input_ids()), atol=ATOL)


def test_experts_dispatched(tmp_path):
    """REAP under a `device_map` with the even layers offloaded to disk: routing statistics come through accelerate's
    hooks, per-layer expert counts, exact against the masked router."""
    tiny_mixtral().save_pretrained(tmp_path / "moe", max_shard_size="20KB")
    pruner = AutoPruner.from_pretrained(
        tmp_path / "moe",
        pruner_config=_config(["experts"], experts_ratio(tiny_mixtral(), 3), "reap", global_ranking=True),
        dtype=torch.float32,
        device_map=cpu_and_disk_map(tiny_mixtral(), LLAMA_LAYOUT),
        offload_folder=str(tmp_path / "offload"),
    )
    assert "disk" in pruner.model.hf_device_map.values()
    model = pruner.prune(calibration_data=CALIBRATION)
    assert len({len(kept) for kept in pruner.plan.kept.values()}) > 1
    reference = zeroed_reference(tiny_mixtral(), pruner.plan)
    assert torch.allclose(logits(model, input_ids()), logits(reference, input_ids()), atol=ATOL)


def test_qwen3_moe_dense_layers_keep_their_mlp(tmp_path):
    """Layers in `mlp_only_layers` have a dense MLP and no experts: experts of the other layers go, exactly."""
    overrides = {"mlp_only_layers": [1]}
    model, plan = _prune("qwen3_moe", _config(["experts"], 0.15), **overrides)
    assert sorted(plan.kept) == ["experts.0", "experts.2"]
    assert model.model.layers[1].mlp.gate_proj.weight.shape == (64, 48)
    _check_exact_and_reload("qwen3_moe", model, plan, tmp_path, stock=True, **overrides)


def test_routing_statistics_and_reap():
    """Frequency counts every (token, slot) decision once; an expert whose output is zero scores 0 under REAP (it adds
    nothing when routed) while the router still picks it, so REAP removes it and frequency need not."""
    model = tiny_mixtral()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[3] = 0
    groups = build_group_sets(model, AutoPruner.from_model(model, _config(["experts"], 0.1)).spec, ["experts"])
    stats = collect_statistics(model, CALIBRATION, {ROUTING}, batch_size=4)
    routing = stats.expert_routing(0)
    assert routing.count.sum().item() == CALIBRATION.numel() * 2 and routing.tokens == CALIBRATION.numel()
    assert routing.count[3] > 0 and routing.weighted_norm[3] == 0
    reap = get_importance("reap").score(groups["experts.0"], stats)
    assert reap.argmin().item() == 3 and (reap[torch.arange(NUM_EXPERTS) != 3] > 0).all()


@pytest.mark.parametrize(
    ("family", "config", "message"),
    [
        ("mixtral", _config(["experts"], 0.3, "wanda_sp"), "cannot score ['experts'] of 'mixtral'"),
        ("mixtral", _config(["experts"], 0.3, "taylor"), "'frequency' ranks experts best"),
        (
            "qwen3_moe",
            _config(["mlp_channels"], 0.3, "taylor"),
            "use one of ['magnitude', 'random', 'frequency', 'reap']",
        ),
    ],
)
def test_moe_refusals(family, config, message):
    with pytest.raises(ValueError) as err:
        _prune(family, config)
    assert message in str(err.value)


@pytest.mark.parametrize("options", [{}, {"global_ranking": True}])
def test_experts_keep_num_experts_per_tok(options):
    """The router picks 2 experts per token: removing 7 of 8 is refused uniformly, and global ranking stops at 2."""
    ratio = experts_ratio(tiny_mixtral(), 7)
    if not options:
        with pytest.raises(ValueError, match="would keep 1 experts in layer 0, fewer than the 2 the router picks"):
            _prune("mixtral", _config(["experts"], ratio))
        return
    with pytest.raises(ValueError, match="reach"):  # every layer at its floor of 2 cannot remove 7 experts' share
        _prune("mixtral", _config(["experts"], ratio, **options))
    _, plan = _prune("mixtral", _config(["experts"], experts_ratio(tiny_mixtral(), 6), **options))
    assert all(len(kept) == 2 for kept in plan.kept.values())


def test_experts_refused_on_dense_and_routing_criteria_on_other_structures():
    with pytest.raises(ValueError, match=r"supports structures .* got \['experts'\]"):
        AutoPruner.from_model(tiny_llama(), _config(["experts"], 0.2))
    with pytest.raises(ValueError, match=r"`importance='reap'` scores only \['experts'\]"):
        _config(["attention_heads"], 0.2, "reap")


def test_module_list_experts_refused():
    """Experts stored as a module list (Transformers 4.x's layout, simulated here) are refused by name before any
    scoring, rather than leaving them out of hidden-channel pruning."""
    model = tiny_mixtral()
    for layer in model.model.layers:
        layer.mlp.experts = torch.nn.ModuleList(torch.nn.Linear(48, 32) for _ in range(NUM_EXPERTS))
    with pytest.raises(ValueError, match=r"fused 3-D tensors \(`mlp.experts.gate_up_proj`.*Transformers 4.x module"):
        AutoPruner.from_model(model, _config(["hidden_channels"], 0.2))


def test_cli_prunes_experts(tmp_path):
    """`optimum-prune prune --structures experts` on a saved Qwen3-MoE checkpoint; a criterion that cannot score
    experts is one error line with exit status 2."""
    model_dir = tmp_path / "moe"
    tiny_qwen3_moe().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    (tmp_path / "calib.txt").write_text(word_text(3000))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def prune(importance, output):
        args = ["--model", str(model_dir), "--pruning-ratio", str(experts_ratio(tiny_qwen3_moe(), 2))]
        args += ["--importance", importance, "--structures", "experts", "--calibration", str(tmp_path / "calib.txt")]
        args += ["--num-calibration-samples", "4", "--calibration-seq-len", "32", "--output", str(output)]
        command = [sys.executable, "-m", "optimum_prune.commands.cli", "prune", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)

    result = prune("reap", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_local_experts"] == 6  # how Transformers 5 writes it
    refused = prune("wanda_sp", tmp_path / "refused")
    assert refused.returncode == 2 and not (tmp_path / "refused").exists()
    assert refused.stderr.strip().splitlines()[-1].startswith("optimum-prune: error: `importance='wanda_sp'` cannot")
