# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports torch, transformers and per_layer_config.py.
"""LLaMA-family models with shapes the stock `LlamaConfig` cannot express: per-layer widths and head counts that do not
divide `hidden_size`.

Per-layer widths are stored as `per_layer_config` (see `per_layer_config.py`, Transformers 5's format); each decoder
layer is built from its own config copy.

Bias compensation (FLAP) gives the Linears that read the pruned units an output bias that stock LLaMA lacks:
`o_proj_bias` / `down_proj_bias` (booleans, default false) build one in every layer's `self_attn.o_proj` /
`mlp.down_proj` (`attention_bias` / `mlp_bias` would also add biases to q/k/v and gate/up).
"""

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from .per_layer_config import PerLayerConfigMixin, init_causal_lm, init_rotary_decoder


try:  # Transformers 5 configs are strict dataclasses whose validators are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(LlamaConfig, "__class_validators__") else cls


@_strict
class PrunedLlamaConfig(PerLayerConfigMixin, LlamaConfig):
    """A `LlamaConfig` with per-layer widths (`per_layer_config`) and head counts that need not divide `hidden_size`
    (explicit `head_dim`)."""

    model_type = "pruned_llama"
    PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    OUTPUT_BIASES = {"o_proj_bias": "self_attn.o_proj", "down_proj_bias": "mlp.down_proj"}
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def validate_architecture(self):
        self.check_kv_heads()
        self.check_per_layer_indices()


class PrunedLlamaModel(LlamaModel):
    """`LlamaModel` whose decoder layers are built from per-layer configs."""

    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super(LlamaModel, self).__init__(config)  # LlamaPreTrainedModel.__init__
        init_rotary_decoder(self, config, LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super(LlamaForCausalLM, self).__init__(config)  # LlamaPreTrainedModel.__init__
        init_causal_lm(self, config, PrunedLlamaModel)


__all__ = ["PrunedLlamaConfig", "PrunedLlamaForCausalLM", "PrunedLlamaModel"]
