"""Streaming (layer-by-layer) pruning of OPT, BLOOM, GLM and GLM-4 against the in-memory path, on tiny checkpoints
saved in several shards.

Each family builds its first layer's inputs its own way (OPT: learned positions added to the embeddings, a causal
mask and position ids; BLOOM: an embedding LayerNorm, an ALiBi tensor for every head and a causal mask; GLM: partial
rotary `position_embeddings`), and OPT and BLOOM need their registered pruned types (`pruned_opt`, `pruned_bloom`,
whose blocks pick their kept heads' ALiBi rows). The references here are the in-memory pruner, `apply_plan` with the
streamed plan, and a sequential-statistics reference that zeroes removed units with no pruning code.
"""

import json
import os

import pytest
import torch
from family_table import FAMILIES
from safetensors.torch import load_file, save_file
from testing_utils import (
    VOCAB,
    fresh_process_logits,
    input_ids,
    logits,
    sequential_reference,
    tiny_bloom,
    tiny_glm,
    tiny_opt,
)
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner, PrunerConfig, convert_chatglm_checkpoint
from optimum_prune.architectures import get_architecture
from optimum_prune.calibration import prepare_calibration
from optimum_prune.groups import decoder_layers
from optimum_prune.streaming import capture_layer_inputs, prune_streaming, run_layer, sequential_plan


SAMPLES, SEQ_LEN = 6, 16
DATA = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(3))
ATOL = 1e-5

BUILD = {
    family: FAMILIES[family].build
    for family in ("opt", "bloom", "glm", "glm4", "qwen3", "phi3", "gemma2", "gemma3_text")
}
# What the pruned checkpoint's config.json says (OPT and BLOOM heads need the registered types).
# Sliding-window and global layers: each layer is replayed with its own kind's mask (`LayerInputs.by_type`).
MIXED_LAYER_TYPES = ("gemma2", "gemma3_text")
PRUNED_TYPE = {
    "opt": "pruned_opt",
    "bloom": "pruned_bloom",
    "glm": "glm",
    "glm4": "glm4",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3_text",
}


def _config(importance, **kwargs):
    kwargs.setdefault("pruning_ratio", 0.2)
    kwargs.setdefault("global_ranking", False)  # one pass, as the sequential references prune, unless asked
    return PrunerConfig(importance=importance, num_calibration_samples=SAMPLES, calibration_seq_len=SEQ_LEN, **kwargs)


