"""Every family x every structure: exact against a reference built without pruning code, reload in a fresh process
(with the package, and with `trust_remote_code=True` without it), `generate`, and every registered criterion.

The references only zero weights (or skip layers, or patch norms) of an untouched copy of the original model; they
never call optimum-prune. Each family row names its layout (`family_table`), which says where a removed unit is
zeroed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from family_table import BLOOM_LAYOUT, LLAMA_LAYOUT, OPT_LAYOUT, Layout, layer_ratio, zeroed_reference
from testing_utils import (
    VOCAB,
    fresh_process_logits,
    input_ids,
    logits,
    tiny_bloom,
    tiny_gemma,
    tiny_glm,
    tiny_opt,
    tiny_phi3,
    tiny_qwen3,
)

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.architectures import get_architecture
from optimum_prune.groups import decoder_layers
from optimum_prune.importance import IMPORTANCE_REGISTRY


ATOL = 1e-5
WIDTH_STRUCTURES = ("attention_heads", "mlp_channels", "hidden_channels")
STRUCTURES = (*WIDTH_STRUCTURES, "layers")


def _removed(kept, total):
    return sorted(set(range(total)) - set(kept))


@dataclass
class Family:
    """How to build a tiny model of one family (or variant) and where its layout keeps what the reference zeroes
    (`family_table.Layout`)."""

    build: Callable
    layout: Layout
    ratios: dict
    stock_type: str
    pruned_type: str | None = None
    unsupported: tuple = ()  # structures refused with a ValueError that names the reason


_GLM_RATIOS = {"attention_heads": 0.1, "mlp_channels": 0.2, "hidden_channels": 0.2}
_QWEN3_RATIOS = {"attention_heads": 0.2, "mlp_channels": 0.3, "hidden_channels": 0.2}
_PHI3_RATIOS = {"attention_heads": 0.16, "mlp_channels": 0.3, "hidden_channels": 0.2}
_GEMMA_RATIOS = {"attention_heads": 0.2, "mlp_channels": 0.3, "hidden_channels": 0.2}
_OPT_RATIOS = {"attention_heads": 0.08, "mlp_channels": 0.2, "hidden_channels": 0.2}
_BLOOM_RATIOS = {"attention_heads": 0.06, "mlp_channels": 0.2, "hidden_channels": 0.2}

FAMILIES = {
    "qwen3": Family(tiny_qwen3, LLAMA_LAYOUT, _QWEN3_RATIOS, stock_type="qwen3", pruned_type="pruned_qwen3"),
    # Tied embeddings (the final norm also divides out the lm_head's share of the residual scale) and sliding-window
    # layers (`layer_types` follows layer removal).
    "qwen3-tied-sliding": Family(
        lambda **kw: tiny_qwen3(
            tie_word_embeddings=True,
            use_sliding_window=True,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            sliding_window=4,
            **kw,
        ),
        LLAMA_LAYOUT,
        _QWEN3_RATIOS,
        stock_type="qwen3",
        pruned_type="pruned_qwen3",
    ),
    "phi3": Family(tiny_phi3, LLAMA_LAYOUT, _PHI3_RATIOS, stock_type="phi3", pruned_type="pruned_phi3"),
    "gemma2": Family(tiny_gemma, LLAMA_LAYOUT, _GEMMA_RATIOS, stock_type="gemma2", pruned_type="pruned_gemma2"),
    "gemma3_text": Family(
        lambda **kw: tiny_gemma(gemma3=True, **kw),
        LLAMA_LAYOUT,
        _GEMMA_RATIOS,
        stock_type="gemma3_text",
        pruned_type="pruned_gemma3_text",
    ),
    "glm": Family(tiny_glm, LLAMA_LAYOUT, _GLM_RATIOS, stock_type="glm", pruned_type="pruned_glm"),
    "glm4": Family(
        lambda **kw: tiny_glm(glm4=True, **kw), LLAMA_LAYOUT, _GLM_RATIOS, stock_type="glm4", pruned_type="pruned_glm4"
    ),
    "bloom": Family(tiny_bloom, BLOOM_LAYOUT, _BLOOM_RATIOS, stock_type="bloom", pruned_type="pruned_bloom"),
    "bloom-post-ln-residual": Family(
        lambda **kw: tiny_bloom(apply_residual_connection_post_layernorm=True, **kw),
        BLOOM_LAYOUT,
        _BLOOM_RATIOS,
        stock_type="bloom",
        pruned_type="pruned_bloom",
    ),
    "opt": Family(tiny_opt, OPT_LAYOUT, _OPT_RATIOS, stock_type="opt", pruned_type="pruned_opt"),
    "opt-post-ln": Family(
        lambda **kw: tiny_opt(do_layer_norm_before=False, tie_word_embeddings=False, **kw),
        OPT_LAYOUT,
        _OPT_RATIOS,
        stock_type="opt",
        pruned_type="pruned_opt",
    ),
    "opt-projected": Family(
        lambda **kw: tiny_opt(word_embed_proj_dim=32, **kw),
        OPT_LAYOUT,
        _OPT_RATIOS,
        stock_type="opt",
        pruned_type="pruned_opt",
        unsupported=("hidden_channels",),
    ),
}


# The matrix --------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    family: Family
    pruned: torch.nn.Module
    reference: torch.nn.Module
    plan: object
    pruner: object
    handles: list


_CASES: dict = {}


def _case(family_name: str, structure: str) -> Case:
    """Prune a fresh tiny model of `family_name` along one structure (random scores) and build its reference."""
    key = (family_name, structure)
    if key in _CASES:
        return _CASES[key]
    family = FAMILIES[family_name]
    model = family.build()
    reference = copy.deepcopy(model)
    ratio = family.ratios.get(structure)
    if structure == "layers":  # exactly one decoder layer's share of the parameters
        ratio = layer_ratio(model, family.layout)
    config = PrunerConfig(importance="random", pruning_ratio=ratio, structures=[structure])
    pruner = AutoPruner.from_model(model, config)
    pruned = pruner.prune()
    plan = pruner.plan
    if structure == "layers":
        assert plan.removed_layers, "no layer was removed"
    elif structure == "hidden_channels":
        assert _removed(plan.kept["hidden_channels"], plan.unit_counts["hidden_channels"]), "no channel was removed"
    else:
        assert plan.kept, f"no {structure} unit was removed"
    reference, handles = zeroed_reference(family.layout, reference, plan)
    _CASES[key] = Case(family, pruned, reference, plan, pruner, handles)
    return _CASES[key]


MATRIX = [(f, s) for f in FAMILIES for s in STRUCTURES if s not in FAMILIES[f].unsupported]
REFUSED = [(f, s) for f in FAMILIES for s in FAMILIES[f].unsupported]


@pytest.mark.parametrize("family_name,structure", REFUSED, ids=[f"{f}-{s}" for f, s in REFUSED])
def test_unsupported_structure_is_refused_clearly(family_name, structure):
    model = FAMILIES[family_name].build()
    config = PrunerConfig(importance="magnitude", pruning_ratio=0.2, structures=[structure])
    with pytest.raises(ValueError, match=f"`{structure}` pruning is supported only when"):
        AutoPruner.from_model(model, config).prune()


@pytest.mark.parametrize("family_name,structure", MATRIX, ids=[f"{f}-{s}" for f, s in MATRIX])
def test_pruned_equals_reference(family_name, structure):
    case = _case(family_name, structure)
    ids = input_ids()
    assert sum(p.numel() for p in case.pruned.parameters()) < sum(p.numel() for p in case.reference.parameters())
    torch.testing.assert_close(logits(case.pruned, ids), logits(case.reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family_name,structure", MATRIX, ids=[f"{f}-{s}" for f, s in MATRIX])
def test_pruned_equals_reference_with_padding(family_name, structure):
    """Left padding changes positions (OPT's learned positions, BLOOM's ALiBi distances come from the mask's
    cumulative sum): every kept head must still see its original slope."""
    case = _case(family_name, structure)
    ids = input_ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in the first row
    with torch.no_grad():
        got = case.pruned(input_ids=ids, attention_mask=mask).logits
        want = case.reference(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)


def _saved_checkpoints(tmp_path, family_name):
    """Every structure's checkpoint of a family (and its per-layer one) saved under `tmp_path`, with their logits."""
    family = FAMILIES[family_name]
    ids = input_ids()
    paths, expected = [], []
    for structure in STRUCTURES:
        if structure in family.unsupported:
            continue
        case = _case(family_name, structure)
        out = tmp_path / family_name / structure
        case.pruner.save_pretrained(out)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] in {family.stock_type, family.pruned_type}
        if config["model_type"] != family.stock_type:
            assert "auto_map" in config and (out / f"modeling_{family.pruned_type}.py").exists()
        paths.append(out)
        expected.append(logits(case.pruned, ids))
    if family_name in PER_LAYER:
        pruner, pruned, _ = _per_layer_case(family_name)
        out = tmp_path / family_name / "per_layer"
        pruner.save_pretrained(out)
        assert (out / "per_layer_config.py").is_file()  # imported by the copied modeling file
        saved = json.loads((out / "config.json").read_text())
        assert saved["per_layer_config"] and saved["model_type"] == family.pruned_type
        paths.append(out)
        expected.append(logits(pruned, ids))
    return paths, expected


