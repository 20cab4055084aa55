# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports torch, transformers and per_layer_config.py.
"""OPT models whose attention width the stock `OPTConfig` cannot express.

`OPTAttention` derives `head_dim = hidden_size // num_attention_heads` and makes q/k/v/out_proj `hidden_size` wide,
so after head pruning (12 -> 9 heads of 64 with a hidden size of 768) or hidden-channel pruning the stock class
builds the wrong shapes or refuses the config. This config stores `head_dim` and these modules build attention
`num_attention_heads * head_dim` wide; everything else, forward passes included, is the stock OPT code. Per-layer
head counts and `ffn_dim` are stored as `per_layer_config` (see `per_layer_config.py`); each decoder layer is built
from its own config copy.
"""

from torch import nn
from transformers import OPTConfig, OPTForCausalLM
from transformers.activations import ACT2FN
from transformers.models.opt.modeling_opt import (
    OPTAttention,
    OPTDecoder,
    OPTDecoderLayer,
    OPTLearnedPositionalEmbedding,
    OPTModel,
    OPTPreTrainedModel,
)

from .per_layer_config import PerLayerConfigMixin, build_layers


try:  # Transformers 5 configs are strict dataclasses whose fields are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(OPTConfig, "__class_validators__") else cls


@_strict
class PrunedOPTConfig(PerLayerConfigMixin, OPTConfig):
    """An `OPTConfig` with an explicit `head_dim`, so that `num_attention_heads * head_dim` may differ from
    `hidden_size`, and per-layer widths (`per_layer_config`)."""

    model_type = "pruned_opt"
    PER_LAYER_FIELDS = ("num_attention_heads", "ffn_dim")
    head_dim: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate_architecture(self):
        self.check_per_layer_indices()


class PrunedOPTAttention(OPTAttention):
    """`OPTAttention` with `num_attention_heads * head_dim` wide projections (the forward is inherited)."""

    def __init__(self, config: PrunedOPTConfig, layer_idx: int | None = None, **kwargs):
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.enable_bias = config.enable_bias
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.is_causal = True
        self.scaling = self.head_dim**-0.5
        inner = self.num_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, inner, bias=self.enable_bias)
        self.v_proj = nn.Linear(self.embed_dim, inner, bias=self.enable_bias)
        self.q_proj = nn.Linear(self.embed_dim, inner, bias=self.enable_bias)
        self.out_proj = nn.Linear(inner, self.embed_dim, bias=self.enable_bias)


class PrunedOPTDecoderLayer(OPTDecoderLayer):
    def __init__(self, config: PrunedOPTConfig, layer_idx: int | None = None):
        super(OPTDecoderLayer, self).__init__()  # GradientCheckpointingLayer: skip OPT's attention constructor
        self.embed_dim = config.hidden_size
        self.self_attn = PrunedOPTAttention(config=config, layer_idx=layer_idx)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        affine = config.layer_norm_elementwise_affine
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim, elementwise_affine=affine)
        self.fc1 = nn.Linear(self.embed_dim, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, self.embed_dim, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim, elementwise_affine=affine)


class PrunedOPTDecoder(OPTDecoder):
    config_class = PrunedOPTConfig

    def __init__(self, config: PrunedOPTConfig):
        OPTPreTrainedModel.__init__(self, config)
        self.dropout = config.dropout
        self.layerdrop = config.layerdrop
        self.padding_idx = config.pad_token_id
        self.max_target_positions = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim, self.padding_idx)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
        projected = config.word_embed_proj_dim != config.hidden_size
        self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False) if projected else None
        self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False) if projected else None
        if config.do_layer_norm_before and not config._remove_final_layer_norm:
            affine = config.layer_norm_elementwise_affine
            self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        else:
            self.final_layer_norm = None
        self.layers = build_layers(PrunedOPTDecoderLayer, config)
        self.gradient_checkpointing = False
        self.post_init()


class PrunedOPTModel(OPTModel):
    config_class = PrunedOPTConfig

    def __init__(self, config: PrunedOPTConfig):
        OPTPreTrainedModel.__init__(self, config)
        self.decoder = PrunedOPTDecoder(config)
        self.post_init()


class PrunedOPTForCausalLM(OPTForCausalLM):
    config_class = PrunedOPTConfig
    _no_split_modules = ["PrunedOPTDecoderLayer"]

    def __init__(self, config: PrunedOPTConfig):
        OPTPreTrainedModel.__init__(self, config)
        self.model = PrunedOPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["PrunedOPTConfig", "PrunedOPTForCausalLM"]
