# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports torch, transformers and per_layer_config.py.
"""Phi-3 models with what the stock `Phi3Config` cannot express: per-layer widths (`per_layer_config`, see
`per_layer_config.py`) and output biases on `o_proj` / `down_proj` (`o_proj_bias`, `down_proj_bias`: FLAP's bias
compensation). Each decoder layer is built from its own config copy, and its attention, whose `forward` splits the
fused qkv at `config.num_attention_heads * head_dim`, keeps a view of the config with that layer's widths; everything
else is the stock code.
"""

from transformers import Phi3Config, Phi3ForCausalLM, Phi3Model
from transformers.models.phi3.modeling_phi3 import (
    Phi3DecoderLayer,
    Phi3PreTrainedModel,
    Phi3RMSNorm,
    Phi3RotaryEmbedding,
)

from .per_layer_config import LayerConfigView, PerLayerConfigMixin, init_causal_lm, init_rotary_decoder


try:  # Transformers 5 configs are strict dataclasses whose validators are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(Phi3Config, "__class_validators__") else cls


@_strict
class PrunedPhi3Config(PerLayerConfigMixin, Phi3Config):
    """A `Phi3Config` with per-layer head counts and MLP widths."""

    model_type = "pruned_phi3"
    PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    OUTPUT_BIASES = {"o_proj_bias": "self_attn.o_proj", "down_proj_bias": "mlp.down_proj"}
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def validate_architecture(self):
        self.check_kv_heads()
        self.check_per_layer_indices()


class PrunedPhi3Model(Phi3Model):
    config_class = PrunedPhi3Config

    def __init__(self, config: PrunedPhi3Config):
        Phi3PreTrainedModel.__init__(self, config)
        init_rotary_decoder(self, config, Phi3DecoderLayer, Phi3RMSNorm, Phi3RotaryEmbedding)
        for i, layer in enumerate(self.layers):
            layer.self_attn.config = LayerConfigView(config, config.per_layer_overrides.get(i, {}))


class PrunedPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = PrunedPhi3Config

    def __init__(self, config: PrunedPhi3Config):
        Phi3PreTrainedModel.__init__(self, config)
        init_causal_lm(self, config, PrunedPhi3Model)


__all__ = ["PrunedPhi3Config", "PrunedPhi3ForCausalLM"]
