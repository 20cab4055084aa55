"""Qwen3 (`qwen3`): LLaMA's layout plus per-head `q_norm`/`k_norm`, RMSNorms over `head_dim` applied to every query
and key head before rotary.

- Head pruning removes whole heads, so the per-head norms (one `head_dim` weight shared by every head) stay as they
  are; hidden-channel pruning leaves them alone too.
- They read the same `rms_norm_eps` as the norms over the hidden size, so hidden-channel pruning cannot compensate by
  scaling that epsilon (a reloaded model would give the head norms the scaled one): it scales the residual stream
  instead (`NormSpec(compensation="residual")`), and `rms_norm_eps` keeps its value.
"""

import dataclasses

from .base import NormSpec, register_family
from .llama import LLAMA_SPEC


QWEN3_NORM = NormSpec(
    kind="rms",
    eps_attr="variance_epsilon",
    modules=("model.norm",),
    layer_modules=("input_layernorm", "post_attention_layernorm"),
    compensation="residual",
    embeddings=("model.embed_tokens",),
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
)

QWEN3_SPEC = dataclasses.replace(LLAMA_SPEC, model_types=("qwen3",), norm=QWEN3_NORM, pruned_model_type="pruned_qwen3")

register_family("qwen3", QWEN3_SPEC, streaming=True)
