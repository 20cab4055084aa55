"""Gemma 2 and Gemma 3's text model (`gemma2`, `gemma3_text`): LLaMA's attention and gated MLP with

- RMSNorms that scale by `(1 + weight)` (`NormSpec.weight_offset`), before and after each branch: `input_layernorm`
  and `pre_feedforward_layernorm` read the residual stream, `post_attention_layernorm` and
  `post_feedforward_layernorm` normalise a branch's output before it is added;
- embeddings multiplied by `sqrt(hidden_size)` (`embed_scale`, from the config);
- Gemma 3: per-head `q_norm`/`k_norm` over `head_dim`, which share `rms_norm_eps` with the others.

Hidden-channel pruning scales the residual stream by c = sqrt(H' / H) (`NormSpec(compensation="residual")`): the
embedding factor becomes sqrt(H') = c * sqrt(H) by itself, so the embeddings (and the tied `lm_head`) keep their
weights and only their `embed_scale` follows the new width (`scaled_embeddings`); `o_proj` and `down_proj` get the
factor c, so each post-norm sees its input's original mean square over the kept channels and writes c times its
original output; the reading norms divide c out of `1 + weight`. Epsilon, `query_pre_attn_scalar` (the attention
scale, explicit in the config) and both soft-cappings keep their values; head pruning changes none of them either.
"""

import dataclasses

from .base import ATTENTION_HEADS, MLP_CHANNELS, QUERY_HEADS, ArchitectureSpec, Member, NormSpec, register_family
from .llama import LLAMA_ATTENTION, LLAMA_HIDDEN, LLAMA_LAYER_MODULE_ATTRS, LLAMA_QUERY_HEADS, LLAMA_SPEC


_HIDDEN_LAYER_MEMBERS = (
    Member("input_layernorm.weight", 0),
    Member("self_attn.q_proj.weight", 1),
    Member("self_attn.k_proj.weight", 1),
    Member("self_attn.v_proj.weight", 1),
    Member("self_attn.o_proj.weight", 0),
    Member("self_attn.o_proj.bias", 0),
    Member("post_attention_layernorm.weight", 0),
    Member("pre_feedforward_layernorm.weight", 0),
    Member("mlp.gate_proj.weight", 1),
    Member("mlp.up_proj.weight", 1),
    Member("mlp.down_proj.weight", 0),
    Member("post_feedforward_layernorm.weight", 0),
)

GEMMA2_SPEC = ArchitectureSpec(
    model_types=("gemma2",),
    layers="model.layers",
    structures={
        ATTENTION_HEADS: LLAMA_ATTENTION,
        QUERY_HEADS: LLAMA_QUERY_HEADS,
        MLP_CHANNELS: LLAMA_SPEC.structures[MLP_CHANNELS],
    },
    hidden=LLAMA_HIDDEN,
    hidden_layer_members=_HIDDEN_LAYER_MEMBERS,
    norm=NormSpec(
        kind="rms",
        eps_attr="eps",
        modules=("model.norm",),
        layer_modules=("input_layernorm", "pre_feedforward_layernorm"),
        compensation="residual",
        scaled_embeddings=("model.embed_tokens",),
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        weight_offset=1.0,
    ),
    layer_index_attrs=("self_attn.layer_idx",),
    layer_module_attrs=LLAMA_LAYER_MODULE_ATTRS,
    pruned_model_type="pruned_gemma2",
    bias_fields={"self_attn.o_proj": "o_proj_bias", "mlp.down_proj": "down_proj_bias"},
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    residual_adds=None,  # post_attention_layernorm / post_feedforward_layernorm norm each sublayer's output
)

GEMMA3_TEXT_SPEC = dataclasses.replace(
    GEMMA2_SPEC, model_types=("gemma3_text",), pruned_model_type="pruned_gemma3_text"
)

register_family("gemma2", GEMMA2_SPEC, streaming=True)
register_family("gemma3_text", GEMMA3_TEXT_SPEC, streaming=True)
