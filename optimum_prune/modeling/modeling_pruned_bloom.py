# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports torch, transformers and per_layer_config.py.
"""BLOOM models with pruned heads, MLP channels or hidden channels, keeping every head's original ALiBi slope.

`BloomConfig` derives `head_dim = hidden_size // n_head` and builds the MLP `4 * hidden_size` wide; this config
stores `head_dim` and `intermediate_size`. ALiBi slopes depend on the head count and on each head's index, so a
pruned model that recomputed them from its own `n_head` would attend differently from the original. This config
keeps the original count (`alibi_num_heads`) and, per layer, the original indices of the kept heads
(`alibi_head_indices`): the model builds the original ALiBi tensor once and every block selects its own heads.
Per-layer head counts and MLP widths are stored as `per_layer_config` (see `per_layer_config.py`); each block is built
from its own config copy.
"""

import math

import torch
from torch import nn
from transformers import BloomConfig, BloomForCausalLM
from transformers.models.bloom.modeling_bloom import (
    BloomAttention,
    BloomBlock,
    BloomGelu,
    BloomMLP,
    BloomModel,
    BloomPreTrainedModel,
)

from .per_layer_config import PerLayerConfigMixin, build_layers


try:  # Transformers 5 configs are strict dataclasses whose fields are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(BloomConfig, "__class_validators__") else cls


@_strict
class PrunedBloomConfig(PerLayerConfigMixin, BloomConfig):
    """A `BloomConfig` with explicit `head_dim` and `intermediate_size`, and the original ALiBi heads.

    Args:
        head_dim (`int`, *optional*): per-head width; defaults to `hidden_size // n_head`.
        intermediate_size (`int`, *optional*): MLP width; defaults to `4 * hidden_size`.
        alibi_num_heads (`int`, *optional*): head count of the unpruned model, which the slopes are computed for;
            defaults to `n_head`.
        alibi_head_indices (`list[list[int]]`, *optional*): per layer, the original index of each kept head;
            defaults to all heads in order.
        per_layer_config (`dict`, *optional*): per-layer `n_head` and `intermediate_size` where they differ.
    """

    model_type = "pruned_bloom"
    PER_LAYER_FIELDS = ("n_head", "intermediate_size")
    head_dim: int | None = None
    intermediate_size: int | None = None
    alibi_num_heads: int | None = None
    alibi_head_indices: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.alibi_num_heads is None:
            self.alibi_num_heads = self.n_head

    def validate_architecture(self):
        if self.alibi_head_indices is not None:
            if len(self.alibi_head_indices) != self.n_layer:
                raise ValueError(
                    f"alibi_head_indices has {len(self.alibi_head_indices)} entries for {self.n_layer} layers."
                )
            for i, heads in enumerate(self.alibi_head_indices):
                n_head = self.per_layer_overrides.get(i, {}).get("n_head", self.n_head)
                if len(heads) != n_head or any(not 0 <= h < self.alibi_num_heads for h in heads):
                    raise ValueError(
                        f"alibi_head_indices of layer {i} needs {n_head} head indices in [0, "
                        f"{self.alibi_num_heads}), got {heads}."
                    )
        self.check_per_layer_indices()


class PrunedBloomAttention(BloomAttention):
    """`BloomAttention` with `n_head * head_dim` wide projections (the forward is inherited)."""

    def __init__(self, config: PrunedBloomConfig, layer_idx: int | None = None):
        nn.Module.__init__(self)
        self.pretraining_tp = config.pretraining_tp
        self.slow_but_exact = config.slow_but_exact
        self.hidden_size = config.hidden_size
        self.num_heads = config.n_head
        self.head_dim = config.head_dim
        self.split_size = self.hidden_size
        self.hidden_dropout = config.hidden_dropout
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        self.beta = 1.0
        self.layer_idx = layer_idx
        inner = self.num_heads * self.head_dim
        self.query_key_value = nn.Linear(self.hidden_size, 3 * inner, bias=True)
        self.dense = nn.Linear(inner, self.hidden_size)
        self.attention_dropout = nn.Dropout(config.attention_dropout)


