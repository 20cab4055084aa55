"""The one table of model families that the engine tests share (as Transformers' `CausalLMModelTester`): for each
family its tiny builder, where its layout keeps what a reference zeroes, the structures it supports, the engines that
run each structure, and the reference itself, built from an untouched copy with no pruning code: removed units zeroed
on their consumer side, removed hidden channels zeroed in every residual write (LayerNorms restricted to the kept
channels), removed layers skipped.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from testing_utils import (
    skip_layers,
    tiny_bloom,
    tiny_gemma,
    tiny_glm,
    tiny_llama,
    tiny_mistral,
    tiny_opt,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
)
from torch import nn

from optimum_prune.architectures import get_architecture
from optimum_prune.architectures.base import streaming_model_types
from optimum_prune.streaming import STREAMING_STRUCTURES


MEMORY, DISPATCHED, STREAMING = "memory", "dispatched", "streaming"


@dataclass(frozen=True)
class Layout:
    """Where a family keeps what the references zero (module paths as `get_submodule` takes them).

    `heads_field` is the config field counting the `attention_heads` units (a KV group with its query heads, or one
    head where every head has its own keys and values).
    """

    layers: str
    attention_out: str  # in a decoder layer: the Linear that reads the attention heads
    mlp_out: str  # in a decoder layer: the Linear that reads the MLP channels
    embeddings: tuple[str, ...]  # whose weight columns are the hidden channels entering the residual stream
    heads_field: str
    layer_norm: bool  # LayerNorm (its statistics need restricting) rather than RMSNorm (scale-free, compensated)


LLAMA_LAYOUT = Layout(
    "model.layers", "self_attn.o_proj", "mlp.down_proj", ("model.embed_tokens",), "num_key_value_heads", False
)
OPT_LAYOUT = Layout(
    "model.decoder.layers",
    "self_attn.out_proj",
    "fc2",  # fc2 columns, not fc1 rows: relu(0 * x + bias) would leak fc1's bias
    ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    "num_attention_heads",
    True,
)
BLOOM_LAYOUT = Layout(
    "transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", ("transformer.word_embeddings",), "n_head", True
)


def zero_units(layout: Layout, model, layer: int, structure: str, removed: list[int]) -> None:
    """Remove `attention_heads`, `query_heads` or `mlp_channels` units of one decoder layer with no pruning code: zero
    the input columns of the Linear that reads them (a unit's whole contribution to the layer's output)."""
    block = model.get_submodule(layout.layers)[layer]
    if structure == "mlp_channels":
        with torch.no_grad():
            block.get_submodule(layout.mlp_out).weight[:, removed] = 0
        return
    consumer = block.get_submodule(layout.attention_out)
    field = "num_attention_heads" if structure == "query_heads" else layout.heads_field
    width = consumer.in_features // getattr(model.config, field)  # input columns per unit
    with torch.no_grad():
        for unit in removed:
            consumer.weight[:, unit * width : (unit + 1) * width] = 0


def zero_hidden_channels(layout: Layout, model, channels: list[int]) -> list:
    """Turn `model` into the computation with hidden `channels` removed: zero in the embeddings and in every write to
    the residual stream (RMSNorm is scale-free on the kept channels, and the pruner compensates its statistics), and
    for LayerNorm families norms whose statistics cover the kept channels only. Returns hook handles to keep alive."""
    with torch.no_grad():
        for path in layout.embeddings:
            model.get_submodule(path).weight[:, channels] = 0
        for block in model.get_submodule(layout.layers):
            for linear in (block.get_submodule(layout.attention_out), block.get_submodule(layout.mlp_out)):
                linear.weight[channels] = 0
                if linear.bias is not None:
                    linear.bias[channels] = 0
        head = model.get_output_embeddings()
        if head is not None:
            head.weight[:, channels] = 0  # the tied head is the embedding, already zeroed
    if not layout.layer_norm:
        return []
    kept = sorted(set(range(model.config.hidden_size)) - set(channels))
    return [m.register_forward_hook(_masked_layer_norm(kept)) for m in model.modules() if isinstance(m, nn.LayerNorm)]


def _masked_layer_norm(kept: list[int]):
    """A forward hook making a LayerNorm compute mean and variance over the `kept` channels only and output zero on
    the others: what a LayerNorm over the kept channels computes, embedded back in the full width."""

    def hook(module, args, output):
        x = args[0][..., kept]
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + module.eps)
        if module.weight is not None:
            y = y * module.weight[kept]
        if module.bias is not None:
            y = y + module.bias[kept]
        out = torch.zeros_like(output)
        out[..., kept] = y
        return out

    return hook


def zeroed_reference(layout: Layout, model, plan):
    """A copy of the untouched `model` that computes what `model` pruned by `plan` computes, with no pruning code.
    Returns `(reference, hook handles)`."""
    reference = copy.deepcopy(model)
    handles = []
    for key, kept in plan.kept.items():
        structure, _, layer = key.partition(".")
        removed = sorted(set(range(plan.unit_counts[key])) - set(kept))
        if structure == "hidden_channels":
            handles += zero_hidden_channels(layout, reference, removed)
        else:
            zero_units(layout, reference, int(layer), structure, removed)
    handles += skip_layers(reference, plan.removed_layers, layout.layers)
    return reference, handles


def layer_ratio(model, layout: Layout) -> float:
    """The pruning ratio that is one decoder layer's share of the parameters (removes exactly one layer)."""
    per_layer = sum(p.numel() for p in model.get_submodule(layout.layers)[0].parameters())
    return round(per_layer / sum(p.numel() for p in model.parameters()), 3)


