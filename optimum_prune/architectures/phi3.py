"""Phi-3 and Phi-4 (`phi3`): LLaMA's computation with fused projections.

- `self_attn.qkv_proj` holds the query rows, then the key rows, then the value rows; under grouped-query attention
  the query part is larger (`Member(parts=)`: the query part is as wide as `o_proj`'s input, key and value share the
  rest). A KV-group unit owns its block of each part; a query head owns only its block of the query part
  (`owned_parts=(0,)`), and the key/value heads stay whole. `num_key_value_heads` is the qkv rows less the query rows,
  over 2 * head_dim (`Width(minus=)`).
- `mlp.gate_up_proj` holds the gate rows, then the up rows: `chunks=2`, as GLM's.
- `Phi3Attention` reads `config.num_attention_heads` in `forward` to split the fused output (it sees its own layer's
  widths: `layer_config_modules`), and keeps `num_key_value_heads` as an attribute, which follows the pruned tensors
  (`layer_module_attrs`).
- The config derives `head_dim` as `hidden_size // num_attention_heads`: it is written explicitly before any width
  changes (`derived_fields`).
"""

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
from .llama import LLAMA_HIDDEN


_QUERY_ROWS = ("self_attn.o_proj.weight", 1)  # the query part of qkv_proj is as wide as o_proj's input
_QKV_PARTS = (_QUERY_ROWS, None, None)
_QUERY_HEAD_COUNT = Width("num_attention_heads", "self_attn.o_proj.weight", 1, divisor="head_dim")
_KV_HEAD_COUNT = Width(
    "num_key_value_heads", "self_attn.qkv_proj.weight", 0, divisor="head_dim", factor=2, minus=_QUERY_ROWS
)

_ATTENTION = StructureSpec(
    members=(
        Member("self_attn.qkv_proj.weight", 0, parts=_QKV_PARTS),
        Member("self_attn.o_proj.weight", 1, consumer=True),
    ),
    units=_KV_HEAD_COUNT,
    widths=(_QUERY_HEAD_COUNT, _KV_HEAD_COUNT),
)

_QUERY_HEADS = StructureSpec(
    members=(
        Member("self_attn.qkv_proj.weight", 0, parts=_QKV_PARTS, owned_parts=(0,)),
        Member("self_attn.o_proj.weight", 1, consumer=True),
    ),
    units=_QUERY_HEAD_COUNT,
    widths=(_QUERY_HEAD_COUNT,),
    tied_groups=_KV_HEAD_COUNT,
)

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
    Member("self_attn.qkv_proj.weight", 1),
    Member("self_attn.o_proj.weight", 0),
    Member("self_attn.o_proj.bias", 0),
    Member("post_attention_layernorm.weight", 0),
    Member("mlp.gate_up_proj.weight", 1),
    Member("mlp.down_proj.weight", 0),
    Member("mlp.down_proj.bias", 0),
)

PHI3_SPEC = ArchitectureSpec(
    model_types=("phi3",),
    layers="model.layers",
    structures={ATTENTION_HEADS: _ATTENTION, QUERY_HEADS: _QUERY_HEADS, MLP_CHANNELS: _MLP},
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
    layer_module_attrs={
        "self_attn.num_key_value_groups": ("num_attention_heads", "num_key_value_heads"),
        "self_attn.num_key_value_heads": ("num_key_value_heads", 1),
    },
    layer_config_modules=("self_attn",),
    derived_fields={"head_dim": ("hidden_size", "num_attention_heads")},
    pruned_model_type="pruned_phi3",
    bias_fields={"self_attn.o_proj": "o_proj_bias", "mlp.down_proj": "down_proj_bias"},
    lora_target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
)

register_family("phi3", PHI3_SPEC, streaming=True)
