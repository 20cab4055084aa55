"""GLM and GLM-4 in Transformers (`glm`, `glm4`): LLaMA's layout with a fused MLP input and partial rotary.

- Attention units are KV groups (GQA) as for LLaMA, or query heads tied in KV groups (`query_heads`, LLaMA's spec:
  the q/o layout is the same, and a query head is whole heads of partial rotary too); q/k/v carry biases (`attention_bias=True` by default), o_proj
  none. Rotary covers only the first `partial_rotary_factor` of every head, so a head is never cut inside: units are
  whole heads and `head_dim` is written explicitly (the config default is 128, not `hidden_size // heads`).
- `mlp.gate_up_proj` holds the gate rows, then the up rows (`gate, up = chunk(2)`): one member with `chunks=2`, so a
  channel keeps its gate row and its up row together.
- `GlmConfig` does not check `num_attention_heads * head_dim` against `hidden_size`, so uniform head pruning keeps the
  stock model type and no registered pruned type is needed.
- GLM-4 adds `post_self_attn_layernorm` and `post_mlp_layernorm` on the residual branch outputs. They are RMSNorms over
  the hidden dimension, so hidden-channel pruning slices and compensates them like the other norms.
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
from .llama import LLAMA_ATTENTION, LLAMA_HIDDEN, LLAMA_LAYER_MODULE_ATTRS, LLAMA_QUERY_HEADS


_MLP = StructureSpec(
    members=(
        Member("mlp.gate_up_proj.weight", 0, chunks=2),
        Member("mlp.down_proj.weight", 1, consumer=True),
    ),
    units=Width("intermediate_size", "mlp.down_proj.weight", 1),
    widths=(Width("intermediate_size", "mlp.down_proj.weight", 1),),
)

_HIDDEN_LAYER_MEMBERS = (
    Member("input_layernorm.weight", 0),
    Member("self_attn.q_proj.weight", 1),
    Member("self_attn.k_proj.weight", 1),
    Member("self_attn.v_proj.weight", 1),
    Member("self_attn.o_proj.weight", 0),
    Member("post_self_attn_layernorm.weight", 0),  # GLM-4 only
    Member("post_attention_layernorm.weight", 0),
    Member("mlp.gate_up_proj.weight", 1),
    Member("mlp.down_proj.weight", 0),
    Member("post_mlp_layernorm.weight", 0),  # GLM-4 only
)

_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
# FLAP's bias compensation: the registered types build these output biases (GLM has none on o_proj / down_proj).
# Off unless asked for (`bias_compensation=True`): on tiny-glm it raised perplexity at every ratio (flap, uniform:
# x2.50 vs x2.03 at 20%; adaptive: x3.33 vs x2.48 at 40%), though it is exact for constant channels.
GLM_BIAS_FIELDS = {"self_attn.o_proj": "o_proj_bias", "mlp.down_proj": "down_proj_bias"}

GLM_SPEC = ArchitectureSpec(
    model_types=("glm",),
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
    lora_target_modules=_LORA_TARGETS,
    pruned_model_type="pruned_glm",  # per-layer widths and compensation biases; stock for every other shape
    bias_fields=GLM_BIAS_FIELDS,
    bias_compensation_default=False,
)

# GLM-4 differs in its two extra per-layer norms (compensated like the others) and in its registered pruned type.
GLM4_SPEC = dataclasses.replace(
    GLM_SPEC,
    model_types=("glm4",),
    norm=dataclasses.replace(
        GLM_SPEC.norm,
        layer_modules=(
            "input_layernorm",
            "post_self_attn_layernorm",
            "post_attention_layernorm",
            "post_mlp_layernorm",
        ),
    ),
    pruned_model_type="pruned_glm4",
    residual_adds=None,  # post_self_attn_layernorm / post_mlp_layernorm norm each sublayer's output
)

register_family("glm", GLM_SPEC, streaming=True)
register_family("glm4", GLM4_SPEC, streaming=True)
