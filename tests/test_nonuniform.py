"""Non-uniform allocation (layer ranges, per-layer ratios, global ranking), layer removal with width pruning, and
per-layer checkpoints that load with and without the package."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from family_table import FAMILIES
from testing_utils import input_ids, logits, tiny_glm, tiny_llama
from transformers import AutoModelForCausalLM, PretrainedConfig

import optimum_prune
from optimum_prune import AutoPruner, PrunerConfig, PruningPlan, count_parameters


ATOL = 1e-5
HEAD_DIM = 8  # tiny_llama: 8 query heads in 4 KV groups of head_dim 8
WIDTHS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _prune(model, importance="random", **kwargs):
    kwargs.setdefault("structures", ["attention_heads", "mlp_channels"])
    pruner = AutoPruner.from_model(model, PrunerConfig(importance=importance, **kwargs))
    pruner.prune()
    return pruner


def _layer_widths(model):
    return [
        (
            layer.self_attn.q_proj.weight.shape[0] // HEAD_DIM,
            layer.self_attn.k_proj.weight.shape[0] // HEAD_DIM,
            layer.mlp.down_proj.weight.shape[1],
        )
        for layer in model.model.layers
    ]


def _config_widths(config):
    return [tuple(getattr(c, f) for f in WIDTHS) for c in config.per_layer_config]


# ---------------------------------------------------------------------------------------------------- configuration


def test_layer_selections_normalised_and_round_trip(tmp_path):
    config = PrunerConfig(
        importance="magnitude", attention_layers=(1, 5), mlp_layers=range(2, 4), layer_ratios={3: 0.5, 1: 0.2}
    )
    assert config.attention_layers == [1, 2, 3, 4] and config.mlp_layers == [2, 3]
    assert config.layer_ratios == {1: 0.2, 3: 0.5}
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "pruner_config.json").read_text())["attention_layers"] == [1, 2, 3, 4]
    assert PrunerConfig.from_pretrained(tmp_path) == config
    assert PrunerConfig(importance="magnitude", mlp_layers=[3, 1, 3]).mlp_layers == [1, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention_layers": (1, 2, 3)}, r"`\(start, end\)` pair"),
        ({"mlp_layers": [-1, 2]}, "non-negative layer indices"),
        ({"mlp_layers": "1-4"}, "list of layer indices, a `range` or a `\\(start, end\\)` tuple"),
        ({"mlp_layers": []}, "is empty"),
        ({"layer_ratios": [0.2, 1.0]}, r"values must be numbers in \[0, 1\)"),
        ({"layer_ratios": [0.0, 0.0]}, "all 0"),
        ({"global_ranking": True, "layer_ratios": [0.1]}, "Choose one of"),
        ({"uniform": True, "mlp_layers": (1, 3)}, r"cannot be combined with \['mlp_layers'\]"),
        ({"uniform": True, "global_ranking": True}, r"cannot be combined with \['global_ranking'\]"),
        ({"global_normalization": "softmax"}, r"must be one of \['mean', 'none'\]"),
        ({"structures": ["mlp_channels"], "attention_layers": [1]}, "not in `structures`"),
        ({"structures": ["layers"], "global_ranking": True}, "no width structure"),
        ({"layer_importance": "magnitude"}, "containing 'layers'"),
        ({"structures": ["layers", "mlp_channels"], "layer_importance": "nope"}, "choose one of"),
        ({"structures": ["layers"], "num_layers_to_remove": 1}, "needs width structures"),
        ({"min_heads": 0}, "positive integer"),
        ({"structures": ["hidden_channels"], "layer_ratios": [0.1]}, "every layer shares"),
    ],
)
def test_invalid_allocation_options(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PrunerConfig(importance="magnitude", **kwargs)


# ------------------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "options",
    [
        {"layer_ratios": [0.1, 0.6, 0.3]},
        {"global_ranking": True},
        {"attention_layers": [1], "mlp_layers": (0, 2)},
    ],
    ids=["ratios", "global", "ranges"],
)
def test_non_uniform_equals_zeroed_original(options):
    model = tiny_llama(bias=True)
    original = copy.deepcopy(model)
    ids = input_ids()
    pruner = _prune(model, pruning_ratio=0.3, **options)
    widths = _layer_widths(pruner.model)
    assert len(set(widths)) > 1, widths  # really non-uniform
    assert _config_widths(pruner.model.config) == widths
    reference, _ = FAMILIES["llama"].zeroed_reference(original, pruner.plan)
    torch.testing.assert_close(logits(pruner.model, ids), logits(reference, ids), atol=ATOL, rtol=0)
    if "attention_layers" in options:  # unlisted layers keep every unit
        assert widths[0][:2] == (8, 4) and widths[2] == (8, 4, 80)


def test_layer_removal_with_width_equals_skipped_zeroed_original():
    model = tiny_llama(num_hidden_layers=6)
    original = copy.deepcopy(model)
    ids = input_ids()
    pruner = _prune(
        model, pruning_ratio=0.45, structures=["layers", "attention_heads", "mlp_channels"], num_layers_to_remove=2
    )
    plan = pruner.plan
    assert len(plan.removed_layers) == 2 and plan.kept
    assert not any(int(key.split(".")[1]) in plan.removed_layers for key in plan.kept)
    reference, _ = FAMILIES["llama"].zeroed_reference(original, plan)
    assert pruner.model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in pruner.model.model.layers] == [0, 1, 2, 3]
    torch.testing.assert_close(logits(pruner.model, ids), logits(reference, ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------- targets


MODES = {
    "uniform": {},
    "uniform_forced": {"uniform": True},
    "ranges": {"attention_layers": (1, 5), "mlp_layers": (1, 5)},
    "ratios_scaled": {"layer_ratios": {1: 0.1, 2: 0.3, 3: 0.2, 4: 0.2}},
    "global_mean": {"global_ranking": True, "round_to": 8, "min_heads": 4},
    "global_raw": {"global_ranking": True, "global_normalization": "none"},
    "layers_and_width": {"structures": ["layers", "attention_heads", "mlp_channels"]},
    "layers_and_ranges": {
        "structures": ["layers", "mlp_channels"],
        "num_layers_to_remove": 1,
        "mlp_layers": [1, 2, 3, 4],
    },
}


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("mode", list(MODES))
def test_target_met_for_each_mode(mode, ratio):
    model = tiny_llama(num_hidden_layers=6, intermediate_size=256)
    before = count_parameters(model)
    pruner = _prune(model, importance="magnitude", pruning_ratio=ratio, **MODES[mode])
    achieved = 1 - count_parameters(pruner.model) / before
    assert abs(achieved - ratio) <= 0.01, achieved
    widths = _layer_widths(pruner.model)
    if mode.startswith("uniform"):
        assert len(set(widths)) == 1 and pruner.model.config.model_type in ("llama", "pruned_llama")
    if mode == "ranges":
        assert widths[0] == widths[5] == (8, 4, 256) and len(set(widths[1:5])) == 1 and widths[1] != widths[0]
    if mode == "global_mean":
        assert all(heads >= 4 and channels % 8 == 0 for heads, _, channels in widths)


def test_ratios_that_meet_the_target_are_used_exactly():
    model = tiny_llama(num_hidden_layers=4, intermediate_size=256)
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    ratio = round(0.25 * mlp / count_parameters(model), 4)  # what removing a quarter of every MLP removes
    pruner = _prune(
        model, importance="magnitude", pruning_ratio=ratio, structures=["mlp_channels"], layer_ratios=[0.25] * 4
    )
    assert [w[2] for w in _layer_widths(pruner.model)] == [192] * 4  # 256 * (1 - 0.25): as given, not rescaled


def test_uniform_true_keeps_a_stock_config():
    """Hidden size 64 with 8 heads of 8: 6 heads (3 of 4 KV groups) do not divide 64, which the stock LlamaConfig
    rejects. Uniform allocation alone picks 6 heads (registered type); `uniform=True` picks a stock head count."""
    options = dict(importance="magnitude", pruning_ratio=0.2, min_channels=8)
    free = _prune(tiny_llama(hidden_size=64), **options)
    assert free.model.config.model_type == "pruned_llama" and free.model.config.num_attention_heads == 6
    model = tiny_llama(hidden_size=64)
    before = count_parameters(model)
    forced = _prune(model, uniform=True, **options)
    assert forced.model.config.model_type == "llama" and 64 % forced.model.config.num_attention_heads == 0
    assert len(set(_layer_widths(forced.model))) == 1
    assert abs(1 - count_parameters(forced.model) / before - 0.2) <= 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pruning_ratio": 0.5, "attention_layers": [1], "mlp_layers": [1]}, "out of reach.*attention_layers=\\[1\\]"),
        ({"pruning_ratio": 0.3, "min_heads": 8, "min_channels": 80}, "out of reach.*min_heads=8"),
        ({"pruning_ratio": 0.2, "min_heads": 9}, "exceeds the model's 8 heads"),
        ({"pruning_ratio": 0.2, "layer_ratios": [0.1, 0.2]}, "has 2 values; the model has 3 layers"),
        ({"pruning_ratio": 0.2, "mlp_layers": [1, 7]}, "names layer 7, but the model has 3 layers"),
        (
            {"pruning_ratio": 0.1, "structures": ["layers", "mlp_channels"], "num_layers_to_remove": 2},
            "lower `num_layers_to_remove`",
        ),
    ],
)
def test_impossible_constraints_say_why(kwargs, message):
    pruner = AutoPruner.from_model(tiny_llama(), PrunerConfig(importance="magnitude", **kwargs))
    with pytest.raises(ValueError, match=message):
        pruner.prune()


def test_families_without_per_layer_configs_refuse_non_uniform_plans(monkeypatch):
    import dataclasses

    from optimum_prune.architectures.base import ARCHITECTURE_REGISTRY

    # A family registered without a per-layer type (every built-in one has one now).
    monkeypatch.setitem(
        ARCHITECTURE_REGISTRY, "glm", dataclasses.replace(ARCHITECTURE_REGISTRY["glm"], pruned_model_type=None)
    )
    pruner = AutoPruner.from_model(
        tiny_glm(), PrunerConfig(importance="magnitude", pruning_ratio=0.2, global_ranking=True)
    )
    with pytest.raises(
        ValueError,
        match=r"need a registered type with `per_layer_config`; 'glm' has none \(supported: \['pruned_bloom', "
        r"'pruned_gemma2', 'pruned_gemma3_text', 'pruned_glm', 'pruned_glm4', 'pruned_llama', 'pruned_mixtral', "
        r"'pruned_opt', 'pruned_phi3', 'pruned_qwen2_moe', 'pruned_qwen3', 'pruned_qwen3_moe'\]\)",
    ):
        pruner.prune()


def test_layer_importance_scores_layers():
    """Layers scored by their own criterion (`layer_importance`), widths by `importance`."""
    config = dict(importance="magnitude", pruning_ratio=0.4, structures=["layers", "mlp_channels"])
    with pytest.raises(ValueError, match="'taylor' criterion needs calibration data"):
        AutoPruner.from_model(
            tiny_llama(num_hidden_layers=6), PrunerConfig(layer_importance="taylor", **config)
        ).prune()
    model = tiny_llama(num_hidden_layers=6)
    with torch.no_grad():  # layer 2 becomes the smallest by magnitude
        for p in model.model.layers[2].parameters():
            p.mul_(0.1)
    pruner = _prune(model, **{**config, "importance": "random", "layer_importance": "magnitude"})
    assert pruner.plan.removed_layers == [2] and pruner.plan.kept


# ------------------------------------------------------------------------------------------------------ checkpoints


def _non_uniform_pruner():
    """Global ranking with one layer removed: per-layer heads, KV heads and MLP widths, and fewer layers."""
    model = tiny_llama(num_hidden_layers=4)
    pruner = _prune(
        model,
        pruning_ratio=0.45,
        structures=["layers", "attention_heads", "mlp_channels"],
        num_layers_to_remove=1,
        layer_ratios={0: 0.6, 2: 0.2, 3: 0.4},
    )
    assert len(set(_layer_widths(pruner.model))) > 1 and pruner.model.config.model_type == "pruned_llama"
    return pruner


def _generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


def _fresh_processes(path, ids) -> dict:
    """Load `path` in two fresh processes at once: with the package imported (registered type) and with the package
    hidden (`trust_remote_code=True`, the modeling file saved beside the weights). Logits and greedy generations with
    the dynamic and the static cache come back from each."""
    # This checkout's package first (a relative PYTHONPATH would resolve against the temporary cwd).
    root = os.path.dirname(os.path.dirname(os.path.abspath(optimum_prune.__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(path.parent / "modules"), "PYTHONPATH": root}
    running = {}
    for name, import_package in (("registered", True), ("trust_remote_code", False)):
        code = textwrap.dedent(f"""
            import sys, torch
            torch.set_num_threads({torch.get_num_threads()})  # the parent's summation order, for bitwise equality
            {"import optimum_prune" if import_package else "sys.modules['optimum_prune'] = None  # package absent"}
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code={not import_package}).eval()
            ids = torch.tensor({ids.tolist()})
            kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                out = dict(logits=model(input_ids=ids).logits, dynamic=model.generate(ids, **kw),
                           static=model.generate(ids, cache_implementation="static", **kw), cls=type(model).__name__)
            torch.save(out, {str(path.parent / f"{name}.pt")!r})
        """)
        running[name] = subprocess.Popen(
            [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env, cwd=path.parent
        )
    results = {}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
        results[name] = torch.load(path.parent / f"{name}.pt")
    return results


def test_per_layer_checkpoint_format(tmp_path):
    pruner = _non_uniform_pruner()
    pruner.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "pruned_llama" and config["num_hidden_layers"] == 3
    assert "auto_map" in config and (tmp_path / "out" / "modeling_pruned_llama.py").exists()
    per_layer = config["per_layer_config"]
    assert per_layer and all(set(v) <= set(WIDTHS) for v in per_layer.values())
    expected = _layer_widths(pruner.model)
    for i, widths in enumerate(expected):  # sparse: only the layers that differ from the global fields
        stored = {f: per_layer.get(str(i), {}).get(f, config[f]) for f in WIDTHS}
        assert tuple(stored[f] for f in WIDTHS) == widths
    # Global fields stay readable (Transformers 5's mixin would raise on them) and per-layer views match the weights.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(loaded.config.num_attention_heads, int)
    assert _config_widths(loaded.config) == expected == _layer_widths(loaded)


@pytest.mark.skipif(
    not hasattr(PretrainedConfig, "per_layer_attributes"), reason="Transformers without native per_layer_config"
)
def test_per_layer_config_reads_natively(tmp_path):
    """The stored `per_layer_config` is the format Transformers 5 parses itself (`HeterogeneousConfigMixin`): the
    base config class reads the same widths per layer. (The stock `LlamaConfig` of 5.24 cannot: its validator reads
    `num_attention_heads` globally, which the mixin forbids; hence the package's own config class.)"""
    pruner = _non_uniform_pruner()
    pruner.save_pretrained(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("model_type", "auto_map", "architectures", "base_model_type", "transformers_version"):
        data.pop(key, None)
    native = PretrainedConfig(**data)
    assert native.is_heterogeneous
    assert _config_widths(native) == _layer_widths(pruner.model)


@pytest.mark.slow  # tests/test_families.py reloads a per-layer LLaMA in fresh processes by default
def test_reload_in_fresh_processes_identical(tmp_path):
    pruner = _non_uniform_pruner()
    out = tmp_path / "out"
    pruner.save_pretrained(out)
    ids = input_ids(batch=1, length=7)
    expected_logits, expected_tokens = logits(pruner.model, ids), _generate(pruner.model, ids)
    for name, fresh in _fresh_processes(out, ids).items():
        assert fresh["cls"] == "PrunedLlamaForCausalLM", name
        torch.testing.assert_close(fresh["logits"], expected_logits, atol=0, rtol=0)
        assert torch.equal(fresh["dynamic"], expected_tokens) and torch.equal(fresh["static"], expected_tokens), name


def test_generate_dynamic_and_static_cache_equal():
    pruner = _non_uniform_pruner()
    ids = input_ids(batch=2, length=5)
    dynamic = _generate(pruner.model, ids)
    static = _generate(pruner.model, ids, cache_implementation="static")
    assert dynamic.shape == (2, 11) and torch.equal(dynamic, static)
    # And the cache-free forward agrees with the cached generation step by step.
    with torch.no_grad():
        greedy = pruner.model(input_ids=dynamic[:, :-1]).logits[:, ids.shape[1] - 1 :].argmax(-1)
    assert torch.equal(greedy, dynamic[:, ids.shape[1] :])


def test_reload_bfloat16_device_map_and_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    pruner = _non_uniform_pruner()
    pruner.save_pretrained(tmp_path / "out")
    ids = input_ids()
    expected = logits(pruner.model, ids)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert _layer_widths(half) == _layer_widths(pruner.model)
    torch.testing.assert_close(logits(half, ids).float(), expected, atol=0.1, rtol=0.05)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    torch.testing.assert_close(logits(lora, ids), expected, atol=0, rtol=0)  # LoRA B starts at zero
    loss = lora(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_plan_reapplies_per_layer_widths_and_removed_layers(tmp_path):
    pruner = _non_uniform_pruner()
    pruner.plan.save_pretrained(tmp_path)
    plan = PruningPlan.from_pretrained(tmp_path)
    assert plan == pruner.plan and plan.removed_layers
    other = plan.apply(tiny_llama(num_hidden_layers=4))
    first = dict(pruner.model.named_parameters())
    for name, p in other.named_parameters():
        torch.testing.assert_close(p, first[name], atol=0, rtol=0)
    assert type(other) is type(pruner.model)
    assert other.config.to_dict() == pruner.model.config.to_dict()