class PrunedBloomMLP(BloomMLP):
    def __init__(self, config: PrunedBloomConfig):
        nn.Module.__init__(self)
        self.pretraining_tp = config.pretraining_tp
        self.slow_but_exact = config.slow_but_exact
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.gelu_impl = BloomGelu()
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.hidden_dropout = config.hidden_dropout


class PrunedBloomBlock(BloomBlock):
    """A `BloomBlock` that takes the ALiBi tensor of the original heads and keeps the rows of its own heads."""

    def __init__(self, config: PrunedBloomConfig, layer_idx: int | None = None):
        super(BloomBlock, self).__init__()  # GradientCheckpointingLayer: skip BLOOM's fixed-width constructors
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.num_heads = config.n_head
        self.self_attention = PrunedBloomAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = PrunedBloomMLP(config)
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout
        self.set_alibi_heads(config, layer_idx)

    def set_alibi_heads(self, config: PrunedBloomConfig, layer_idx: int | None) -> None:
        indices = config.alibi_head_indices
        heads = indices[layer_idx] if indices is not None and layer_idx is not None else range(config.n_head)
        self.alibi_num_heads = config.alibi_num_heads
        self.alibi_heads = [int(h) for h in heads]

    def forward(self, hidden_states, alibi, attention_mask, *args, **kwargs):
        if self.alibi_heads != list(range(self.alibi_num_heads)):
            # alibi: [batch * alibi_num_heads, 1, kv] (batch-major) -> [batch * n_head, 1, kv], original slopes
            batch = alibi.shape[0] // self.alibi_num_heads
            heads = torch.tensor(self.alibi_heads, device=alibi.device)
            alibi = alibi.view(batch, self.alibi_num_heads, *alibi.shape[1:])[:, heads]
            alibi = alibi.reshape(batch * len(self.alibi_heads), *alibi.shape[2:])
        return super().forward(hidden_states, alibi, attention_mask, *args, **kwargs)


class PrunedBloomModel(BloomModel):
    """`BloomModel` whose ALiBi tensor covers the original heads (`num_heads` is only read to build it)."""

    config_class = PrunedBloomConfig

    def __init__(self, config: PrunedBloomConfig):
        BloomPreTrainedModel.__init__(self, config)
        self.embed_dim = config.hidden_size
        self.num_heads = config.alibi_num_heads
        self.word_embeddings = nn.Embedding(config.vocab_size, self.embed_dim)
        self.word_embeddings_layernorm = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.h = build_layers(PrunedBloomBlock, config)
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()


class PrunedBloomForCausalLM(BloomForCausalLM):
    config_class = PrunedBloomConfig
    _no_split_modules = ["PrunedBloomBlock"]

    def __init__(self, config: PrunedBloomConfig):
        BloomPreTrainedModel.__init__(self, config)
        self.transformer = PrunedBloomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def adopt_pruned_modules(self) -> None:
        """Turn the stock modules of a model just pruned in memory into this type's modules (same parameters)."""
        self.transformer.__class__ = PrunedBloomModel
        self.transformer.num_heads = self.config.alibi_num_heads
        for i, block in enumerate(self.transformer.h):
            self.adopt_pruned_layer(block, i)

    def adopt_pruned_layer(self, block: nn.Module, layer_idx: int) -> None:
        """Turn one stock block (of this model, or pruned on its own by streaming) into a `PrunedBloomBlock` that
        selects the ALiBi rows of its kept heads (`config.alibi_head_indices[layer_idx]`) from the original ones."""
        block.__class__ = PrunedBloomBlock
        block.set_alibi_heads(self.config.layer_config(layer_idx), layer_idx)


__all__ = ["PrunedBloomConfig", "PrunedBloomForCausalLM"]
