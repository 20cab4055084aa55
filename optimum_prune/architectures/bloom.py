"""BLOOM (`bloom`): fused per-head `query_key_value`, ALiBi, LayerNorm with biases everywhere.

- `query_key_value` rows are laid out per head as `[n_head, 3, head_dim]` (q, k, v of head 0, then of head 1, ...),
  so a head owns one contiguous block of `3 * head_dim` rows (and bias entries): one plain member, no chunks.
- `BloomConfig` derives `head_dim = hidden_size // n_head` and hard-codes the MLP to `4 * hidden_size`, so head,
  MLP and hidden-channel pruning all need the registered `pruned_bloom` type (which stores `head_dim` and
  `intermediate_size`); layer removal stays stock.
- ALiBi slopes are a function of the head count and the head's index. Recomputing them for the pruned count would
  give every kept head a slope it was never trained with (LLM-Pruner's BLOOM code does this), so surgery records the
  original head count (`alibi_num_heads`) and each layer's kept original heads (`alibi_head_indices`, a
  `ConfigWriter`), and `pruned_bloom` builds the original slopes and picks each layer's heads.
- Hidden channels run through the word embeddings, `word_embeddings_layernorm`, every LayerNorm weight and bias, the
  residual writes (dense and dense_4h_to_h rows and biases) and the tied `lm_head`; LayerNorm statistics are then over
  the kept channels (`NormSpec(kind="layer")`, no compensation).
"""

from .base import (
    ATTENTION_HEADS,
    MLP_CHANNELS,
    ArchitectureSpec,
    ConfigWriter,
    Member,
    NormSpec,
    StructureSpec,
    Width,
    register_family,
)


_ATTENTION = StructureSpec(
    members=(
        Member("self_attention.query_key_value.weight", 0),  # [n_head * 3 * head_dim, hidden], per-head blocks
        Member("self_attention.query_key_value.bias", 0),
        Member("self_attention.dense.weight", 1, consumer=True),
    ),
    units=Width("n_head", "self_attention.dense.weight", 1, divisor="head_dim"),
    widths=(Width("n_head", "self_attention.dense.weight", 1, divisor="head_dim"),),
)

_MLP = StructureSpec(
    members=(
        Member("mlp.dense_h_to_4h.weight", 0),
        Member("mlp.dense_h_to_4h.bias", 0),
        Member("mlp.dense_4h_to_h.weight", 1, consumer=True),
    ),
    units=Width("intermediate_size", "mlp.dense_4h_to_h.weight", 1),
    widths=(Width("intermediate_size", "mlp.dense_4h_to_h.weight", 1),),
)

_HIDDEN = StructureSpec(
    members=(
        Member("transformer.word_embeddings.weight", 1),
        Member("transformer.word_embeddings_layernorm.weight", 0),
        Member("transformer.word_embeddings_layernorm.bias", 0),
        Member("transformer.ln_f.weight", 0),
        Member("transformer.ln_f.bias", 0),
        Member("lm_head.weight", 1),
    ),
    units=Width("hidden_size", "transformer.word_embeddings.weight", 1),
    widths=(Width("hidden_size", "transformer.word_embeddings.weight", 1),),
)

_HIDDEN_LAYER_MEMBERS = (
    Member("input_layernorm.weight", 0),
    Member("input_layernorm.bias", 0),
    Member("self_attention.query_key_value.weight", 1),
    Member("self_attention.dense.weight", 0),
    Member("self_attention.dense.bias", 0),
    Member("post_attention_layernorm.weight", 0),
    Member("post_attention_layernorm.bias", 0),
    Member("mlp.dense_h_to_4h.weight", 1),
    Member("mlp.dense_4h_to_h.weight", 0),
    Member("mlp.dense_4h_to_h.bias", 0),
)

BLOOM_SPEC = ArchitectureSpec(
    model_types=("bloom",),
    layers="transformer.h",
    structures={ATTENTION_HEADS: _ATTENTION, MLP_CHANNELS: _MLP},
    hidden=_HIDDEN,
    hidden_layer_members=_HIDDEN_LAYER_MEMBERS,
    norm=NormSpec(
        kind="layer",
        modules=("transformer.word_embeddings_layernorm", "transformer.ln_f"),
        layer_modules=("input_layernorm", "post_attention_layernorm"),
    ),
    num_layers_field="n_layer",
    residual_adds=(("apply_residual_connection_post_layernorm", False),),  # else the residual is the normed input
    layer_index_attrs=("self_attention.layer_idx",),
    pruned_model_type="pruned_bloom",
    lora_target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    derived_fields={"head_dim": ("hidden_size", "n_head"), "intermediate_size": ("hidden_size", 1, 4)},
    module_attrs=(
        ("self_attention.num_heads", "n_head"),
        ("self_attention.head_dim", "head_dim"),
        ("self_attention.hidden_size", "hidden_size"),
        ("self_attention.split_size", "hidden_size"),
        ("num_heads", "n_head"),
        ("/transformer.embed_dim", "hidden_size"),
    ),
    config_writers=(
        ConfigWriter(
            structure=ATTENTION_HEADS,
            field="alibi_head_indices",
            count_field="alibi_num_heads",
            units_field="n_head",
        ),
    ),
)

register_family("bloom", BLOOM_SPEC, streaming=True)
