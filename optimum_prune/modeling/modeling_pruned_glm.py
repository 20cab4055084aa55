# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports torch, transformers and per_layer_config.py.
"""GLM and GLM-4 models with what the stock `GlmConfig` / `Glm4Config` cannot express: per-layer widths
(`per_layer_config`, see `per_layer_config.py`) and output biases on `o_proj` / `down_proj` (`o_proj_bias`,
`down_proj_bias`: FLAP's bias compensation). Every other pruned shape stays the stock type. Each decoder layer is built
from its own config copy; everything else, forward passes included, is the stock code.
"""

from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM
from transformers.models.glm.modeling_glm import (
    GlmDecoderLayer,
    GlmModel,
    GlmPreTrainedModel,
    GlmRMSNorm,
    GlmRotaryEmbedding,
)
from transformers.models.glm4.modeling_glm4 import (
    Glm4DecoderLayer,
    Glm4Model,
    Glm4PreTrainedModel,
    Glm4RMSNorm,
    Glm4RotaryEmbedding,
)

from .per_layer_config import PerLayerConfigMixin, init_causal_lm, init_rotary_decoder


try:  # Transformers 5 configs are strict dataclasses whose validators are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None

GLM_PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
GLM_OUTPUT_BIASES = {"o_proj_bias": "self_attn.o_proj", "down_proj_bias": "mlp.down_proj"}


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(GlmConfig, "__class_validators__") else cls


@_strict
class PrunedGlmConfig(PerLayerConfigMixin, GlmConfig):
    """A `GlmConfig` with per-layer head counts and MLP widths."""

    model_type = "pruned_glm"
    PER_LAYER_FIELDS = GLM_PER_LAYER_FIELDS
    OUTPUT_BIASES = GLM_OUTPUT_BIASES
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def validate_architecture(self):
        self.check_kv_heads()
        self.check_per_layer_indices()


@_strict
class PrunedGlm4Config(PerLayerConfigMixin, Glm4Config):
    """A `Glm4Config` with per-layer head counts and MLP widths."""

    model_type = "pruned_glm4"
    PER_LAYER_FIELDS = GLM_PER_LAYER_FIELDS
    OUTPUT_BIASES = GLM_OUTPUT_BIASES
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def validate_architecture(self):
        self.check_kv_heads()
        self.check_per_layer_indices()


class PrunedGlmModel(GlmModel):
    config_class = PrunedGlmConfig

    def __init__(self, config: PrunedGlmConfig):
        GlmPreTrainedModel.__init__(self, config)
        init_rotary_decoder(self, config, GlmDecoderLayer, GlmRMSNorm, GlmRotaryEmbedding)


class PrunedGlmForCausalLM(GlmForCausalLM):
    config_class = PrunedGlmConfig

    def __init__(self, config: PrunedGlmConfig):
        GlmPreTrainedModel.__init__(self, config)
        init_causal_lm(self, config, PrunedGlmModel)


class PrunedGlm4Model(Glm4Model):
    config_class = PrunedGlm4Config

    def __init__(self, config: PrunedGlm4Config):
        Glm4PreTrainedModel.__init__(self, config)
        init_rotary_decoder(self, config, Glm4DecoderLayer, Glm4RMSNorm, Glm4RotaryEmbedding)


class PrunedGlm4ForCausalLM(Glm4ForCausalLM):
    config_class = PrunedGlm4Config

    def __init__(self, config: PrunedGlm4Config):
        Glm4PreTrainedModel.__init__(self, config)
        init_causal_lm(self, config, PrunedGlm4Model)


__all__ = ["PrunedGlm4Config", "PrunedGlm4ForCausalLM", "PrunedGlmConfig", "PrunedGlmForCausalLM"]
