"""Tiny random models built inside the tests (no downloads), and references that need no pruning code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


VOCAB = 97
WORDS = [f"w{i}" for i in range(VOCAB - 1)]  # word i + 1 of the tiny models' vocabulary; id 0 is "[UNK]"


def word_tokenizer(**special_tokens):
    """A word-level tokenizer over `WORDS` (no downloads): "w5" is id 6, anything else "[UNK]" (0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special_tokens)


def sharded_checkpoint(model, path, max_shard_size: str = "20KB"):
    """Save `model` in several safetensors shards with `word_tokenizer()`, and `word_text()` as `calib.txt` beside the
    folder (a local checkpoint for the streaming and CLI tests). Returns `path`."""
    model.save_pretrained(path, max_shard_size=max_shard_size)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    word_tokenizer().save_pretrained(path)
    with open(os.path.join(os.path.dirname(path), "calib.txt"), "w", encoding="utf-8") as f:
        f.write(word_text())
    return path


def load_eval(path):
    """`AutoModelForCausalLM.from_pretrained(path)` in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def word_text(num_words: int = 2000) -> str:
    """Text over `WORDS` with a fixed pattern (a calibration or training corpus for `word_tokenizer`)."""
    return " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(num_words))


def tiny_llama(seed: int = 0, tie: bool = False, bias: bool = False, **overrides) -> LlamaForCausalLM:
    """A 3-layer GQA LLaMA (8 query heads in 4 KV groups, head_dim 8, hidden 48, MLP 80) in float32, eval mode."""
    overrides = {"tie_word_embeddings": tie, "attention_bias": bias, "mlp_bias": bias, **overrides}
    return _tiny_llama_layout(LlamaConfig, LlamaForCausalLM, seed, overrides)


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """`tiny_llama`'s shape as Qwen2 (q/k/v biases, o_proj and MLP without)."""
    return _tiny_llama_layout(Qwen2Config, Qwen2ForCausalLM, seed, overrides)


def tiny_qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """`tiny_llama`'s shape as Qwen3 (per-head q_norm/k_norm over head_dim, no biases)."""
    return _tiny_llama_layout(Qwen3Config, Qwen3ForCausalLM, seed, overrides)


def tiny_phi3(seed: int = 0, **overrides) -> Phi3ForCausalLM:
    """A 3-layer Phi-3: 8 query heads in 4 KV groups of head_dim 6 (`hidden_size // heads`) in a fused qkv_proj, fused
    gate_up_proj (MLP 80), hidden 48, float32, eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return _randomize(Phi3ForCausalLM(Phi3Config(**kwargs)).eval())


def tiny_gemma(seed: int = 0, gemma3: bool = False, **overrides):
    """A 3-layer Gemma 2 (or Gemma 3 text, with per-head q_norm/k_norm): 8 query heads in 4 KV groups of head_dim 8,
    GeGLU MLP 80, hidden 48, (1 + w) RMSNorms before and after each branch, embeddings scaled by sqrt(48) and tied,
    `query_pre_attn_scalar` 16 (not head_dim), attention and final-logit soft-capping, a sliding-window layer between
    two global ones (window 4), float32, eval mode."""
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
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    config_class, model_class = (Gemma3TextConfig, Gemma3ForCausalLM) if gemma3 else (Gemma2Config, Gemma2ForCausalLM)
    return _randomize(model_class(config_class(**kwargs)).eval())


def tiny_mistral(seed: int = 0, **overrides) -> MistralForCausalLM:
    """`tiny_llama`'s shape as Mistral (no biases)."""
    return _tiny_llama_layout(MistralConfig, MistralForCausalLM, seed, overrides)


def _tiny_llama_layout(config_class, model_class, seed: int, overrides: dict):
    """A 3-layer model of the LLaMA layout (8 query heads in 4 KV groups, head_dim 8, hidden 48, MLP 80), untied
    unless `overrides` say so, float32, eval mode."""
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
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    kwargs.update(overrides)
    return _randomize(model_class(config_class(**kwargs)).eval())


