# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports torch, transformers and per_layer_config.py.
"""Gemma3 text models with what the stock `Gemma3TextConfig` cannot express: per-layer widths (`per_layer_config`, see
`per_layer_config.py`) and output biases on `o_proj` / `down_proj` (`o_proj_bias`, `down_proj_bias`: FLAP's bias
compensation). The stock model is built, then its decoder layers are rebuilt from per-layer config copies (from
`from_pretrained` both happen on the meta device); everything else, forward passes included, is the stock code, of
Transformers 4.57 or 5.x.
"""

from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextModel
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer, Gemma3PreTrainedModel

from .per_layer_config import PerLayerConfigMixin, build_layers


try:  # Transformers 5 configs are strict dataclasses whose validators are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(Gemma3TextConfig, "__class_validators__") else cls


@_strict
class PrunedGemma3TextConfig(PerLayerConfigMixin, Gemma3TextConfig):
    """A `Gemma3TextConfig` with per-layer head counts and MLP widths."""

    model_type = "pruned_gemma3_text"
    PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    OUTPUT_BIASES = {"o_proj_bias": "self_attn.o_proj", "down_proj_bias": "mlp.down_proj"}
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def validate_architecture(self):
        self.check_kv_heads()
        self.check_per_layer_indices()


class PrunedGemma3TextModel(Gemma3TextModel):
    config_class = PrunedGemma3TextConfig

    def __init__(self, config: PrunedGemma3TextConfig):
        super().__init__(config)
        self.layers = build_layers(Gemma3DecoderLayer, config)
        self.post_init()


class PrunedGemma3TextForCausalLM(Gemma3ForCausalLM):
    config_class = PrunedGemma3TextConfig

    def __init__(self, config: PrunedGemma3TextConfig):
        Gemma3PreTrainedModel.__init__(self, config)
        self.model = PrunedGemma3TextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["PrunedGemma3TextConfig", "PrunedGemma3TextForCausalLM"]
