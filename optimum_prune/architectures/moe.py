"""Mixture-of-Experts families with LLaMA's attention: Mixtral, Qwen2-MoE (with its shared expert) and Qwen3-MoE (with
its per-head q/k norms).

Transformers 5 stores a layer's experts as fused 3-D parameters behind a top-k router (`mlp.gate`, softmax over the
expert logits, then top-k, renormalised by Mixtral always and by Qwen3-MoE under `norm_topk_prob`):

- `mlp.gate.weight` [E, H]: one router row per expert;
- `mlp.experts.gate_up_proj` [E, 2I, H]: gate then up rows of every expert;
- `mlp.experts.down_proj` [E, H, I].

Structures:

- `experts`: whole experts, dimension 0 of the three tensors. Softmax over the kept experts' logits equals softmax
  over all of them with the removed ones at -inf, and top-k never picks a -inf expert, so the pruned layer computes
  what the original computes with the removed experts' router logits set to -inf. `num_experts` (Mixtral's
  `num_local_experts`, which its config also reads as `num_experts`) may differ per layer.
- `mlp_channels`: every expert's intermediate channels, tied across the experts of a layer (channel j of every
  expert is one unit), so one `moe_intermediate_size` (Mixtral: `intermediate_size`) holds per layer.
- `attention_heads`, `query_heads`, `hidden_channels`, `layers`: as LLaMA. Qwen3-MoE's `q_norm`/`k_norm` act over
  `head_dim`, which neither head nor hidden-channel pruning changes.

Qwen3-MoE layers listed in `mlp_only_layers` (or off `decoder_sparse_step`) have a dense LLaMA MLP instead: they have
no `experts` units, and their `mlp.*_proj` members stay in hidden-channel pruning.

Checkpoints on disk name the experts as Transformers 4.x does (one Linear per expert; 5.x fuses them on load and
splits them on save through its conversion mapping, keyed by `model_type`); code that reads safetensors itself
converts through that same mapping (`checkpoint_conversion.py`), so no expert names are declared here.
"""

import dataclasses

from .base import (
    ATTENTION_HEADS,
    EXPERTS,
    MLP_CHANNELS,
    QUERY_HEADS,
    Member,
    StructureSpec,
    Width,
    register_family,
)
from .llama import LLAMA_ATTENTION, LLAMA_QUERY_HEADS, LLAMA_SPEC


def experts_structure(experts_field: str) -> StructureSpec:
    """Whole experts: the router row and each fused expert tensor's first dimension."""
    return StructureSpec(
        members=(
            Member("mlp.gate.weight", 0),
            Member("mlp.experts.gate_up_proj", 0),
            Member("mlp.experts.down_proj", 0),
        ),
        units=Width(experts_field, "mlp.gate.weight", 0),
        widths=(Width(experts_field, "mlp.gate.weight", 0),),
    )


def expert_channels_structure(intermediate_field: str) -> StructureSpec:
    """Intermediate channels of every expert, tied across experts: gate and up rows (two fused parts), down columns."""
    return StructureSpec(
        members=(
            Member("mlp.experts.gate_up_proj", 1, chunks=2),
            Member("mlp.experts.down_proj", 2, consumer=True),
        ),
        units=Width(intermediate_field, "mlp.experts.down_proj", 2),
        widths=(Width(intermediate_field, "mlp.experts.down_proj", 2),),
    )


# LLaMA's hidden-channel members (the dense MLP's stay for Qwen3-MoE's dense layers), plus the router's and experts'
# hidden sides.
_MOE_HIDDEN_LAYER_MEMBERS = (
    *LLAMA_SPEC.hidden_layer_members,
    Member("mlp.gate.weight", 1),
    Member("mlp.experts.gate_up_proj", 2),
    Member("mlp.experts.down_proj", 1),
)


