# Self-contained file copied beside pruned checkpoints with the modeling files that import it (a relative import, which
# Transformers' remote code copies along). It imports only torch.
"""Per-layer widths for a config, in the field name and format of Transformers' own heterogeneous configs
(`per_layer_config`, added in Transformers 5 by `HeterogeneousConfigMixin`): a sparse mapping from layer index to the
stock field names that differ from the global value, e.g.

```json
"num_attention_heads": 8, "intermediate_size": 704,
"per_layer_config": {"3": {"num_attention_heads": 6, "intermediate_size": 500}}
```

The checkpoint is therefore forward compatible with that format, but this mixin does not rely on Transformers' (absent
before Transformers 5, and it makes reading a per-layer field from the global config raise): the config keeps the
overrides itself, the global fields hold the most common width (so code that reads `config.num_attention_heads` keeps
working), and each decoder layer is built from its own config copy (`layer_config(i)`).
"""

import copy

import torch
from torch import nn


_OVERRIDES = "_per_layer_overrides"


class PerLayerConfigMixin:
    """Mixed into a registered config class before the stock one; `PER_LAYER_FIELDS` names the fields a layer may set.

    `config.per_layer_config[i]` returns layer i's config copy under both Transformers 4.57 and 5.x, which is what
    generation reads to size a static cache per layer."""

    # Checks are named `check_*`: Transformers 5's strict configs run every `validate_*` method as a validator of
    # every class that inherits it; each config calls the checks that apply from its own `validate_architecture`.
    PER_LAYER_FIELDS: tuple = ()
    # Boolean config fields that give every decoder layer's Linear at that path an output bias (FLAP's bias
    # compensation on families built without one), e.g. {"o_proj_bias": "self_attn.o_proj"}.
    OUTPUT_BIASES: dict = {}

    @property
    def per_layer_config(self) -> list:
        """One config per decoder layer, with that layer's widths (a list, as Transformers 5's view behaves)."""
        return [self.layer_config(i) for i in range(self.num_hidden_layers)]

    @per_layer_config.setter
    def per_layer_config(self, value) -> None:
        # Stored privately so that Transformers 5's mixin never marks the global fields as ambiguous.
        self.__dict__[_OVERRIDES] = self._normalize_overrides(value)

    @property
    def per_layer_overrides(self) -> dict:
        """`{layer index: {field: value}}` for the layers that differ from the global fields."""
        return self.__dict__.get(_OVERRIDES, {})

    def layer_config(self, layer_idx: int):
        """A shallow copy of this config with layer `layer_idx`'s widths as its global fields."""
        config = copy.copy(self)
        config.__dict__[_OVERRIDES] = {}
        for key, value in self.per_layer_overrides.get(layer_idx, {}).items():
            setattr(config, key, value)
        return config

    def _normalize_overrides(self, per_layer_config) -> dict:
        """`{"3": {...}}` (JSON) or `{3: {...}}` -> `{3: {...}}`; only the fields this model builds per layer."""
        if per_layer_config is None:
            return {}
        if not isinstance(per_layer_config, dict):
            raise TypeError(
                f"`per_layer_config` must be a mapping of layer index to overrides, got {per_layer_config!r}."
            )
        overrides = {}
        for index, fields in per_layer_config.items():
            unknown = sorted(set(fields) - set(self.PER_LAYER_FIELDS))
            if unknown:
                raise ValueError(
                    f"`per_layer_config` of layer {index} sets {unknown}; allowed: {list(self.PER_LAYER_FIELDS)}."
                )
            if fields:
                overrides[int(index)] = {k: int(v) for k, v in fields.items()}
        return dict(sorted(overrides.items()))

    def check_kv_heads(self) -> None:
        """Grouped-query attention in every layer: query heads a multiple of key/value heads (LLaMA, GLM)."""
        for index in [None, *self.per_layer_overrides]:
            layer = self if index is None else self.layer_config(index)
            if layer.num_attention_heads % layer.num_key_value_heads:
                where = "" if index is None else f" in layer {index}"
                raise ValueError(
                    f"num_attention_heads ({layer.num_attention_heads}) must be a multiple of num_key_value_heads "
                    f"({layer.num_key_value_heads}){where}."
                )

    def check_per_layer_indices(self) -> None:
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


class LayerConfigView:
    """The shared config seen by one decoder layer: its own widths (`widths`), everything else read from the shared
    config when asked, so the attention implementation follows `set_attn_implementation`. For modules whose `forward`
    reads a width from `self.config` (Phi-3's attention splits its fused qkv at `config.num_attention_heads`)."""

    def __init__(self, config, widths: dict):
        self.__dict__["_shared"] = config
        self.__dict__["_widths"] = dict(widths)

    def __getattr__(self, name):
        if name.startswith("__") or "_shared" not in self.__dict__:  # copy and pickle probe before the state is set
            raise AttributeError(name)
        widths = self.__dict__["_widths"]
        return widths[name] if name in widths else getattr(self.__dict__["_shared"], name)


def build_layers(layer_class, config) -> nn.ModuleList:
    """The decoder layers, layer i built by `layer_class(config.layer_config(i), layer_idx=i)` with its own widths, and
    the output biases the config's `OUTPUT_BIASES` fields turn on.

    Modules keep the shared config afterwards: their widths live in their weights and attributes, and forward reads
    only settings such as the attention implementation, which must follow `set_attn_implementation`."""
    layers = nn.ModuleList([layer_class(config.layer_config(i), layer_idx=i) for i in range(config.num_hidden_layers)])
    for module in layers.modules():
        if isinstance(getattr(module, "config", None), PerLayerConfigMixin):
            module.config = config
    for field_name, path in config.OUTPUT_BIASES.items():
        if getattr(config, field_name, False):
            for layer in layers:
                linear = layer.get_submodule(path)
                if linear.bias is None:  # `nn.Linear.forward` reads `self.bias`
                    weight = linear.weight
                    linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    return layers


def init_rotary_decoder(model, config, layer_class, norm_class, rotary_class) -> None:
    """The body of a LLaMA-style `*Model.__init__` (LLaMA, GLM, GLM-4) with per-layer decoder layers; call it after
    the family's `PreTrainedModel.__init__(model, config)`."""
    model.padding_idx = config.pad_token_id
    model.vocab_size = config.vocab_size
    model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, model.padding_idx)
    model.layers = build_layers(layer_class, config)
    model.norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
    model.rotary_emb = rotary_class(config=config)
    model.gradient_checkpointing = False
    model.post_init()


def init_causal_lm(lm, config, base_model_class) -> None:
    """The body of a LLaMA-style `*ForCausalLM.__init__` around the per-layer base model (never built at full width
    first); call it after the family's `PreTrainedModel.__init__(lm, config)`."""
    lm.model = base_model_class(config)
    lm.vocab_size = config.vocab_size
    lm.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    lm.post_init()
