# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports torch, transformers and per_layer_config.py.
"""Mixtral, Qwen2-MoE and Qwen3-MoE models with what the stock configs cannot express: per-layer expert counts, expert widths and
head counts (`per_layer_config`, see `per_layer_config.py`), and an output bias on `o_proj` (`o_proj_bias`: FLAP's
bias compensation). Each decoder layer is built from its own config copy, so its router and experts have that layer's
expert count; everything else, forward passes included, is the stock code.

Weights are stored as Transformers 4.x names them (one Linear per expert), which each version reads with its own
stock code: 4.x builds module lists; 5.x fuses them into 3-D tensors on load and splits them on save through the
stock family's conversion mapping, registered here for the pruned types (5.x skips custom code's types otherwise).
"""

import transformers
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import (
    MixtralDecoderLayer,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
)
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeDecoderLayer,
    Qwen2MoeModel,
    Qwen2MoePreTrainedModel,
    Qwen2MoeRMSNorm,
    Qwen2MoeRotaryEmbedding,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeModel,
    Qwen3MoePreTrainedModel,
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
)

from .per_layer_config import PerLayerConfigMixin, init_causal_lm, init_rotary_decoder


try:  # Transformers 5 configs are strict dataclasses whose validators are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None
try:  # Transformers 5: weight conversions between 4.x checkpoints and its fused experts.
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
except ImportError:  # Transformers 4.x reads module-list experts as they are stored
    register_checkpoint_conversion_mapping = None

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
MOE_OUTPUT_BIASES = {"o_proj_bias": "self_attn.o_proj"}


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(MixtralConfig, "__class_validators__") else cls


class _MoeChecks:
    """Validation shared by the MoE configs: GQA head counts, layer indices, and at least `num_experts_per_tok`
    experts in every layer (top-k must find k experts)."""

    EXPERTS_FIELD = ""

    def check_experts(self) -> None:
        for index in [None, *self.per_layer_overrides]:
            layer = self if index is None else self.layer_config(index)
            experts = getattr(layer, self.EXPERTS_FIELD)
            if experts < self.num_experts_per_tok:
                where = "" if index is None else f" in layer {index}"
                raise ValueError(
                    f"{self.EXPERTS_FIELD} ({experts}) must be at least num_experts_per_tok "
                    f"({self.num_experts_per_tok}){where}."
                )

    def validate_architecture(self):
        self.check_kv_heads()
        self.check_per_layer_indices()
        self.check_experts()


@_strict
class PrunedMixtralConfig(_MoeChecks, PerLayerConfigMixin, MixtralConfig):
    """A `MixtralConfig` with per-layer head counts, expert counts and expert widths."""

    model_type = "pruned_mixtral"
    EXPERTS_FIELD = "num_local_experts"
    PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "num_local_experts", "intermediate_size")
    OUTPUT_BIASES = MOE_OUTPUT_BIASES
    o_proj_bias: bool = False


@_strict
class PrunedQwen2MoeConfig(_MoeChecks, PerLayerConfigMixin, Qwen2MoeConfig):
    """A `Qwen2MoeConfig` with per-layer head counts, expert counts and widths (experts' and dense layers')."""

    model_type = "pruned_qwen2_moe"
    EXPERTS_FIELD = "num_experts"
    PER_LAYER_FIELDS = (
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts",
        "moe_intermediate_size",
        "intermediate_size",
    )
    OUTPUT_BIASES = MOE_OUTPUT_BIASES
    o_proj_bias: bool = False


@_strict
class PrunedQwen3MoeConfig(_MoeChecks, PerLayerConfigMixin, Qwen3MoeConfig):
    """A `Qwen3MoeConfig` with per-layer head counts, expert counts and widths (experts' and dense layers')."""

    model_type = "pruned_qwen3_moe"
    EXPERTS_FIELD = "num_experts"
    PER_LAYER_FIELDS = (
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts",
        "moe_intermediate_size",
        "intermediate_size",
    )
    OUTPUT_BIASES = MOE_OUTPUT_BIASES
    o_proj_bias: bool = False
    # The epsilon of the per-head `q_norm`/`k_norm` when it differs from `rms_norm_eps` (hidden-channel pruning
    # rescales the latter for the norms over the hidden size only).
    head_norm_eps: float | None = None


def _init_moe_causal_lm(lm, config, base_model_class) -> None:
    """`init_causal_lm` plus the router settings the stock MoE causal LMs copy (their auxiliary loss reads them)."""
    init_causal_lm(lm, config, base_model_class)
    lm.router_aux_loss_coef = config.router_aux_loss_coef
    lm.num_experts = getattr(config, config.EXPERTS_FIELD)
    lm.num_experts_per_tok = config.num_experts_per_tok