def moe_spec(model_type: str, experts_field: str, intermediate_field: str, pruned_model_type: str):
    """LLaMA's spec with the MoE block's structures in place of the dense MLP's."""
    return dataclasses.replace(
        LLAMA_SPEC,
        model_types=(model_type,),
        structures={
            ATTENTION_HEADS: LLAMA_ATTENTION,
            QUERY_HEADS: LLAMA_QUERY_HEADS,
            MLP_CHANNELS: expert_channels_structure(intermediate_field),
            EXPERTS: experts_structure(experts_field),
        },
        hidden_layer_members=_MOE_HIDDEN_LAYER_MEMBERS,
        layer_module_attrs={
            **LLAMA_SPEC.layer_module_attrs,
            # The router and the experts copy the expert count at construction and read it in forward.
            "mlp.gate.num_experts": (experts_field, 1),
            "mlp.experts.num_experts": (experts_field, 1),
            "mlp.experts.intermediate_dim": (intermediate_field, 1),
        },
        module_attrs=(
            ("/num_experts", experts_field),  # the causal LM's copy (its auxiliary loss)
            ("mlp.gate.hidden_dim", "hidden_size"),  # the router reshapes its input with it
            ("mlp.experts.hidden_dim", "hidden_size"),
        ),
        pruned_model_type=pruned_model_type,
        bias_fields={"self_attn.o_proj": "o_proj_bias"},
        lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        # The router's top-k (every layer keeps at least that many experts), the fused-experts module that routing
        # criteria hook, and the channel multiple Transformers' `grouped_mm` experts kernel needs (16-byte rows).
        extra={
            "experts_per_token_field": "num_experts_per_tok",
            "experts_module": "mlp.experts",
            "channel_multiple": 8,
        },
    )


MIXTRAL_SPEC = moe_spec("mixtral", "num_local_experts", "intermediate_size", "pruned_mixtral")
QWEN3_MOE_SPEC = dataclasses.replace(
    moe_spec("qwen3_moe", "num_experts", "moe_intermediate_size", "pruned_qwen3_moe"),
    # `q_norm`/`k_norm` act over `head_dim` with `rms_norm_eps`, which hidden-channel pruning rescales for the others.
    norm=dataclasses.replace(LLAMA_SPEC.norm, fixed_eps_field="head_norm_eps"),
)

# Qwen2-MoE adds a shared expert (a dense MLP of `shared_expert_intermediate_size`, left whole) scaled by a sigmoid
# gate; its hidden sides join hidden-channel pruning. `head_dim` is implicit (`hidden_size // num_attention_heads`).
_QWEN2_MOE_BASE = moe_spec("qwen2_moe", "num_experts", "moe_intermediate_size", "pruned_qwen2_moe")
QWEN2_MOE_SPEC = dataclasses.replace(
    _QWEN2_MOE_BASE,
    hidden_layer_members=(
        *_QWEN2_MOE_BASE.hidden_layer_members,
        Member("mlp.shared_expert.gate_proj.weight", 1),
        Member("mlp.shared_expert.up_proj.weight", 1),
        Member("mlp.shared_expert.down_proj.weight", 0),
        Member("mlp.shared_expert_gate.weight", 1),
    ),
    derived_fields={"head_dim": ("hidden_size", "num_attention_heads")},
)

register_family("mixtral", MIXTRAL_SPEC, streaming=True)
register_family("qwen2_moe", QWEN2_MOE_SPEC, streaming=True)
register_family("qwen3_moe", QWEN3_MOE_SPEC, streaming=True)
# Our per-layer outputs (`per_layer_config`) prune again, streamed too: their family's spec reads every width from the
# tensors, and their per-expert checkpoints convert as the stock type's (the pruned types register its mapping).
for _spec in (MIXTRAL_SPEC, QWEN2_MOE_SPEC, QWEN3_MOE_SPEC):
    register_family(
        _spec.pruned_model_type, dataclasses.replace(_spec, model_types=(_spec.pruned_model_type,)), streaming=True
    )
