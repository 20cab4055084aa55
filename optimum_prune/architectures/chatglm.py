"""ChatGLM2, ChatGLM3 and GLM-4 remote-code checkpoints (`model_type: "chatglm"`), converted exactly to native `glm`.

These checkpoints ship their own modeling code (`auto_map` to `modeling_chatglm.py`). Their computation is the one of
Transformers' `GlmForCausalLM`, so they are read without running that code and pruned as `glm` (see `glm.py`); the
result is a stock `glm` checkpoint that loads with no remote code at all.

How the remote layout maps onto `glm` (read from a public copy of ChatGLM3-6B's `modeling_chatglm.py`; the `rope_ratio`
handling of GLM-4 and ChatGLM2-32k from excerpts of theirs; no real checkpoint was run here):

- `transformer.embedding.word_embeddings` -> `model.embed_tokens`; `transformer.encoder.layers.N.` -> `model.layers.N.`
  (`input_layernorm`, `post_attention_layernorm` unchanged; `self_attention.dense` -> `self_attn.o_proj`;
  `mlp.dense_h_to_4h` -> `mlp.gate_up_proj`, both gate-first: ChatGLM's swiglu is `silu(x[0]) * x[1]` over
  `chunk(2)`; `mlp.dense_4h_to_h` -> `mlp.down_proj`); `transformer.encoder.final_layernorm` -> `model.norm`;
  `transformer.output_layer` -> `lm_head` (untied). `transformer.rotary_pos_emb.inv_freq` is a recomputed buffer.
- `self_attention.query_key_value` (weight and bias) is split into q/k/v. With `multi_query_attention` (every released
  ChatGLM2/3 and GLM-4) it is `[all q heads | k groups | v groups]`; without it, per head `[q | k | v]` interleaved.
- Rotary: ChatGLM rotates interleaved pairs `(x[2i], x[2i+1])` of the first `kv_channels // 2` channels of each head
  with frequency `base ** (-2i / (kv_channels // 2))`, and passes the rest through. `GlmAttention` does the same
  (`partial_rotary_factor=0.5`, `repeat_interleave`d cos/sin, `rotate_half` over even/odd channels), so no row
  permutation of q/k is needed. The tests check this against an independent re-implementation of ChatGLM's
  `apply_rotary_pos_emb` (and that a half-split rotary would be caught); they do not run THUDM's file itself.
- Precision: the weights are copied bit for bit. In float32 the logits equal ChatGLM's up to float rounding; in
  half precision ChatGLM rounds its cos/sin table to the weight dtype before rotating, Transformers rotates with a
  float32 table cast to the activations' dtype, so bf16/fp16 logits can differ at rounding level.
- `rope_ratio` means two things: ChatGLM3 and GLM-4 scale the base (`base = 10000 * rope_ratio`), ChatGLM2-32k divides
  the positions (`seq_idx / rope_ratio`, i.e. linear RoPE scaling). The checkpoint's `modeling_chatglm.py` is read as
  text (never imported) to tell which; `rope_ratio_mode` overrides it.
- Config: `num_layers` -> `num_hidden_layers`, `padded_vocab_size` -> `vocab_size`, `ffn_hidden_size` ->
  `intermediate_size`, `kv_channels` -> `head_dim`, `multi_query_group_num` -> `num_key_value_heads`, `add_qkv_bias`
  -> `attention_bias`, `layernorm_epsilon` -> `rms_norm_eps`, `seq_length` -> `max_position_embeddings`.

Not supported, with an error that says so: ChatGLM-6B v1 (`GLMBlock` with per-head fused qkv, 2D rotary, GELU MLP and
LayerNorm), LayerNorm variants (`rmsnorm: false`), `add_bias_linear`, `apply_residual_connection_post_layernorm`,
no final norm, P-tuning prefixes (`pre_seq_len`), quantized weights (`quantization_bit`) and GLM-4V (`vision_config`).
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch

from ..output_dir import atomic_directory, check_output_directory, checkpoint_bytes
from ..utils.safe_weights import pickle_refusal
from .base import register_family


logger = logging.getLogger(__name__)

CHATGLM_MODEL_TYPE = "chatglm"
ROPE_RATIO_MODES = ("base", "positions")

_PREFIX = "transformer."
_SAFETENSORS, _SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_PICKLE, _PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_SUPPORTED = (
    "Supported: ChatGLM2-6B, ChatGLM3-6B and GLM-4 checkpoints (`model_type: chatglm` with `kv_channels`, "
    "`ffn_hidden_size` and RMSNorm), which convert to native `glm`, and the native `glm` / `glm4` types."
)
# Per layer: remote name -> native name (the fused query_key_value is split separately).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_IGNORED = ("rotary_pos_emb.inv_freq",)  # a buffer the native model recomputes


def _check_supported(config: dict, keys=()) -> None:
    """Refuse the ChatGLM variants that `glm` cannot express, naming the field and what is supported."""
    v1_keys = [k for k in keys if re.match(r"(transformer\.)?layers\.\d+\.attention\.", k)]
    if "position_encoding_2d" in config or "inner_hidden_size" in config or v1_keys:
        raise ValueError(
            "This is a ChatGLM-6B (v1) checkpoint (`GLMBlock` with per-head fused `attention.query_key_value`, 2D "
            f"rotary positions, GELU MLP, LayerNorm), which optimum-prune does not convert. {_SUPPORTED}"
        )
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size") if k not in config]
    if missing:
        raise ValueError(f"config.json of this `chatglm` checkpoint lacks {missing}. {_SUPPORTED}")
    refused = {
        "rmsnorm": (config.get("rmsnorm", True) is not True, "LayerNorm instead of RMSNorm"),
        "add_bias_linear": (bool(config.get("add_bias_linear", False)), "biases on o_proj and the MLP"),
        "apply_residual_connection_post_layernorm": (
            bool(config.get("apply_residual_connection_post_layernorm", False)),
            "residuals taken after the norm",
        ),
        "post_layer_norm": (config.get("post_layer_norm", True) is not True, "no final norm"),
        "pre_seq_len": (config.get("pre_seq_len") is not None, "a P-tuning prefix encoder"),
        "quantization_bit": (bool(config.get("quantization_bit", 0)), "quantized weights"),
        "vision_config": (config.get("vision_config") is not None, "a vision tower (GLM-4V)"),
    }
    for field_name, (bad, what) in refused.items():
        if bad:
            raise ValueError(
                f"This `chatglm` checkpoint has `{field_name}: {config.get(field_name)!r}` ({what}), which native "
                f"`glm` cannot express. {_SUPPORTED}"
            )


def detect_rope_ratio_mode(modeling_source: str | None) -> str | None:
    """'base' (ChatGLM3, GLM-4: `base = base * self.rope_ratio`) or 'positions' (ChatGLM2-32k:
    `seq_idx = ... / self.rope_ratio`) from the text of `modeling_chatglm.py`; None when the text says neither."""
    if not modeling_source:
        return None
    if re.search(r"base\s*=\s*base\s*\*\s*self\.rope_ratio", modeling_source):
        return "base"
    if re.search(r"/\s*self\.rope_ratio", modeling_source):
        return "positions"
    return None


def chatglm_to_glm_config(config: dict, rope_ratio_mode: str | None = None):
    """A `GlmConfig` for a ChatGLM2/3 / GLM-4 `config.json` dict.

    Args:
        config (`dict`): the checkpoint's config.json.
        rope_ratio_mode (`str`, *optional*): how `rope_ratio` applies, `"base"` (rope theta = 10000 x ratio) or
            `"positions"` (positions divided by the ratio); needed only when `rope_ratio != 1`.
    """
    from transformers import GlmConfig

    _check_supported(config)
    heads = config["num_attention_heads"]
    head_dim = config.get("kv_channels") or config["hidden_size"] // heads
    kv_heads = config.get("multi_query_group_num", heads) if config.get("multi_query_attention", False) else heads
    rope_ratio = float(config.get("rope_ratio") or 1.0)
    rope = {"rope_theta": 10000.0}
    if rope_ratio != 1.0:
        if rope_ratio_mode not in ROPE_RATIO_MODES:
            raise ValueError(
                f"`rope_ratio` is {rope_ratio}; pass `rope_ratio_mode` as one of {list(ROPE_RATIO_MODES)} ('base' for "
                "ChatGLM3 and GLM-4, 'positions' for ChatGLM2-32k): the checkpoint's modeling_chatglm.py did not say "
                f"which (got {rope_ratio_mode!r})."
            )
        if rope_ratio_mode == "base":
            rope["rope_theta"] = 10000.0 * rope_ratio
        else:
            rope["rope_scaling"] = {"rope_type": "linear", "factor": rope_ratio}
    return GlmConfig(
        vocab_size=config.get("padded_vocab_size") or config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=config.get("seq_length", 2048),
        rms_norm_eps=config.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(config.get("add_qkv_bias", False)),
        attention_dropout=config.get("attention_dropout", 0.0),
        partial_rotary_factor=0.5,
        tie_word_embeddings=False,
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        **rope,
    )


def _split_qkv(fused: torch.Tensor, heads: int, kv_heads: int, head_dim: int, multi_query: bool):
    """[q_rows + 2 * kv_rows, ...] -> (q, k, v) rows, for a weight ([out, hidden]) or a bias ([out])."""
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    if fused.shape[0] != q_rows + 2 * kv_rows:
        raise ValueError(
            f"query_key_value has {fused.shape[0]} rows, expected {q_rows + 2 * kv_rows} "
            f"({heads} heads, {kv_heads} KV heads of {head_dim})."
        )
    if multi_query:  # [all q heads | k groups | v groups]
        q, k, v = fused.split([q_rows, kv_rows, kv_rows], dim=0)
    else:  # per head [q | k | v]: [heads, 3, head_dim, ...]
        per_head = fused.reshape(heads, 3, head_dim, *fused.shape[1:])
        q, k, v = (per_head[:, i].reshape(q_rows, *fused.shape[1:]) for i in range(3))
    return q.clone(), k.clone(), v.clone()


def convert_chatglm_state_dict(state_dict: dict, config: dict) -> dict:
    """The native `glm` state dict for a ChatGLM2/3 / GLM-4 one (keys with or without the `transformer.` prefix).

    Exact: tensors are renamed and split, never changed. Unknown or missing tensors raise.
    """
    _check_supported(config, state_dict.keys())
    heads = config["num_attention_heads"]
    head_dim = config.get("kv_channels") or config["hidden_size"] // heads
    multi_query = bool(config.get("multi_query_attention", False))
    kv_heads = config.get("multi_query_group_num", heads) if multi_query else heads
    num_layers = config["num_layers"]
    remaining = {(k[len(_PREFIX) :] if k.startswith(_PREFIX) else k): v for k, v in state_dict.items()}
    out = {}
    for old, new in _GLOBAL_RENAMES.items():
        if old in remaining:
            out[new] = remaining.pop(old)
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"model.layers.{i}."
        for old, new in _LAYER_RENAMES.items():
            if src + old in remaining:
                out[dst + new] = remaining.pop(src + old)
        for kind in ("weight", "bias"):
            fused = remaining.pop(f"{src}self_attention.query_key_value.{kind}", None)
            if fused is not None:
                q, k, v = _split_qkv(fused, heads, kv_heads, head_dim, multi_query)
                for proj, tensor in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                    out[f"{dst}self_attn.{proj}.{kind}"] = tensor
    for name in _IGNORED:
        remaining.pop(name, None)
    if remaining:
        raise ValueError(f"Unexpected tensors in this `chatglm` checkpoint: {sorted(remaining)[:8]}. {_SUPPORTED}")
    expected = list(_GLOBAL_RENAMES.values())
    for i in range(num_layers):
        expected += [f"model.layers.{i}.{new}" for new in _LAYER_RENAMES.values()]
        expected += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"]
        if config.get("add_qkv_bias", False):
            expected += [f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"]
    missing = [k for k in expected if k not in out]
    if missing:
        raise ValueError(f"This `chatglm` checkpoint lacks tensors for {missing[:8]}.")
    return out


def _resolve(path, filename: str, hub_kwargs: dict) -> str | None:
    """The local path of `filename` in a directory or Hub repo, or None when it is absent."""
    local = os.path.join(path, filename)
    if os.path.isdir(path):
        return local if os.path.isfile(local) else None
    from transformers.utils import cached_file

    return cached_file(
        path,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )


def read_chatglm_state_dict(path, allow_pickle: bool = False, **hub_kwargs) -> dict:
    """Every tensor of a checkpoint (directory or Hub repo), from safetensors (single or sharded via the index) or,
    only with `allow_pickle=True`, from `pytorch_model*.bin`.

    Pickles are refused by default because unpickling can run arbitrary code; even when allowed they are read with
    `torch.load(weights_only=True)`, PyTorch's restricted unpickler.
    """
    from safetensors import safe_open

    for single, index, pickled in ((_SAFETENSORS, _SAFETENSORS_INDEX, False), (_PICKLE, _PICKLE_INDEX, True)):
        files = []
        index_file = _resolve(path, index, hub_kwargs)
        if index_file is not None:
            with open(index_file) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [_resolve(path, shard, hub_kwargs) for shard in shards]
            if any(f is None for f in files):
                raise ValueError(f"{index} in {path} lists shards that are missing.")
        elif (single_file := _resolve(path, single, hub_kwargs)) is not None:
            files = [single_file]
        if not files:
            continue
        if pickled and not allow_pickle:
            raise pickle_refusal(path, os.path.basename(files[0]))
        state_dict = {}
        for file in files:
            if pickled:
                state_dict.update(torch.load(file, map_location="cpu", weights_only=True))
            else:
                with safe_open(file, framework="pt") as f:
                    state_dict.update({k: f.get_tensor(k) for k in f.keys()})
        return state_dict
    raise ValueError(f"No {_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_PICKLE} or {_PICKLE_INDEX} found in {path}.")


def _resolve_dtype(dtype, state_dict: dict) -> torch.dtype:
    if dtype is None or dtype == "auto":  # the stored dtype, as Transformers' `dtype="auto"`
        return next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"`dtype` must be a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}.")
        return resolved
    return dtype


def load_chatglm_checkpoint(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    rope_ratio_mode: str | None = None,
    dtype=None,
    device_map=None,
    max_memory=None,
    offload_folder=None,
    revision: str | None = None,
    token=None,
    cache_dir=None,
    trust_remote_code: bool | None = None,
):
    """A native `GlmForCausalLM` with the weights of a ChatGLM2/3 / GLM-4 checkpoint, without running its code.

    Args:
        path (`str` or `os.PathLike`): a local directory or a Hub repo id.
        allow_pickle (`bool`, *optional*, defaults to `False`): read `pytorch_model*.bin` when there is no
            safetensors file (unpickling can execute code).
        rope_ratio_mode (`str`, *optional*): `"base"` or `"positions"`, see `chatglm_to_glm_config`; detected from
            the checkpoint's `modeling_chatglm.py` text when left out.
        dtype (`torch.dtype` or `str`, *optional*): defaults to the stored dtype.
        device_map, max_memory, offload_folder (*optional*): passed to `from_pretrained` (the converted weights are
            read into CPU memory first, then dispatched).
        revision, token, cache_dir: Hub arguments.
        trust_remote_code (`bool`, *optional*): accepted for `AutoPruner.from_pretrained`; the model's remote code is
            never run (the tokenizer may use it, see `AutoPruner`).

    Example:

    ```python
    >>> from optimum_prune.architectures.chatglm import load_chatglm_checkpoint
    >>> model = load_chatglm_checkpoint("path/to/chatglm3-6b", dtype="bfloat16")
    >>> model.config.model_type
    'glm'
    ```
    """
    from transformers import GlmForCausalLM

    path = os.fspath(path)
    hub_kwargs = {k: v for k, v in (("revision", revision), ("token", token), ("cache_dir", cache_dir)) if v}
    config_file = _resolve(path, "config.json", hub_kwargs)
    if config_file is None:
        raise ValueError(f"No config.json in {path}.")
    with open(config_file) as f:
        config_dict = json.load(f)
    if config_dict.get("model_type") != CHATGLM_MODEL_TYPE:
        raise ValueError(f"{path} has model_type {config_dict.get('model_type')!r}, not {CHATGLM_MODEL_TYPE!r}.")
    _check_supported(config_dict)
    if rope_ratio_mode is None and float(config_dict.get("rope_ratio") or 1.0) != 1.0:
        modeling_file = _resolve(path, "modeling_chatglm.py", hub_kwargs)
        if modeling_file is not None:
            with open(modeling_file, encoding="utf-8") as f:  # read as text, never imported
                rope_ratio_mode = detect_rope_ratio_mode(f.read())
    glm_config = chatglm_to_glm_config(config_dict, rope_ratio_mode=rope_ratio_mode)
    state_dict = convert_chatglm_state_dict(read_chatglm_state_dict(path, allow_pickle, **hub_kwargs), config_dict)
    torch_dtype = _resolve_dtype(dtype, state_dict)
    logger.info("Converted the `chatglm` checkpoint %s to native `glm` without running its remote code.", path)
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    model = GlmForCausalLM.from_pretrained(
        None,
        config=glm_config,
        state_dict=state_dict,
        dtype=torch_dtype,
        **{k: v for k, v in placement.items() if v is not None},
    )
    model.name_or_path = path
    return model.eval()


def convert_chatglm_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    rope_ratio_mode: str | None = None,
    dtype=None,
    overwrite: bool = False,
) -> str:
    """Write a stock `glm` checkpoint (config.json + safetensors, no remote code) for a ChatGLM2/3 / GLM-4 one.

    The tokenizer is not copied: ChatGLM's tokenizers are themselves remote code. `dst_dir` is written atomically
    and never replaces a non-empty directory unless `overwrite=True` (see `output_dir.py`).

    Example:

    ```python
    >>> from optimum_prune.architectures.chatglm import convert_chatglm_checkpoint
    >>> convert_chatglm_checkpoint("path/to/chatglm3-6b", "chatglm3-6b-glm")
    'chatglm3-6b-glm'
    ```
    """
    check_output_directory(dst_dir, (src_dir,), overwrite)  # before the conversion reads anything
    model = load_chatglm_checkpoint(src_dir, allow_pickle=allow_pickle, rope_ratio_mode=rope_ratio_mode, dtype=dtype)
    with atomic_directory(dst_dir, (src_dir,), overwrite, checkpoint_bytes(model)) as tmp:
        model.save_pretrained(tmp)
    return os.fspath(dst_dir)


# No spec of its own: pruned as `glm` once converted, and not streamed (its shards are not `glm`'s).
register_family(CHATGLM_MODEL_TYPE, converter=load_chatglm_checkpoint)
