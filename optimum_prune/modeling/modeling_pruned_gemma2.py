# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports torch, transformers and per_layer_config.py.
"""Gemma2 models with what the stock `Gemma2Config` cannot express: per-layer widths (`per_layer_config`, see
`per_layer_config.py`) and output biases on `o_proj` / `down_proj` (`o_proj_bias`, `down_proj_bias`: FLAP's bias
compensation). The stock model is built, then its decoder layers are rebuilt from per-layer config copies (from
`from_pretrained` both happen on the meta device); everything else, forward passes included, is the stock code, of
Transformers 4.57 or 5.x.
"""

from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2Model
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer, Gemma2PreTrainedModel

from .per_layer_config import PerLayerConfigMixin, build_layers


try:  # Transformers 5 configs are strict dataclasses whose validators are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(Gemma2Config, "__class_validators__") else cls


@_strict
class PrunedGemma2Config(PerLayerConfigMixin, Gemma2Config):
    """A `Gemma2Config` with per-layer head counts and MLP widths."""

    model_type = "pruned_gemma2"
    PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    OUTPUT_BIASES = {"o_proj_bias": "self_attn.o_proj", "down_proj_bias": "mlp.down_proj"}
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def validate_architecture(self):
        self.check_kv_heads()
        self.check_per_layer_indices()


class PrunedGemma2Model(Gemma2Model):
    config_class = PrunedGemma2Config

    def __init__(self, config: PrunedGemma2Config):
        super().__init__(config)
        self.layers = build_layers(Gemma2DecoderLayer, config)
        self.post_init()


class PrunedGemma2ForCausalLM(Gemma2ForCausalLM):
    config_class = PrunedGemma2Config

    def __init__(self, config: PrunedGemma2Config):
        Gemma2PreTrainedModel.__init__(self, config)
        self.model = PrunedGemma2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["PrunedGemma2Config", "PrunedGemma2ForCausalLM"]
