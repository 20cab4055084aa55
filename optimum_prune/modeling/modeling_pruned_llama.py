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

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from .per_layer_config import PerLayerConfigMixin, build_layers


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
        for index in [None, *self.per_layer_overrides]:
            config = self if index is None else self.layer_config(index)
            if config.num_attention_heads % config.num_key_value_heads:
                where = "" if index is None else f" in layer {index}"
                raise ValueError(
                    f"num_attention_heads ({config.num_attention_heads}) must be a multiple of num_key_value_heads "
                    f"({config.num_key_value_heads}){where}."
                )
        self.validate_per_layer_indices()


class PrunedLlamaModel(LlamaModel):
    """`LlamaModel` whose decoder layers are built from per-layer configs."""

    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        # LlamaModel.__init__ with one change: each decoder layer gets its own widths.
        super(LlamaModel, self).__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = build_layers(LlamaDecoderLayer, config)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        # LlamaForCausalLM.__init__ with the per-layer base model (never built at full width first).
        super(LlamaForCausalLM, self).__init__(config)
        self.model = PrunedLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["PrunedLlamaConfig", "PrunedLlamaForCausalLM", "PrunedLlamaModel"]
