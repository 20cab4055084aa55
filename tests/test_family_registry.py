"""One registration per family: `register_family` makes a `model_type` prunable (in memory, and streaming when it
says so), the old registries are views of it, and variants are `dataclasses.replace` of a base spec."""

import dataclasses

import pytest
import torch
from testing_utils import input_ids, logits, tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_prune import AutoPruner, PrunerConfig, streaming
from optimum_prune.architectures import (
    ARCHITECTURE_REGISTRY,
    CHECKPOINT_CONVERTERS,
    FAMILY_REGISTRY,
    get_architecture,
    register_architecture,
    register_checkpoint_converter,
    register_family,
)
from optimum_prune.architectures.chatglm import load_chatglm_checkpoint
from optimum_prune.architectures.glm import GLM4_SPEC, GLM_SPEC
from optimum_prune.architectures.llama import LLAMA_SPEC
from optimum_prune.modeling import PRUNED_MODEL_CLASSES
from optimum_prune.streaming import prune_streaming


TOY = "toy_llama"


class ToyConfig(LlamaConfig):
    """A family Transformers knows and optimum-prune does not: LLaMA's modules under another `model_type`."""

    model_type = TOY


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig


AutoConfig.register(TOY, ToyConfig, exist_ok=True)
AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)


def _toy_model() -> ToyForCausalLM:
    """`tiny_llama()`'s weights in the toy family, so its results must equal LLaMA's."""
    reference = tiny_llama()
    fields = {k: v for k, v in reference.config.to_dict().items() if k not in ("model_type", "architectures")}
    model = ToyForCausalLM(ToyConfig(**fields)).eval()
    assert model.config.model_type == TOY
    model.load_state_dict(reference.state_dict())
    return model


@pytest.fixture
def unregister_toy():
    """Leave the registry as it was, whatever a test registered under the toy type."""
    yield
    FAMILY_REGISTRY.pop(TOY, None)


def _config() -> PrunerConfig:
    return PrunerConfig(pruning_ratio=0.2, importance="magnitude")


def _differing_fields(a, b) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_registered_family_prunes_like_the_spec_it_reuses(unregister_toy):
    with pytest.raises(ValueError, match=f"no architecture spec for model_type '{TOY}'"):
        AutoPruner.from_model(_toy_model(), _config())
    register_family(TOY, dataclasses.replace(LLAMA_SPEC, model_types=(TOY,)))
    toy = AutoPruner.from_model(_toy_model(), _config())
    llama = AutoPruner.from_model(tiny_llama(), _config())
    pruned_toy, pruned_llama = toy.prune(), llama.prune()
    assert toy.plan.kept == llama.plan.kept and toy.plan.model_type == TOY
    assert torch.equal(logits(pruned_toy, input_ids()), logits(pruned_llama, input_ids()))
    assert TOY in AutoPruner.supported_model_types()
    with pytest.raises(ValueError, match=rf"Supported: \[.*'{TOY}'"):
        get_architecture("gpt2")


def test_only_a_family_declared_streaming_streams(unregister_toy, tmp_path):
    _toy_model().save_pretrained(tmp_path / "toy", max_shard_size="20KB")
    register_family(TOY, dataclasses.replace(LLAMA_SPEC, model_types=(TOY,)))
    with pytest.raises(ValueError, match=r"supported for model types \['bloom'.*got 'toy_llama'"):
        prune_streaming(tmp_path / "toy", _config(), None, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    register_family(TOY, dataclasses.replace(LLAMA_SPEC, model_types=(TOY,)), streaming=True, exist_ok=True)
    assert TOY in streaming.STREAMING_MODEL_TYPES
    report = prune_streaming(tmp_path / "toy", _config(), None, tmp_path / "out")
    in_memory = AutoPruner.from_model(_toy_model(), _config())
    pruned = in_memory.prune()
    assert report["plan"].kept == in_memory.plan.kept
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert streamed.config.model_type == TOY
    assert torch.equal(logits(streamed, input_ids()), logits(pruned, input_ids()))


def test_duplicates_raise_and_exist_ok_replaces(unregister_toy):
    with pytest.raises(ValueError, match="Family 'llama' is already registered; pass `exist_ok=True`"):
        register_family("llama", LLAMA_SPEC)
    with pytest.raises(ValueError, match="Architecture 'mistral' is already registered"):
        register_architecture("mistral", LLAMA_SPEC)
    with pytest.raises(ValueError, match="converter for 'chatglm' is already registered"):
        register_checkpoint_converter("chatglm", load_chatglm_checkpoint)
    register_family("Toy_Llama", LLAMA_SPEC)  # keys are lowercase, as in config.json
    assert FAMILY_REGISTRY[TOY].streaming is False
    register_family(TOY, LLAMA_SPEC, streaming=True, exist_ok=True)
    assert FAMILY_REGISTRY[TOY].streaming is True


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, "needs a `spec`, a `converter` or both"),
        ({"converter": load_chatglm_checkpoint, "streaming": True}, ValueError, "streams, which needs a `spec`"),
        ({"spec": "llama"}, TypeError, "`spec` must be an ArchitectureSpec, got str"),
        ({"converter": "load"}, TypeError, "`converter` must be callable, got str"),
    ],
)
def test_incomplete_family_is_refused(unregister_toy, kwargs, error, message):
    with pytest.raises(error, match=message):
        register_family(TOY, **kwargs)
    assert TOY not in FAMILY_REGISTRY