def _reload_in_fresh_processes(tmp_path, family_names):
    """Every checkpoint of `family_names` reloads with identical logits in two fresh interpreters (shared by all of
    them, since starting one costs more than loading a tiny checkpoint): with the package imported, and without it
    through `trust_remote_code=True` (stock types need no remote code; registered types load from the copied modeling
    file, per-layer ones with `per_layer_config.py`)."""
    paths, expected = [], []
    for family_name in family_names:
        family_paths, family_expected = _saved_checkpoints(tmp_path, family_name)
        paths += family_paths
        expected += family_expected
    ids = input_ids()
    for import_package in (True, False):
        loaded = fresh_process_logits(paths, ids, trust_remote_code=not import_package, import_package=import_package)
        for path, want, (got, _) in zip(paths, expected, loaded):
            name = f"{path.parent.name}/{path.name}"
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"{name}: reload differs")


def test_reload_in_fresh_process(tmp_path):
    """Every family's checkpoints (variants apart, which share their family's modeling code)."""
    _reload_in_fresh_processes(tmp_path, [f for f in FAMILIES if "-" not in f])


@pytest.mark.slow
def test_variants_reload_in_fresh_process(tmp_path):
    _reload_in_fresh_processes(tmp_path, [f for f in FAMILIES if "-" in f])


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_generate_after_every_width_structure(family_name):
    family = FAMILIES[family_name]
    model = family.build()
    structures = [s for s in WIDTH_STRUCTURES if s not in family.unsupported]
    config = PrunerConfig(importance="magnitude", pruning_ratio=0.4, structures=structures)
    pruned = AutoPruner.from_model(model, config).prune()
    ids = input_ids(batch=2, length=5)
    out = pruned.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False
    )
    assert out.shape == (2, 9)


