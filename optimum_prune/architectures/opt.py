"""OPT (`opt`): biases everywhere, LayerNorm, learned positions, optional pre/post-LN and embedding projections.

- Attention units are single heads (no GQA). q/k/v/out_proj carry biases; out_proj's bias is added after the heads
  are summed, so removing a head never touches it.
- `OPTConfig` has no `head_dim`: `OPTAttention` derives it as `hidden_size // num_attention_heads` and makes q/k/v
  `hidden_size` wide. Removing heads (or hidden channels) therefore needs the registered `pruned_opt` type, which
  stores `head_dim` and builds attention `num_attention_heads * head_dim` wide; `ffn_dim` pruning stays stock.
- Hidden channels run through token embeddings, learned positions (`embed_positions` is `[max_positions + 2,
  hidden]`, the offset of 2 is in the rows, not the sliced columns), every LayerNorm weight and bias, the residual
  writes (out_proj and fc2 rows and biases) and the tied `lm_head`. LayerNorm is not scale-free like RMSNorm, so no
  compensation exists: the pruned model computes each LayerNorm's statistics over the kept channels (`NormSpec(kind=
  "layer")`). Models with `project_in`/`project_out` (`word_embed_proj_dim != hidden_size`, e.g. opt-350m) refuse
  hidden-channel pruning; heads, FFN channels and layers work for them.
- `do_layer_norm_before=False` (post-LN, no final norm) needs nothing special: absent members are skipped.
"""

from .base import (
    ATTENTION_HEADS,
    HIDDEN_CHANNELS,
    MLP_CHANNELS,
    ArchitectureSpec,
    Member,
    NormSpec,
    StructureSpec,
    Width,
    register_family,
)


_ATTENTION = StructureSpec(
    members=(
        Member("self_attn.q_proj.weight", 0),
        Member("self_attn.q_proj.bias", 0),
        Member("self_attn.k_proj.weight", 0),
        Member("self_attn.k_proj.bias", 0),
        Member("self_attn.v_proj.weight", 0),
        Member("self_attn.v_proj.bias", 0),
        Member("self_attn.out_proj.weight", 1, consumer=True),
    ),
    units=Width("num_attention_heads", "self_attn.q_proj.weight", 0, divisor="head_dim"),
    widths=(Width("num_attention_heads", "self_attn.q_proj.weight", 0, divisor="head_dim"),),
)

_MLP = StructureSpec(
    members=(
        Member("fc1.weight", 0),
        Member("fc1.bias", 0),
        Member("fc2.weight", 1, consumer=True),
    ),
    units=Width("ffn_dim", "fc2.weight", 1),
    widths=(Width("ffn_dim", "fc2.weight", 1),),
)

_HIDDEN = StructureSpec(
    members=(
        Member("model.decoder.embed_tokens.weight", 1),
        Member("model.decoder.embed_positions.weight", 1),
        Member("model.decoder.final_layer_norm.weight", 0),
        Member("model.decoder.final_layer_norm.bias", 0),
        Member("lm_head.weight", 1),
    ),
    units=Width("hidden_size", "model.decoder.embed_positions.weight", 1),
    widths=(
        Width("hidden_size", "model.decoder.embed_positions.weight", 1),
        Width("word_embed_proj_dim", "model.decoder.embed_tokens.weight", 1),
    ),
)

_HIDDEN_LAYER_MEMBERS = (
    Member("self_attn_layer_norm.weight", 0),
    Member("self_attn_layer_norm.bias", 0),
    Member("self_attn.q_proj.weight", 1),
    Member("self_attn.k_proj.weight", 1),
    Member("self_attn.v_proj.weight", 1),
    Member("self_attn.out_proj.weight", 0),
    Member("self_attn.out_proj.bias", 0),
    Member("final_layer_norm.weight", 0),
    Member("final_layer_norm.bias", 0),
    Member("fc1.weight", 1),
    Member("fc2.weight", 0),
    Member("fc2.bias", 0),
)

OPT_SPEC = ArchitectureSpec(
    model_types=("opt",),
    layers="model.decoder.layers",
    structures={ATTENTION_HEADS: _ATTENTION, MLP_CHANNELS: _MLP},
    hidden=_HIDDEN,
    hidden_layer_members=_HIDDEN_LAYER_MEMBERS,
    norm=NormSpec(
        kind="layer",
        modules=("model.decoder.final_layer_norm",),
        layer_modules=("self_attn_layer_norm", "final_layer_norm"),
    ),
    layer_index_attrs=("self_attn.layer_idx",),
    pruned_model_type="pruned_opt",
    lora_target_modules=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    module_attrs=(
        ("self_attn.num_heads", "num_attention_heads"),
        ("self_attn.head_dim", "head_dim"),
        ("self_attn.embed_dim", "hidden_size"),
        ("embed_dim", "hidden_size"),
    ),
    derived_fields={"head_dim": ("hidden_size", "num_attention_heads")},
    structure_requirements={HIDDEN_CHANNELS: (("word_embed_proj_dim", "hidden_size"),)},
    residual_adds=(("do_layer_norm_before", True),),  # post-LN OPT (350m) norms each sum
)

register_family("opt", OPT_SPEC, streaming=True)