def _randomize(model):
    """Random norms and biases so that nothing is trivially symmetric."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tiny_glm(seed: int = 0, glm4: bool = False, **overrides):
    """A 3-layer GLM (or GLM-4): 6 query heads in 3 KV groups of head_dim 8 with q/k/v biases, partial rotary 0.5,
    fused gate_up_proj (MLP 80), hidden 48, float32, eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        max_position_embeddings=128,
        attention_bias=True,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    config_class, model_class = (Glm4Config, Glm4ForCausalLM) if glm4 else (GlmConfig, GlmForCausalLM)
    return _randomize(model_class(config_class(**kwargs)).eval())


def input_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def skip_layers(model, layers: list[int], path: str = "model.layers"):
    """Make decoder layers (the ModuleList at `path`) pass their input through unchanged (forward hooks; the
    reference for layer removal). Returns the hook handles."""

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return [model.get_submodule(path)[i].register_forward_hook(hook, with_kwargs=True) for i in layers]


def tiny_opt(seed: int = 0, **overrides) -> OPTForCausalLM:
    """A 3-layer OPT (6 heads of 8, hidden 48, FFN 80, learned positions, biases, tied lm_head), float32, eval.
    Pass `do_layer_norm_before=False` for the post-LN variant, `word_embed_proj_dim=32` for project_in/out."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        ffn_dim=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        max_position_embeddings=64,
        dropout=0.0,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return _randomize(OPTForCausalLM(OPTConfig(**kwargs)).eval())


def tiny_bloom(seed: int = 0, **overrides) -> BloomForCausalLM:
    """A 3-layer BLOOM (6 heads of 8, so ALiBi uses its non-power-of-two slopes; hidden 48, MLP 4 x 48, tied
    lm_head), float32, eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=48, n_layer=3, n_head=6, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    kwargs.update(overrides)
    return _randomize(BloomForCausalLM(BloomConfig(**kwargs)).eval())


def fresh_process_logits(paths, ids: torch.Tensor, *, trust_remote_code: bool, import_package: bool):
    """Load each checkpoint in `paths` in one new interpreter and return [(logits, model class name)] in order.

    With `import_package=False` the package is made unimportable, so a registered pruned type can only load through
    the modeling file written beside the weights (`trust_remote_code=True`).
    """
    paths = [str(p) for p in paths]
    out = os.path.join(os.path.dirname(paths[0]), f"fresh-logits-{int(import_package)}.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        {"import optimum_prune" if import_package else "sys.modules['optimum_prune'] = None  # the package is absent"}
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({ids.tolist()})
        results = []
        for path in {paths!r}:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code={trust_remote_code}).eval()
            with torch.no_grad():
                results.append((model(input_ids=ids).logits, type(model).__name__))
        torch.save(results, {out!r})
    """)
    # The child imports the same optimum_prune as this process (a relative PYTHONPATH would not follow the cwd).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout; tests/ sits beside the package
    cwd = os.path.dirname(paths[0])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": os.path.join(cwd, "modules"),
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def sequential_reference(model, config, batches, zero_units) -> dict:
    """The plan of one-pass streaming, computed with the in-memory statistics code: layer i is scored by
    `collect_statistics` on a copy of the whole model in which the units removed from the layers before it are zeroed
    by `zero_units(model, layer, structure, removed)` (`family_table.FamilyCase.zero_units`: what the pruned layers do,
    through the family's own forward). Returns the kept units per pruned group set."""
    import copy

    from optimum_prune.allocation import select_top, uniform_allocation
    from optimum_prune.architectures import get_architecture
    from optimum_prune.calibration import collect_statistics
    from optimum_prune.groups import build_group_sets, decoder_layers

    spec = get_architecture(model.config.model_type)
    importance = config.build_importance()
    zeroed = copy.deepcopy(model)
    group_sets = build_group_sets(zeroed, spec, config.structures)
    counts = uniform_allocation(
        dict(zeroed.named_parameters()), group_sets, config.structures, config.pruning_ratio, config.round_to
    )
    kept = {}
    for i in range(len(decoder_layers(zeroed, spec))):
        keys = [key for key, gs in group_sets.items() if gs.layer == i]
        names = {s.name for key in keys for s in group_sets[key].slices}
        stats = collect_statistics(zeroed, batches, importance.needs, param_names=names)
        for key in keys:
            if counts[key] < group_sets[key].num_units:
                kept[key] = select_top(importance.score(group_sets[key], stats).float(), counts[key])
                removed = sorted(set(range(group_sets[key].num_units)) - set(kept[key]))
                with torch.no_grad():
                    zero_units(zeroed, i, key.split(".")[0], removed)
    return kept
