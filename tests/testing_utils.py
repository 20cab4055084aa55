"""Tiny random models built inside the tests (no downloads), and references that need no pruning code."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


VOCAB = 97


def tiny_llama(seed: int = 0, tie: bool = False, bias: bool = False, **overrides) -> LlamaForCausalLM:
    """A 3-layer GQA LLaMA (8 query heads in 4 KV groups, head_dim 8, hidden 48, MLP 80) in float32, eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
        rms_norm_eps=1e-6,
    )
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    # Random norms and biases so that nothing is trivially symmetric.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def input_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def skip_layers(model, layers: list[int]):
    """Make decoder layers pass their input through unchanged (forward hooks; the reference for layer removal)."""
    handles = []
    for i in layers:

        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(model.model.layers[i].register_forward_hook(hook, with_kwargs=True))
    return handles
