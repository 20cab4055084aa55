# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports only torch and transformers.
"""LLaMA-family models with shapes the stock `LlamaConfig` cannot express: per-layer widths and head counts that do not
divide `hidden_size`.

Per-layer widths use the field name and format of Transformers' own heterogeneous configs (`per_layer_config`, added
in Transformers 5 by `HeterogeneousConfigMixin`): a sparse mapping from layer index to the stock field names that
differ from the global value, e.g.

```json
"num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 704,
"per_layer_config": {"3": {"num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 500}}
```

The checkpoint is therefore forward compatible with that format, but this file does not rely on the mixin (absent
before Transformers 5, and it makes reading a per-layer field from the global config raise): the config keeps the
overrides itself, the global fields hold the most common width (so code that reads `config.num_attention_heads`
keeps working), and each decoder layer is built from its own config copy.

Bias compensation (FLAP) gives the Linears that read the pruned units an output bias that stock LLaMA lacks:
`o_proj_bias` / `down_proj_bias` (booleans, default false) build one in every layer's `self_attn.o_proj` /
`mlp.down_proj` (`attention_bias` / `mlp_bias` would also add biases to q/k/v and gate/up). `config.per_layer_config[i]` returns that
copy under both Transformers 4.57 and 5.x, which is what generation reads to size a static cache per layer.
"""

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


try:  # Transformers 5 configs are strict dataclasses whose validators are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None


PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
_OVERRIDES = "_per_layer_overrides"


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(LlamaConfig, "__class_validators__") else cls


def _normalize_overrides(per_layer_config) -> dict:
    """`{"3": {...}}` (JSON) or `{3: {...}}` -> `{3: {...}}`; only the fields this model builds per layer."""
    if per_layer_config is None:
        return {}
    if not isinstance(per_layer_config, dict):
        raise TypeError(f"`per_layer_config` must be a mapping of layer index to overrides, got {per_layer_config!r}.")
    overrides = {}
    for index, fields in per_layer_config.items():
        unknown = sorted(set(fields) - set(PER_LAYER_FIELDS))
        if unknown:
            raise ValueError(f"`per_layer_config` of layer {index} sets {unknown}; allowed: {list(PER_LAYER_FIELDS)}.")
        if fields:
            overrides[int(index)] = {k: int(v) for k, v in fields.items()}
    return dict(sorted(overrides.items()))


@_strict
class PrunedLlamaConfig(LlamaConfig):
    """A `LlamaConfig` with per-layer widths (`per_layer_config`) and head counts that need not divide `hidden_size`
    (explicit `head_dim`)."""

    model_type = "pruned_llama"
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    @property
    def per_layer_config(self) -> list:
        """One config per decoder layer, with that layer's widths (a list, as Transformers 5's view behaves)."""
        return [self.layer_config(i) for i in range(self.num_hidden_layers)]

    @per_layer_config.setter
    def per_layer_config(self, value) -> None:
        # Stored privately so that Transformers 5's mixin never marks the global fields as ambiguous.
        self.__dict__[_OVERRIDES] = _normalize_overrides(value)

    @property
    def per_layer_overrides(self) -> dict:
        """`{layer index: {field: value}}` for the layers that differ from the global fields."""
        return self.__dict__.get(_OVERRIDES, {})

    def layer_config(self, layer_idx: int) -> "PrunedLlamaConfig":
        """A shallow copy of this config with layer `layer_idx`'s widths as its global fields."""
        config = copy.copy(self)
        config.__dict__[_OVERRIDES] = {}
        for key, value in self.per_layer_overrides.get(layer_idx, {}).items():
            setattr(config, key, value)
        return config

    def validate_architecture(self):
        for index in [None, *self.per_layer_overrides]:
            config = self if index is None else self.layer_config(index)
            if config.num_attention_heads % config.num_key_value_heads:
                where = "" if index is None else f" in layer {index}"
                raise ValueError(
                    f"num_attention_heads ({config.num_attention_heads}) must be a multiple of num_key_value_heads "
                    f"({config.num_key_value_heads}){where}."
                )
        if any(i >= self.num_hidden_layers for i in self.per_layer_overrides):
            raise ValueError(
                f"`per_layer_config` keys must be layer indices in [0, {self.num_hidden_layers}), "
                f"got {sorted(self.per_layer_overrides)}."
            )

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop(_OVERRIDES, None)
        overrides = self.per_layer_overrides
        if overrides:
            # Zero-padded keys sort numerically in JSON, as Transformers 5 writes them.
            digits = len(str(max(overrides)))
            output["per_layer_config"] = {str(i).zfill(digits): dict(v) for i, v in overrides.items()}
        return output


def _add_bias(linear: nn.Linear) -> None:
    """Give a bias-free Linear a (zero) bias; `nn.Linear.forward` reads `self.bias`."""
    if linear.bias is None:
        weight = linear.weight
        linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))


class PrunedLlamaModel(LlamaModel):
    """`LlamaModel` whose decoder layers are built from per-layer configs."""

    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        # LlamaModel.__init__ with one change: each decoder layer gets its own widths.
        super(LlamaModel, self).__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config.layer_config(i), i) for i in range(config.num_hidden_layers)]
        )
        # Modules keep the shared config afterwards: their widths live in their weights, and forward reads only
        # settings such as the attention implementation, which must follow `set_attn_implementation`.
        for module in self.layers.modules():
            if isinstance(getattr(module, "config", None), LlamaConfig):
                module.config = config
        for layer in self.layers:
            if getattr(config, "o_proj_bias", False):
                _add_bias(layer.self_attn.o_proj)
            if getattr(config, "down_proj_bias", False):
                _add_bias(layer.mlp.down_proj)
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