def _batches(config):
    return prepare_calibration(DATA, None, config.num_calibration_samples, config.calibration_seq_len, config.seed)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One sharded safetensors checkpoint per family (tied heads for OPT and BLOOM, as their defaults)."""
    root = tmp_path_factory.mktemp("streaming_families")
    paths = {}
    for family, build in BUILD.items():
        paths[family] = root / family
        build().save_pretrained(paths[family], max_shard_size="20KB")
        assert os.path.isfile(paths[family] / "model.safetensors.index.json")
    return paths


# The tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(BUILD))
def test_weight_criterion_matches_in_memory_pruner(checkpoints, tmp_path, family):
    """Without data the streaming plan is the in-memory plan, and the streamed checkpoint (its config.json included)
    is the in-memory result."""
    path, out = checkpoints[family], tmp_path / "out"
    config = _config("magnitude")
    report = prune_streaming(path, config, None, out)
    pruner = AutoPruner.from_model(_load(path), config)
    pruned = pruner.prune()
    plan = report["plan"]
    assert plan.kept == pruner.plan.kept == sequential_plan(_load(path), config, None).kept
    assert {k.split(".")[0] for k in plan.kept} == {"attention_heads", "mlp_channels"}
    streamed = _load(out)
    assert streamed.config.model_type == pruned.config.model_type == PRUNED_TYPE[family]
    ids = input_ids()
    torch.testing.assert_close(logits(streamed, ids), logits(pruned, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(streamed, ids), logits(plan.apply(_load(path)), ids), atol=ATOL, rtol=0)
    assert report["params_after"] == sum(p.numel() for p in streamed.parameters()) < report["params_before"]
    dry = prune_streaming(path, config, None, dry_run=True)
    assert dry["params_after"] == report["params_after"] and dry["planned_widths"] == report["planned_widths"]
    # The same config.json as the in-memory path writes (BLOOM: the kept heads' original ALiBi indices too).
    pruner.save_pretrained(tmp_path / "in_memory")
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (tmp_path / "in_memory" / "config.json").read_text()
    )
    if family == "bloom":
        heads = [plan.kept[f"attention_heads.{i}"] for i in range(3)]
        assert streamed.config.alibi_head_indices == heads and streamed.config.alibi_num_heads == 6
        assert heads != [list(range(5))] * 3  # not the first heads: the slopes must follow the kept ones


# Every family with wanda_sp (and the zeroing reference), BLOOM's ALiBi path with bip and OPT's tuple outputs with
# mini_llm's block-local loss too; the rest run with -m slow.
FAST_CASES = {("bloom", "bip"), ("opt", "mini_llm")}
DATA_CASES = [
    pytest.param(family, importance, marks=[] if fast else pytest.mark.slow)
    for family in BUILD
    for importance in ("wanda_sp", "bip", "mini_llm")
    for fast in [(importance == "wanda_sp" and family != "glm4") or (family, importance) in FAST_CASES]
]
CRITERION_KWARGS = {"mini_llm": {"loss": "block", "num_perturbations": 4}}


@pytest.mark.parametrize(("family", "importance"), DATA_CASES)
def test_data_criteria_match_sequential_reference(checkpoints, tmp_path, family, importance):
    """Activation criteria: the streaming plan equals `sequential_plan` and a reference that zeroes removed units in
    the whole model (no pruning code), and the reloaded checkpoint computes what the original pruned with that plan
    by `apply_plan` computes."""
    path = checkpoints[family]
    config = _config(importance, importance_kwargs=CRITERION_KWARGS.get(importance, {}))
    report = prune_streaming(path, config, DATA, tmp_path / "out")
    plan = report["plan"]
    assert plan.kept == sequential_plan(_load(path), config, _batches(config)).kept
    if importance == "wanda_sp":
        assert plan.kept == sequential_reference(_load(path), config, _batches(config), FAMILIES[family].zero_units)
    streamed = _load(tmp_path / "out")
    assert streamed.config.model_type == PRUNED_TYPE[family]
    reference = plan.apply(_load(path))
    ids = input_ids()
    torch.testing.assert_close(logits(streamed, ids), logits(reference, ids), atol=ATOL, rtol=0)


def test_glm_query_heads_stream_like_the_sequential_reference(checkpoints, tmp_path):
    path = checkpoints["glm"]
    config = _config("wanda_sp", structures=["query_heads", "mlp_channels"], streaming=True)
    report = prune_streaming(path, config, DATA, tmp_path / "out")
    plan = report["plan"]
    assert any(key.startswith("query_heads.") for key in plan.kept)
    assert plan.kept == sequential_plan(_load(path), config, _batches(config)).kept
    streamed = _load(tmp_path / "out")
    assert streamed.config.num_key_value_heads == _load(path).config.num_key_value_heads  # k/v are kept
    ids = input_ids()
    torch.testing.assert_close(logits(streamed, ids), logits(plan.apply(_load(path)), ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "variant",
    [{"word_embed_proj_dim": 32}, pytest.param({"do_layer_norm_before": False}, marks=pytest.mark.slow)],
    ids=["project_in_out", "post_layer_norm"],
)
def test_opt_variants(tmp_path, variant):
    """OPT with `project_in`/`project_out` (run before and after the layers) and post-LN OPT (no final norm)."""
    tiny_opt(**variant).save_pretrained(tmp_path / "opt", max_shard_size="20KB")
    config = _config("wanda_sp")
    report = prune_streaming(tmp_path / "opt", config, DATA, tmp_path / "out")
    assert report["plan"].kept == sequential_plan(_load(tmp_path / "opt"), config, _batches(config)).kept
    reference = report["plan"].apply(_load(tmp_path / "opt"))
    ids = input_ids()
    torch.testing.assert_close(logits(_load(tmp_path / "out"), ids), logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["opt", "bloom", "glm", "qwen3", "phi3"])
def test_captured_inputs_follow_left_padding(family):
    """With a left-padded attention mask, the captured first-layer inputs (OPT's mask and position ids, BLOOM's ALiBi
    tensor and mask, GLM's rotary tables and mask) carried through every layer by `run_layer` give each layer's output
    of the model's own forward."""
    model = BUILD[family]()
    spec = get_architecture(model.config.model_type)
    ids = input_ids(batch=4, length=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :6] = 0
    outputs = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for layer in decoder_layers(model, spec)
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        unpadded = [o.clone() for o in outputs]
        outputs.clear()
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    assert not torch.allclose(unpadded[-1][3], outputs[-1][3], atol=1e-3)  # the mask matters
    inputs = capture_layer_inputs(model, spec, ids, attention_mask=mask)
    for i, layer in enumerate(decoder_layers(model, spec)):
        inputs.hidden = run_layer(layer, inputs)
        torch.testing.assert_close(inputs.hidden[0], unpadded[i], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", [pytest.param("opt", marks=pytest.mark.slow), "bloom"])
def test_checkpoints_saved_from_the_base_model(tmp_path, family):
    """Hub copies of BLOOM and OPT store the base model's names (`h.0.…`, `decoder.…`, no `transformer.`/`model.`
    prefix); they stream like `save_pretrained`'s, and the output uses the causal LM's names."""
    model = BUILD[family]()
    model.base_model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    prefix = f"{model.base_model_prefix}."
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert not any(name.startswith(prefix) for name in index["weight_map"])
    config = _config("wanda_sp")
    report = prune_streaming(tmp_path / "base", config, DATA, tmp_path / "out")
    original = _load(tmp_path / "base")  # from_pretrained adds the prefix (and ties the head) the same way
    assert report["plan"].kept == sequential_plan(original, config, _batches(config)).kept
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert all(name.startswith(prefix) for name in written)
    ids = input_ids()
    torch.testing.assert_close(
        logits(_load(tmp_path / "out"), ids), logits(report["plan"].apply(original), ids), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("family", MIXED_LAYER_TYPES)
def test_sliding_and_global_layers_are_refit_as_in_memory(checkpoints, tmp_path, family):
    """Streaming with reconstruction replays each layer with its own kind's mask and position embeddings, as the
    in-memory refit does: the same units and the same weights."""
    config = _config("wanda_sp", global_ranking=True, reconstruction=True)
    pruner = AutoPruner.from_model(_load(checkpoints[family]), config)
    pruner.prune(calibration_data=DATA)
    report = prune_streaming(checkpoints[family], config, DATA, tmp_path / "out")
    assert report["plan"].kept == pruner.plan.kept and report["plan"].reconstruction
    streamed = _load(tmp_path / "out").state_dict()
    for name, tensor in pruner.model.state_dict().items():
        torch.testing.assert_close(streamed[name], tensor, atol=1e-5, rtol=1e-5, msg=name)


def test_mismatched_tensor_names_are_refused(tmp_path):
    tiny_bloom().save_pretrained(tmp_path / "bloom")
    tensors = load_file(tmp_path / "bloom" / "model.safetensors")
    tensors["transformer.final_norm.weight"] = tensors.pop("transformer.ln_f.weight")
    save_file(tensors, tmp_path / "bloom" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor names do not match BloomForCausalLM.*final_norm.*ln_f\.weight"):
        prune_streaming(tmp_path / "bloom", _config("magnitude"), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a fresh interpreter; the in-memory path's reloads are in test_families
def test_pruned_types_reload_without_the_package(checkpoints, tmp_path):
    """The streamed `pruned_opt` / `pruned_bloom` checkpoints carry their modeling file and load with
    `trust_remote_code=True` where optimum-prune is not installed."""
    config = _config("wanda_sp")
    outs, references = [], []
    for family in ("opt", "bloom"):
        report = prune_streaming(checkpoints[family], config, DATA, tmp_path / family)
        outs.append(tmp_path / family)
        references.append(logits(report["plan"].apply(_load(checkpoints[family])), input_ids()))
    results = fresh_process_logits(outs, input_ids(), trust_remote_code=True, import_package=False)
    assert [name for _, name in results] == ["PrunedOPTForCausalLM", "PrunedBloomForCausalLM"]
    for (got, _), want in zip(results, references):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_chatglm_is_refused_until_converted(tmp_path):
    """A ChatGLM remote-code checkpoint is refused (before any remote code could run) with the way to convert it; the
    converted `glm` checkpoint streams to what the in-memory pruner makes of the ChatGLM one."""
    from test_chatglm import glm_to_chatglm, write_chatglm

    chatglm = write_chatglm(tmp_path / "chatglm", *glm_to_chatglm(tiny_glm()), shards=2)
    config = _config("magnitude")
    with pytest.raises(ValueError, match="convert_chatglm_checkpoint"):
        prune_streaming(chatglm, config, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    converted = convert_chatglm_checkpoint(chatglm, tmp_path / "glm")
    report = prune_streaming(converted, config, None, tmp_path / "out")
    pruner = AutoPruner.from_pretrained(chatglm, config, dtype=torch.float32)
    pruned = pruner.prune()
    assert report["plan"].kept == pruner.plan.kept
    torch.testing.assert_close(
        logits(_load(tmp_path / "out"), input_ids()), logits(pruned, input_ids()), atol=0, rtol=0
    )
    assert not (chatglm / "REMOTE_CODE_RAN").exists()


def test_no_tokenizer_is_invented_for_a_checkpoint_without_one(checkpoints, tmp_path):
    """A folder without tokenizer files gets no tokenizer in the output (Transformers 5 would build an empty default
    one for OPT), and token-id calibration still works."""
    assert not any(f.startswith(("tokenizer", "vocab")) for f in os.listdir(checkpoints["opt"]))
    prune_streaming(checkpoints["opt"], _config("wanda_sp"), DATA, tmp_path / "out")
    written = os.listdir(tmp_path / "out")
    assert "config.json" in written
    assert not [f for f in written if f.startswith(("tokenizer", "vocab", "merges", "special_tokens"))]


@pytest.mark.parametrize(
    ("family", "kwargs"),
    [
        ("opt", {"importance": "wanda_sp", "global_ranking": True}),
        ("bloom", {"importance": "flap", "allocation": "flap"}),
        ("glm", {"importance": "wanda_sp", "global_ranking": True}),
        ("qwen3", {"importance": "wanda_sp", "global_ranking": True}),
        ("phi3", {"importance": "wanda_sp", "global_ranking": True}),
        ("gemma3_text", {"importance": "magnitude", "global_ranking": True}),
        # GLM-4 with FLAP's compensation asked for: the registered type adds the o_proj / down_proj biases.
        pytest.param(
            "glm4", {"importance": "flap", "allocation": "flap", "bias_compensation": True}, marks=pytest.mark.slow
        ),
        pytest.param("opt", {"importance": "flap", "allocation": "flap"}, marks=pytest.mark.slow),
        # Units chosen by refit error (no compensation): BLOOM's ALiBi head records follow the chosen heads.
        ("bloom", {"importance": "wanda_sp", "global_ranking": True}),
    ],
)
def test_two_pass_per_layer_widths_are_the_in_memory_result(checkpoints, tmp_path, family, kwargs):
    """Per-layer widths for OPT, BLOOM and GLM (tied LM heads: the allocation must count the head once, as in
    memory)."""
    path = checkpoints[family]
    config = _config(kwargs.pop("importance"), pruning_ratio=0.3, **kwargs)
    report = prune_streaming(path, config, DATA, tmp_path / "out")
    pruner = AutoPruner.from_model(_load(path), config)
    pruner.prune(calibration_data=DATA)
    assert report["plan"].to_dict() == pruner.plan.to_dict()
    streamed = _load(tmp_path / "out")
    assert streamed.config.model_type == f"pruned_{family}"
    assert streamed.config.per_layer_overrides == pruner.model.config.per_layer_overrides != {}
    ignored = {"auto_map", "architectures", "_name_or_path", "transformers_version", "dtype"}
    got, want = streamed.config.to_dict(), pruner.model.config.to_dict()
    assert {k: v for k, v in got.items() if k not in ignored} == {k: v for k, v in want.items() if k not in ignored}
    assert report["params_after"] == pruner.params_after
    ids = input_ids()
    torch.testing.assert_close(logits(streamed, ids), logits(pruner.model, ids), atol=ATOL, rtol=0)