class PrunedMixtralModel(MixtralModel):
    """`MixtralModel` whose decoder layers are built from per-layer configs."""

    config_class = PrunedMixtralConfig

    def __init__(self, config: PrunedMixtralConfig):
        MixtralPreTrainedModel.__init__(self, config)
        init_rotary_decoder(self, config, MixtralDecoderLayer, MixtralRMSNorm, MixtralRotaryEmbedding)


class PrunedMixtralForCausalLM(MixtralForCausalLM):
    config_class = PrunedMixtralConfig

    def __init__(self, config: PrunedMixtralConfig):
        MixtralPreTrainedModel.__init__(self, config)
        _init_moe_causal_lm(self, config, PrunedMixtralModel)


def check_4x_qwen2_moe_attention(config) -> None:
    """Transformers 4.x's Qwen2-MoE attention is `hidden_size` wide (it checks heads x `head_dim` against it and
    reshapes its output to it), so pruned heads or hidden channels need 5.x: refused by name rather than left to a
    shape error."""
    for index in range(config.num_hidden_layers):
        layer = config.layer_config(index)
        head_dim = getattr(layer, "head_dim", None) or layer.hidden_size // layer.num_attention_heads
        width = layer.num_attention_heads * head_dim
        if width != layer.hidden_size:
            raise ValueError(
                f"Layer {index} of this pruned Qwen2-MoE has {layer.num_attention_heads} heads of {head_dim} "
                f"({width} channels) and hidden_size {layer.hidden_size}; Transformers 4.x's Qwen2-MoE attention needs "
                "them equal: load it with Transformers 5 (or prune only experts and their channels for 4.x)."
            )


class PrunedQwen2MoeModel(Qwen2MoeModel):
    """`Qwen2MoeModel` whose decoder layers are built from per-layer configs."""

    config_class = PrunedQwen2MoeConfig

    def __init__(self, config: PrunedQwen2MoeConfig):
        Qwen2MoePreTrainedModel.__init__(self, config)
        if TRANSFORMERS_4:
            check_4x_qwen2_moe_attention(config)
        init_rotary_decoder(self, config, Qwen2MoeDecoderLayer, Qwen2MoeRMSNorm, Qwen2MoeRotaryEmbedding)


class PrunedQwen2MoeForCausalLM(Qwen2MoeForCausalLM):
    config_class = PrunedQwen2MoeConfig

    def __init__(self, config: PrunedQwen2MoeConfig):
        Qwen2MoePreTrainedModel.__init__(self, config)
        _init_moe_causal_lm(self, config, PrunedQwen2MoeModel)


class PrunedQwen3MoeModel(Qwen3MoeModel):
    """`Qwen3MoeModel` whose decoder layers are built from per-layer configs."""

    config_class = PrunedQwen3MoeConfig

    def __init__(self, config: PrunedQwen3MoeConfig):
        Qwen3MoePreTrainedModel.__init__(self, config)
        init_rotary_decoder(self, config, Qwen3MoeDecoderLayer, Qwen3MoeRMSNorm, Qwen3MoeRotaryEmbedding)
        if config.head_norm_eps is not None:
            for layer in self.layers:
                layer.self_attn.q_norm.variance_epsilon = config.head_norm_eps
                layer.self_attn.k_norm.variance_epsilon = config.head_norm_eps


class PrunedQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = PrunedQwen3MoeConfig

    def __init__(self, config: PrunedQwen3MoeConfig):
        Qwen3MoePreTrainedModel.__init__(self, config)
        _init_moe_causal_lm(self, config, PrunedQwen3MoeModel)


# Each pruned type stores its experts as its stock type does (overwrite: the package and a `trust_remote_code` copy of
# this file may both register).
if register_checkpoint_conversion_mapping is not None:
    for _pruned, _stock in (
        (PrunedMixtralConfig, MixtralConfig),
        (PrunedQwen2MoeConfig, Qwen2MoeConfig),
        (PrunedQwen3MoeConfig, Qwen3MoeConfig),
    ):
        _mapping = get_checkpoint_conversion_mapping(_stock.model_type)
        register_checkpoint_conversion_mapping(_pruned.model_type, _mapping, overwrite=True)


__all__ = [
    "PrunedMixtralConfig",
    "PrunedMixtralForCausalLM",
    "PrunedMixtralModel",
    "PrunedQwen2MoeConfig",
    "PrunedQwen2MoeForCausalLM",
    "PrunedQwen2MoeModel",
    "PrunedQwen3MoeConfig",
    "PrunedQwen3MoeForCausalLM",
    "PrunedQwen3MoeModel",
]
