"""LLaMA and the GQA models with the same layout (Mistral, Qwen2).

Two attention structures, one chosen per run:

- `attention_heads`: units are KV groups, a key/value head with the query heads that read it, so
  `num_attention_heads` stays a multiple of `num_key_value_heads` (for multi-head models a group is one head).
- `query_heads` (grouped-query models only): units are single query heads, *tied* in KV groups (`tied_groups`):
  every group keeps the same number of its query heads, k/v stay whole, and only q_proj rows (and q bias) and o_proj
  columns are sliced. A GQA model with few KV heads (GLM's 2) loses half its attention per KV group removed; losing
  query heads inside every group is a finer step. `num_attention_heads = num_key_value_heads * kept_per_group`, and
  `num_key_value_groups` of every attention module follows (`layer_module_attrs`).

Qwen2's q/k/v biases and LLaMA's optional `attention_bias`/`mlp_bias` are optional members, so Mistral and Qwen2 are
LLaMA's spec under their own `model_types`.
"""

import dataclasses

from .base import (
    ATTENTION_HEADS,
    MLP_CHANNELS,
    QUERY_HEADS,
    ArchitectureSpec,
    Member,
    NormSpec,
    StructureSpec,
    Width,
    register_family,
)


# Shared with GLM, whose q/k/v/o layout is the same (GQA units, optional q/k/v biases).
LLAMA_ATTENTION = StructureSpec(
    members=(
        Member("self_attn.q_proj.weight", 0),
        Member("self_attn.q_proj.bias", 0),
        Member("self_attn.k_proj.weight", 0),
        Member("self_attn.k_proj.bias", 0),
        Member("self_attn.v_proj.weight", 0),
        Member("self_attn.v_proj.bias", 0),
        Member("self_attn.o_proj.weight", 1, consumer=True),
    ),
    units=Width("num_key_value_heads", "self_attn.k_proj.weight", 0, divisor="head_dim"),
    widths=(
        Width("num_attention_heads", "self_attn.q_proj.weight", 0, divisor="head_dim"),
        Width("num_key_value_heads", "self_attn.k_proj.weight", 0, divisor="head_dim"),
    ),
)

# Query heads within KV groups: q_proj rows (and bias) and o_proj columns, one head_dim block per query head; the
# `num_key_value_heads` groups of consecutive query heads (as `repeat_kv` maps them) keep equal counts. Shared with GLM.
LLAMA_QUERY_HEADS = StructureSpec(
    members=(
        Member("self_attn.q_proj.weight", 0),
        Member("self_attn.q_proj.bias", 0),
        Member("self_attn.o_proj.weight", 1, consumer=True),
    ),
    units=Width("num_attention_heads", "self_attn.q_proj.weight", 0, divisor="head_dim"),
    widths=(Width("num_attention_heads", "self_attn.q_proj.weight", 0, divisor="head_dim"),),
    tied_groups=Width("num_key_value_heads", "self_attn.k_proj.weight", 0, divisor="head_dim"),
)

# `LlamaAttention` (and GLM's) computes `num_key_value_groups` once, in `__init__`; query-head pruning changes it.
LLAMA_LAYER_MODULE_ATTRS = {"self_attn.num_key_value_groups": ("num_attention_heads", "num_key_value_heads")}

_MLP = StructureSpec(
    members=(
        Member("mlp.gate_proj.weight", 0),
        Member("mlp.gate_proj.bias", 0),
        Member("mlp.up_proj.weight", 0),
        Member("mlp.up_proj.bias", 0),
        Member("mlp.down_proj.weight", 1, consumer=True),
    ),
    units=Width("intermediate_size", "mlp.down_proj.weight", 1),
    widths=(Width("intermediate_size", "mlp.down_proj.weight", 1),),
)

# The model-level members of hidden-channel pruning; GLM names them the same way.
LLAMA_HIDDEN = StructureSpec(
    members=(
        Member("model.embed_tokens.weight", 1),
        Member("model.norm.weight", 0),
        Member("lm_head.weight", 1),
    ),
    units=Width("hidden_size", "model.embed_tokens.weight", 1),
    widths=(Width("hidden_size", "model.embed_tokens.weight", 1),),
)

_HIDDEN_LAYER_MEMBERS = (
    Member("input_layernorm.weight", 0),
    Member("self_attn.q_proj.weight", 1),
    Member("self_attn.k_proj.weight", 1),
    Member("self_attn.v_proj.weight", 1),
    Member("self_attn.o_proj.weight", 0),
    Member("self_attn.o_proj.bias", 0),
    Member("post_attention_layernorm.weight", 0),
    Member("mlp.gate_proj.weight", 1),
    Member("mlp.up_proj.weight", 1),
    Member("mlp.down_proj.weight", 0),
    Member("mlp.down_proj.bias", 0),
)

LLAMA_SPEC = ArchitectureSpec(
    model_types=("llama",),
    layers="model.layers",
    structures={ATTENTION_HEADS: LLAMA_ATTENTION, QUERY_HEADS: LLAMA_QUERY_HEADS, MLP_CHANNELS: _MLP},
    hidden=LLAMA_HIDDEN,
    hidden_layer_members=_HIDDEN_LAYER_MEMBERS,
    norm=NormSpec(
        kind="rms",
        eps_field="rms_norm_eps",
        eps_attr="variance_epsilon",
        modules=("model.norm",),
        layer_modules=("input_layernorm", "post_attention_layernorm"),
    ),
    layer_index_attrs=("self_attn.layer_idx",),
    layer_module_attrs=LLAMA_LAYER_MODULE_ATTRS,
    pruned_model_type="pruned_llama",
    bias_fields={"self_attn.o_proj": "o_proj_bias", "mlp.down_proj": "down_proj_bias"},
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)

MISTRAL_SPEC = dataclasses.replace(LLAMA_SPEC, model_types=("mistral",))
QWEN2_SPEC = dataclasses.replace(LLAMA_SPEC, model_types=("qwen2",))

register_family("llama", LLAMA_SPEC, streaming=True)
register_family("mistral", MISTRAL_SPEC, streaming=True)
register_family("qwen2", QWEN2_SPEC, streaming=True)