def cpu_and_disk_map(model, layout: Layout) -> dict:
    """A `device_map` with the even decoder layers on disk and everything else (odd layers, embeddings, norms, the
    head) on the CPU: a dispatched model that is partly offloaded."""
    device_map = {}
    parts = layout.layers.split(".")
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth])
        for name, _ in model.get_submodule(parent).named_children():
            if name != part:
                device_map[f"{parent}.{name}" if parent else name] = "cpu"
    for i in range(len(model.get_submodule(layout.layers))):
        device_map[f"{layout.layers}.{i}"] = "disk" if i % 2 == 0 else "cpu"
    return device_map


@dataclass(frozen=True)
class FamilyCase:
    """One family's row: `build(**overrides)` makes its tiny float32 model (the same weights every call), `ratios`
    the pruning ratio per width structure that removes units of every layer of it."""

    model_type: str
    build: Callable[..., nn.Module]
    layout: Layout
    ratios: dict

    def zero_units(self, model, layer: int, structure: str, removed: list[int]) -> None:
        """`zero_units` of this family's layout (the `zero_units` argument of `sequential_reference`)."""
        zero_units(self.layout, model, layer, structure, removed)

    def zeroed_reference(self, model, plan):
        return zeroed_reference(self.layout, model, plan)

    @property
    def structures(self) -> tuple[str, ...]:
        """What the family's spec says it can prune."""
        return get_architecture(self.model_type).supported_structures

    def engines(self, structure: str) -> tuple[str, ...]:
        """The engines that prune `structure` of this family: all load a model, streaming only the per-layer
        structures of the families it has been checked on."""
        streams = self.model_type in streaming_model_types() and structure in STREAMING_STRUCTURES
        return (MEMORY, DISPATCHED, STREAMING) if streams else (MEMORY, DISPATCHED)

    def layer_ratio(self, model) -> float:
        return layer_ratio(model, self.layout)


# 8 query heads in 4 KV groups: `attention_heads` removes a group (1 of 4), `query_heads` one head of each group.
_LLAMA_RATIOS = {"attention_heads": 0.19, "query_heads": 0.13, "mlp_channels": 0.3, "hidden_channels": 0.2}
# head_dim 6: `attention_heads` removes 2 of 4 KV groups, `query_heads` one head of each group.
_PHI3_RATIOS = {"attention_heads": 0.16, "query_heads": 0.16, "mlp_channels": 0.3, "hidden_channels": 0.2}
_GEMMA_RATIOS = {"attention_heads": 0.2, "query_heads": 0.14, "mlp_channels": 0.3, "hidden_channels": 0.2}
_GLM_RATIOS = {"attention_heads": 0.1, "query_heads": 0.1, "mlp_channels": 0.2, "hidden_channels": 0.2}

FAMILIES = {
    "llama": FamilyCase("llama", lambda **kw: tiny_llama(bias=True, **kw), LLAMA_LAYOUT, _LLAMA_RATIOS),
    "mistral": FamilyCase("mistral", tiny_mistral, LLAMA_LAYOUT, _LLAMA_RATIOS),
    "qwen2": FamilyCase("qwen2", tiny_qwen2, LLAMA_LAYOUT, _LLAMA_RATIOS),
    "qwen3": FamilyCase("qwen3", tiny_qwen3, LLAMA_LAYOUT, _LLAMA_RATIOS),
    "phi3": FamilyCase("phi3", tiny_phi3, LLAMA_LAYOUT, _PHI3_RATIOS),
    "gemma2": FamilyCase("gemma2", tiny_gemma, LLAMA_LAYOUT, _GEMMA_RATIOS),
    "gemma3_text": FamilyCase("gemma3_text", lambda **kw: tiny_gemma(gemma3=True, **kw), LLAMA_LAYOUT, _GEMMA_RATIOS),
    "glm": FamilyCase("glm", tiny_glm, LLAMA_LAYOUT, _GLM_RATIOS),
    "glm4": FamilyCase("glm4", lambda **kw: tiny_glm(glm4=True, **kw), LLAMA_LAYOUT, _GLM_RATIOS),
    "opt": FamilyCase(
        "opt", tiny_opt, OPT_LAYOUT, {"attention_heads": 0.08, "mlp_channels": 0.2, "hidden_channels": 0.2}
    ),
    "bloom": FamilyCase(
        "bloom", tiny_bloom, BLOOM_LAYOUT, {"attention_heads": 0.06, "mlp_channels": 0.2, "hidden_channels": 0.2}
    ),
}
# Registered types the table reaches through another row: ChatGLM checkpoints are converted to `glm` when loaded.
CONVERTED = {"chatglm": "glm"}

CASES = [
    (family, structure, engine)
    for family, case in FAMILIES.items()
    for structure in case.structures
    for engine in case.engines(structure)
]
