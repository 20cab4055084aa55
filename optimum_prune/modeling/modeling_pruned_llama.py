# Self-contained modeling file written beside pruned checkpoints (`auto_map`), so they load with
# `trust_remote_code=True` where optimum-prune is not installed. It imports only torch and transformers.
"""LLaMA-family models whose attention width the stock `LlamaConfig` cannot express.

`LlamaConfig` rejects a head count that does not divide `hidden_size`, even with an explicit `head_dim`, although
`LlamaAttention` itself only needs `num_attention_heads * head_dim`. After head pruning (8 -> 6 heads of 32 with a
hidden size of 256, say) the stock class refuses the config; this one accepts it and builds the same modules.
"""

from transformers import LlamaConfig, LlamaForCausalLM


try:  # Transformers 5 configs are strict dataclasses whose validators are collected per decorated class.
    from huggingface_hub.dataclasses import strict
except ImportError:  # Transformers 4.x
    strict = None


def _strict(cls):
    return strict(cls) if strict is not None and hasattr(LlamaConfig, "__class_validators__") else cls


@_strict
class PrunedLlamaConfig(LlamaConfig):
    """A `LlamaConfig` that allows `num_attention_heads * head_dim != hidden_size` (explicit `head_dim`)."""

    model_type = "pruned_llama"

    def validate_architecture(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig


__all__ = ["PrunedLlamaConfig", "PrunedLlamaForCausalLM"]
