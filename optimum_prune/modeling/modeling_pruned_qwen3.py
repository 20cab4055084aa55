# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports torch, transformers and per_layer_config.py.
"""Qwen3 models with what the stock `Qwen3Config` cannot express: per-layer widths (`per_layer_config`, see
`per_layer_config.py`) and output biases on `o_proj` / `down_proj` (`o_proj_bias`, `down_proj_bias`: FLAP's bias
compensation). Each decoder layer is built from its own config copy; everything else is the stock code.
"""

from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3DecoderLayer,
    Qwen3PreTrainedModel,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
)

from .per_layer_config import PerLayerConfigMixin, init_causal_lm, init_rotary_decoder


try:  # Transformers 5 configs are strict dataclasses whose validators are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(Qwen3Config, "__class_validators__") else cls


@_strict
class PrunedQwen3Config(PerLayerConfigMixin, Qwen3Config):
    """A `Qwen3Config` with per-layer head counts and MLP widths."""

    model_type = "pruned_qwen3"
    PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    OUTPUT_BIASES = {"o_proj_bias": "self_attn.o_proj", "down_proj_bias": "mlp.down_proj"}
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def validate_architecture(self):
        self.check_kv_heads()
        self.check_per_layer_indices()


class PrunedQwen3Model(Qwen3Model):
    config_class = PrunedQwen3Config

    def __init__(self, config: PrunedQwen3Config):
        Qwen3PreTrainedModel.__init__(self, config)
        self.has_sliding_layers = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        init_rotary_decoder(self, config, Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding)


class PrunedQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = PrunedQwen3Config

    def __init__(self, config: PrunedQwen3Config):
        Qwen3PreTrainedModel.__init__(self, config)
        init_causal_lm(self, config, PrunedQwen3Model)


__all__ = ["PrunedQwen3Config", "PrunedQwen3ForCausalLM"]