# Expert criteria (frequency, REAP) score only MoE experts: tests/test_experts.py runs them.
CRITERIA = [
    (f, c) for f in FAMILIES for c in sorted(IMPORTANCE_REGISTRY) if IMPORTANCE_REGISTRY[c].structures != ("experts",)
]


@pytest.mark.parametrize("family_name,criterion", CRITERIA, ids=[f"{f}-{c}" for f, c in CRITERIA])
def test_every_criterion_runs(family_name, criterion):
    model = FAMILIES[family_name].build()
    before = sum(p.numel() for p in model.parameters())
    structures, ratio = ["attention_heads", "mlp_channels"], 0.25
    if IMPORTANCE_REGISTRY[criterion].structures == ("layers",):  # layer-only criteria remove one layer
        first_layer = decoder_layers(model, get_architecture(model.config.model_type))[0]
        layer = sum(p.numel() for p in first_layer.parameters())
        structures, ratio = ["layers"], round(layer / before, 3)
    config = PrunerConfig(
        importance=criterion,
        pruning_ratio=ratio,
        structures=structures,
        num_calibration_samples=4,
        calibration_seq_len=16,
    )
    calibration = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(5))
    pruned = AutoPruner.from_model(model, config).prune(calibration_data=calibration)
    assert sum(p.numel() for p in pruned.parameters()) < before
    assert torch.isfinite(logits(pruned, input_ids())).all()