def test_old_registries_are_views_of_the_families(monkeypatch, unregister_toy):
    assert CHECKPOINT_CONVERTERS["chatglm"] is load_chatglm_checkpoint and "chatglm" not in ARCHITECTURE_REGISTRY
    assert FAMILY_REGISTRY["chatglm"].spec is None and not FAMILY_REGISTRY["chatglm"].streaming
    # Editing a view edits the family and keeps its other fields (the tests' `monkeypatch.setitem` relies on it).
    without_pruned_type = dataclasses.replace(GLM_SPEC, pruned_model_type=None)
    with monkeypatch.context() as patch:
        patch.setitem(ARCHITECTURE_REGISTRY, "glm", without_pruned_type)
        assert FAMILY_REGISTRY["glm"].spec is without_pruned_type and FAMILY_REGISTRY["glm"].streaming
    assert get_architecture("glm") is GLM_SPEC
    register_architecture(TOY, LLAMA_SPEC)  # AutoPruner.register's path: in memory only
    assert FAMILY_REGISTRY[TOY].spec is LLAMA_SPEC and not FAMILY_REGISTRY[TOY].streaming
    del ARCHITECTURE_REGISTRY[TOY]
    assert TOY not in FAMILY_REGISTRY


def test_variants_are_their_base_spec_with_declared_differences():
    assert _differing_fields(GLM4_SPEC, GLM_SPEC) == {"model_types", "norm", "pruned_model_type", "residual_adds"}
    assert GLM4_SPEC.residual_adds is None  # its post-sublayer norms: refit to the layer-local target
    assert _differing_fields(GLM4_SPEC.norm, GLM_SPEC.norm) == {"layer_modules"}
    assert set(GLM4_SPEC.norm.layer_modules) - set(GLM_SPEC.norm.layer_modules) == {
        "post_self_attn_layernorm",
        "post_mlp_layernorm",
    }
    assert GLM4_SPEC.pruned_model_type == "pruned_glm4"
    for variant in ("mistral", "qwen2"):
        assert _differing_fields(get_architecture(variant), LLAMA_SPEC) == {"model_types"}
    # Qwen3: the same tensors; its per-head q_norm/k_norm share `rms_norm_eps`, so hidden channels rescale the stream.
    qwen3 = get_architecture("qwen3")
    assert _differing_fields(qwen3, LLAMA_SPEC) == {"model_types", "norm", "pruned_model_type"}
    assert qwen3.norm.compensation == "residual" and qwen3.norm.eps_field is None
    # Gemma 3's text model: Gemma 2's tensors (its q_norm/k_norm are per head, untouched), its own pruned type.
    gemma2, gemma3 = get_architecture("gemma2"), get_architecture("gemma3_text")
    assert _differing_fields(gemma3, gemma2) == {"model_types", "pruned_model_type"}
    assert gemma2.norm.weight_offset == 1.0 and gemma2.norm.scaled_embeddings == ("model.embed_tokens",)


def test_every_family_is_registered_once_and_consistently():
    stock_streaming = {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "phi3",
        "gemma2",
        "gemma3_text",
        "opt",
        "bloom",
        "glm",
        "glm4",
    }
    assert stock_streaming <= set(streaming.STREAMING_MODEL_TYPES) <= set(ARCHITECTURE_REGISTRY)
    for model_type, family in FAMILY_REGISTRY.items():
        assert family.model_type == model_type
        if family.spec is not None:
            assert family.spec.model_types == (model_type,)
            assert family.pruned_model_type is None or family.pruned_model_type in PRUNED_MODEL_CLASSES