def test_bloom_keeps_original_alibi_slopes():
    """The pruned config records each layer's kept original heads; recomputing slopes from the pruned head count
    (what LLM-Pruner's BLOOM code does) would not match the zeroed original."""
    case = _case("bloom", "attention_heads")
    config = case.pruned.config
    assert config.model_type == "pruned_bloom" and config.alibi_num_heads == 6
    assert config.alibi_head_indices == [case.plan.kept[f"attention_heads.{i}"] for i in range(3)]
    ids = input_ids()
    recomputed = copy.deepcopy(case.pruned)
    recomputed.transformer.num_heads = config.n_head
    for block in recomputed.transformer.h:
        block.alibi_num_heads, block.alibi_heads = config.n_head, list(range(config.n_head))
    assert (logits(recomputed, ids) - logits(case.reference, ids)).abs().max() > 1e-3


def test_stock_shapes_keep_a_clean_stock_config():
    """Layer removal keeps BLOOM and OPT stock, with no derived fields written; FFN pruning keeps OPT stock."""
    for family_name, structure in (("bloom", "layers"), ("opt", "layers"), ("opt", "mlp_channels")):
        config = _case(family_name, structure).pruned.config.to_dict()
        assert config["model_type"] == family_name
        assert "head_dim" not in config and "intermediate_size" not in config and "alibi_head_indices" not in config
    assert _case("opt", "mlp_channels").pruned.config.ffn_dim < 80
    assert _case("bloom", "layers").pruned.config.n_layer == 2


def test_qwen3_hidden_channels_keep_the_head_norms_and_their_epsilon():
    """Qwen3's q_norm/k_norm (over head_dim) read `rms_norm_eps` too: hidden-channel pruning scales the residual
    stream instead of that epsilon, so a reloaded model builds them as they were."""
    case = _case("qwen3", "hidden_channels")
    original = FAMILIES["qwen3"].build()
    assert case.pruned.config.model_type == "qwen3" and case.pruned.config.rms_norm_eps == original.config.rms_norm_eps
    for pruned_layer, layer in zip(case.pruned.model.layers, original.model.layers):
        for name in ("q_norm", "k_norm"):
            pruned_norm, norm = getattr(pruned_layer.self_attn, name), getattr(layer.self_attn, name)
            assert torch.equal(pruned_norm.weight, norm.weight)
            assert pruned_norm.variance_epsilon == norm.variance_epsilon


# Per-layer widths ---------------------------------------------------------------------------------------------------

PER_LAYER = [name for name, family in FAMILIES.items() if family.pruned_type is not None]


def _per_layer_case(family_name: str):
    """Heads and MLP channels pruned to different widths in every layer (`layer_ratios`, random scores), and the
    original with the removed units of each layer zeroed."""
    family = FAMILIES[family_name]
    model = family.build()
    reference = copy.deepcopy(model)
    config = PrunerConfig(
        importance="random", pruning_ratio=0.25, layer_ratios=[0.1, 0.5, 0.3], structures=list(WIDTH_STRUCTURES[:2])
    )
    pruner = AutoPruner.from_model(model, config)
    pruned = pruner.prune()
    reference, _ = zeroed_reference(family.layout, reference, pruner.plan)
    return pruner, pruned, reference


@pytest.mark.parametrize("family_name", PER_LAYER)
def test_per_layer_widths_equal_reference(family_name):
    pruner, pruned, reference = _per_layer_case(family_name)
    assert pruned.config.model_type == FAMILIES[family_name].pruned_type
    overrides = pruned.config.per_layer_overrides
    assert len({tuple(sorted(v.items())) for v in overrides.values()}) >= 2  # the layers really differ
    for key, kept in pruner.plan.kept.items():  # each layer's modules have that layer's widths
        layer = pruned.get_submodule(FAMILIES[family_name].layout.layers)[int(key.split(".")[1])]
        attention = getattr(layer, "self_attn", None) or layer.self_attention
        if key.startswith("attention_heads") and hasattr(attention, "num_heads"):  # OPT, BLOOM: one head per unit
            assert attention.num_heads == len(kept)
    ids = input_ids()
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=ATOL, rtol=0)
