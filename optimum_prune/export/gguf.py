"""GGUF export for llama.cpp (and Ollama, LM Studio, llama-cpp-python), per-layer widths included.

llama.cpp reads `<arch>.attention.head_count`, `.head_count_kv` and `.feed_forward_length` either as one value or as
one entry per layer, and its `deci` graph (made for NVIDIA's pruned Nemotron-NAS models) builds every layer with its
own `n_head(il)`, `n_head_kv(il)` and `n_ff(il)`, the head size coming from `attention.key_length`. So (`FAMILIES`,
one entry per Transformers family, read from llama.cpp's src/models/<arch>.cpp and convert_hf_to_gguf.py):

- a uniform LLaMA / Mistral checkpoint (stock or `pruned_llama`, hidden channels and removed layers included) is
  written as llama.cpp's `llama` architecture, a uniform Qwen2 one as `qwen2`, Qwen3 as `qwen3` (per-head
  `attn_q_norm`/`attn_k_norm`), GLM-4 as `glm4`; Phi-3 as `phi3`, GLM as `chatglm` and BLOOM as `bloom` with MLP
  channels and removed layers only (their graphs size the query as the hidden size);
- a LLaMA-family checkpoint with per-layer widths (`per_layer_config`) as `deci`, with per-layer arrays; the other
  graphs build every layer with layer 0's widths, so per-layer checkpoints of the other families are refused.

Tensors get llama.cpp's names; the `llama` and `deci` graphs rotate pairs of adjacent head channels while
Transformers rotates the two halves of a head, so q/k rows (and biases) are permuted the way llama.cpp's own
converter does (`qwen2`, `qwen3` and `phi3` rotate halves, GLM's Transformers code interleaved pairs: no permutation);
BLOOM's fused per-head [q, k, v] rows are regrouped as llama.cpp's converter does. Written with the `gguf` package
(llama.cpp's Python writer). What llama.cpp cannot run is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ..errors import PruneInputError
from ..inputs import read_json_object
from .gguf_vocab import add_tokenizer, token_texts


logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# What families without a llama.cpp mapping here need, for the refusal message.
_STOCK_ONLY = (
    "not mapped here yet, so prune with uniform=True (the output keeps a stock config) and convert that with "
    "llama.cpp's convert_hf_to_gguf.py"
)
_OTHER_FAMILIES = {
    "opt": "llama.cpp has no OPT architecture",
    "gemma2": _STOCK_ONLY,
    "gemma3_text": _STOCK_ONLY,
}
# Transformers module (under `model.layers.N.`) -> llama.cpp tensor (under `blk.N.`), as llama.cpp's
# gguf-py/gguf/tensor_mapping.py maps them.
_LLAMA_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = MappingProxyType(
    {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
)


@dataclass(frozen=True)
class GGUFFamily:
    """How one Transformers family maps onto llama.cpp (read from its src/models/<arch>.cpp and convert_hf_to_gguf.py).

    `arch`: the llama.cpp architecture of stock-shaped (uniform) checkpoints. `per_layer_arch`: the one for per-layer
    widths, None where no llama.cpp graph runs the family with per-layer widths (refused, naming uniform=True).
    `tensors`: layer module -> llama.cpp tensor. `biases`: the modules whose bias llama.cpp loads (None: all of
    `tensors`). `permute_qk`: llama.cpp's graph rotates adjacent pairs of head channels (NORM rope) where Transformers'
    code for the family rotates the two halves of a head, so q/k rows are permuted as the converter does for LLaMA;
    False where both rotate the same channels (NEOX-rope graphs, and GLM, whose Transformers code rotates interleaved
    pairs). `full_query_width`: the graph sizes the query and attention output as the hidden size (head pruning cannot
    run). `extra_hparams`: family keys its converter writes beyond the common ones.

    For families not laid out as LLaMA: `layers` (the decoder layers' prefix), `global_tensors` (full names),
    `config_aliases` (the family's config field -> the common name, per-layer overrides included), `config_defaults`
    (fields the config leaves implicit), `activation` (the `hidden_act` the graph computes; None: fixed, not read),
    `norm` ("rms" or "layer": which epsilon key), `rotary` (rope keys written), `transforms` (layer module ->
    f(array, heads), rows reordered into llama.cpp's layout), `check` (f(config, heads) raising what else the graph
    cannot run)."""

    name: str
    arch: str
    tensors: Mapping
    per_layer_arch: str | None = None
    biases: frozenset | None = None
    permute_qk: bool = False
    full_query_width: bool = False
    extra_hparams: Callable | None = None
    layers: str = "model.layers"
    global_tensors: Mapping = field(default_factory=lambda: _GLOBAL_TENSORS)
    config_aliases: Mapping = field(default_factory=dict)
    config_defaults: Callable | None = None
    activation: str | None = "silu"
    norm: str = "rms"
    rotary: bool = True
    transforms: Mapping = field(default_factory=dict)
    check: Callable | None = None


def _phi3_hparams(writer, config: dict) -> None:
    """Phi3MiniModel.set_gguf_parameters: the pre-scaling context (read for rope scaling) is written too."""
    original = config.get("original_max_position_embeddings") or _rope_settings(config).get(
        "original_max_position_embeddings"
    )
    if original:
        writer.add_rope_scaling_orig_ctx_len(int(original))


def bloom_qkv_to_llama_cpp(array: np.ndarray, heads: int) -> np.ndarray:
    """BLOOM's query_key_value rows (or bias), per head [q, k, v], as llama.cpp's attn_qkv: all query rows, then all
    key rows, then all value rows (BloomModel.modify_tensors in llama.cpp's converter)."""
    rows = array.shape[0]
    return array.reshape(heads, 3, rows // heads // 3, *array.shape[1:]).swapaxes(0, 1).reshape(array.shape)


def _check_bloom_alibi(config: dict, heads: list[int]) -> None:
    """A `pruned_bloom` keeps its heads' original ALiBi slopes; llama.cpp computes them from the head count."""
    original = config.get("alibi_num_heads") or heads[0]
    indices = config.get("alibi_head_indices") or [list(range(original))] * len(heads)
    if original != heads[0] or any(list(kept) != list(range(original)) for kept in indices):
        raise PruneInputError(
            "GGUF export: this BLOOM checkpoint's heads keep their original ALiBi slopes, and llama.cpp's `bloom` "
            "graph computes slopes from the head count; prune structures=['mlp_channels'] or ['layers'] for llama.cpp."
        )


_LLAMA = GGUFFamily("LLaMA", "llama", _LLAMA_TENSORS, per_layer_arch="deci", permute_qk=True)
FAMILIES = {
    "llama": _LLAMA,
    "mistral": dataclasses.replace(_LLAMA, name="Mistral"),
    # Uniform Qwen2 runs as llama.cpp's `qwen2` (NEOX rope); per-layer widths as `deci`, which rotates pairs.
    "qwen2": dataclasses.replace(_LLAMA, name="Qwen2", arch="qwen2", permute_qk=False),
    # llama.cpp's `qwen3` graph: per-head attn_q_norm/attn_k_norm before NEOX rope, q/k/v biases optional, no output
    # bias; every layer built with layer 0's head counts and MLP width.
    "qwen3": GGUFFamily(
        "Qwen3",
        "qwen3",
        {**_LLAMA_TENSORS, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
        biases=frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
    ),
    # llama.cpp's `phi3` graph: fused attn_qkv (query, key, value rows, as Transformers' qkv_proj) and fused ffn_up
    # (gate rows then up rows, SwiGLU over the halves, as gate_up_proj); NEOX rope; no biases; query width and
    # attention output sized as the hidden size.
    "phi3": GGUFFamily(
        "Phi-3",
        "phi3",
        {
            "input_layernorm": "attn_norm",
            "self_attn.qkv_proj": "attn_qkv",
            "self_attn.o_proj": "attn_output",
            "post_attention_layernorm": "ffn_norm",
            "mlp.gate_up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
        },
        biases=frozenset(),
        full_query_width=True,
        extra_hparams=_phi3_hparams,
    ),
    # llama.cpp's `chatglm` graph, which its converter uses for Transformers' GlmForCausalLM (GLM-4-9B-chat-hf): fused
    # ffn_up, q/k/v biases, NORM rope over half of each head (Transformers' GLM rotates interleaved pairs too), and the
    # attention output sized as the hidden size.
    "glm": GGUFFamily(
        "GLM",
        "chatglm",
        {
            **{module: name for module, name in _LLAMA_TENSORS.items() if not module.startswith("mlp.")},
            "mlp.gate_up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
        },
        biases=frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
        full_query_width=True,
    ),
    # llama.cpp's `glm4` graph (GLM-4-0414): norms after attention and MLP too, fused ffn_up, q/k/v biases, NORM rope
    # over the first half of each head (Transformers' GLM-4 rotates interleaved pairs too: no permutation).
    "glm4": GGUFFamily(
        "GLM-4",
        "glm4",
        {
            **{module: name for module, name in _LLAMA_TENSORS.items() if not module.startswith("mlp.")},
            "post_self_attn_layernorm": "post_attention_norm",
            "post_attention_layernorm": "ffn_norm",
            "mlp.gate_up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
            "post_mlp_layernorm": "post_ffw_norm",
        },
        biases=frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
    ),
    # llama.cpp's `bloom` graph: LayerNorms with biases (the embedding one too), fused attn_qkv, GELU MLP with biases,
    # ALiBi slopes computed from the head count, query and attention output sized as the hidden size. So MLP channels
    # and removed layers run; pruned heads (which keep their original slopes) and hidden channels do not.
    "bloom": GGUFFamily(
        "BLOOM",
        "bloom",
        {
            "input_layernorm": "attn_norm",
            "self_attention.query_key_value": "attn_qkv",
            "self_attention.dense": "attn_output",
            "post_attention_layernorm": "ffn_norm",
            "mlp.dense_h_to_4h": "ffn_up",
            "mlp.dense_4h_to_h": "ffn_down",
        },
        full_query_width=True,
        layers="transformer.h",
        global_tensors=MappingProxyType(
            {
                "transformer.word_embeddings.weight": "token_embd.weight",
                "transformer.word_embeddings_layernorm.weight": "token_embd_norm.weight",
                "transformer.word_embeddings_layernorm.bias": "token_embd_norm.bias",
                "transformer.ln_f.weight": "output_norm.weight",
                "transformer.ln_f.bias": "output_norm.bias",
                "lm_head.weight": "output.weight",
            }
        ),
        config_aliases=MappingProxyType({"n_head": "num_attention_heads", "n_layer": "num_hidden_layers"}),
        config_defaults=lambda config: {"intermediate_size": 4 * int(config["hidden_size"])},
        activation=None,
        norm="layer",
        rotary=False,
        transforms=MappingProxyType({"self_attention.query_key_value": bloom_qkv_to_llama_cpp}),
        check=_check_bloom_alibi,
    ),
}
_SUPPORTED = "LLaMA, Mistral, Qwen2, Qwen3, Phi-3, GLM, GLM-4 and BLOOM"


@dataclass
class GGUFLayout:
    """What llama.cpp needs to know about a checkpoint's shape: its architecture and every layer's widths."""

    arch: str
    family: str
    hidden_size: int
    head_dim: int
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    rope_dim: int = 0

    def __post_init__(self):
        self.rope_dim = self.rope_dim or self.head_dim

    @property
    def spec(self) -> GGUFFamily:
        return FAMILIES[self.family]

    @property
    def per_layer(self) -> bool:
        return self.arch == self.spec.per_layer_arch

    @property
    def permutes_rotary(self) -> bool:
        """q/k rows permuted: the family's own graph rotates pairs where Transformers rotates halves, or per-layer
        widths run on `deci` (pairs)."""
        return self.spec.permute_qk or self.per_layer


def normalized_config(config: dict) -> dict:
    """The config with the family's own field names (BLOOM's `n_head`, `n_layer`) under the common ones, per-layer
    overrides included, and its implicit fields filled in; refuses families llama.cpp cannot run as exported."""
    spec = FAMILIES[_family(config)]
    if not spec.config_aliases and spec.config_defaults is None:
        return config
    out = {spec.config_aliases.get(key, key): value for key, value in config.items()}
    if config.get("per_layer_config"):
        out["per_layer_config"] = {
            layer: {spec.config_aliases.get(key, key): value for key, value in fields.items()}
            for layer, fields in config["per_layer_config"].items()
        }
    if spec.config_defaults is not None:
        for key, value in spec.config_defaults(out).items():
            if out.get(key) is None:
                out[key] = value
    return out


def gguf_layout(config: dict) -> GGUFLayout:
    """The llama.cpp architecture and per-layer widths of a checkpoint's config.json, or one line saying why
    llama.cpp cannot run it and what would."""
    config = normalized_config(config)
    family = _family(config)
    spec = FAMILIES[family]
    num_layers = int(config["num_hidden_layers"])
    overrides = {int(k): v for k, v in (config.get("per_layer_config") or {}).items()}

    def widths(key):
        return [int(overrides.get(i, {}).get(key, config[key])) for i in range(num_layers)]

    heads = widths("num_attention_heads")
    kv_heads = [
        int(overrides.get(i, {}).get("num_key_value_heads", config.get("num_key_value_heads") or h))
        for i, h in enumerate(heads)
    ]
    ffn = widths("intermediate_size")
    _check_widths(heads, kv_heads, ffn)
    uniform = len(set(heads)) == 1 and len(set(kv_heads)) == 1 and len(set(ffn)) == 1
    if not uniform and spec.per_layer_arch is None:
        raise PruneInputError(
            f"GGUF export: llama.cpp's `{spec.arch}` graph builds every layer with one set of widths, and this "
            f"{spec.name} checkpoint's layers differ (per_layer_config); prune with uniform=True for a stock-shaped "
            "checkpoint llama.cpp runs."
        )
    arch = spec.arch if uniform else spec.per_layer_arch
    if spec.check is not None:
        spec.check(config, heads)
    hidden_size = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden_size // int(config["num_attention_heads"]))
    if spec.full_query_width and heads[0] * head_dim != hidden_size:
        raise PruneInputError(
            f"GGUF export: llama.cpp's `{spec.arch}` graph sizes the query and attention output as the hidden size "
            f"({hidden_size}), and this {spec.name} checkpoint's are {heads[0]} heads x {head_dim}; prune "
            "structures=['mlp_channels'] or ['layers'] for llama.cpp (attention heads and hidden channels change it)."
        )
    rope_dim = int(head_dim * float(_rope_settings(config).get("partial_rotary_factor", 1.0))) if spec.rotary else 0
    return GGUFLayout(arch, family, hidden_size, head_dim, heads, kv_heads, ffn, rope_dim)


def _family(config: dict) -> str:
    """The base family of a stock or `pruned_*` config; refuses families llama.cpp cannot run as exported."""
    model_type = config.get("model_type")
    family = config.get("base_model_type") or str(model_type).removeprefix("pruned_")
    if family in FAMILIES:
        activation = FAMILIES[family].activation
        if activation is not None and config.get("hidden_act", activation) != activation:
            raise PruneInputError(
                f"GGUF export needs `hidden_act` {activation} (llama.cpp's {FAMILIES[family].arch} graph), got "
                f"{config.get('hidden_act')!r}."
            )
        return family
    reason = _OTHER_FAMILIES.get(family, "this exporter does not know it")
    raise PruneInputError(
        f"GGUF export supports {_SUPPORTED} checkpoints (stock and pruned; per-layer widths for LLaMA, Mistral and "
        f"Qwen2), not `{model_type}`: {reason}."
    )


def _check_widths(heads: list[int], kv_heads: list[int], ffn: list[int]) -> None:
    """llama.cpp's `deci` graph drops a layer's attention output when its MLP width is 0, and needs whole KV groups."""
    for index, (n_head, n_kv, n_ff) in enumerate(zip(heads, kv_heads, ffn)):
        if n_head <= 0 or n_kv <= 0 or n_ff <= 0:
            raise PruneInputError(
                f"Layer {index} has {n_head} query heads, {n_kv} KV heads and {n_ff} MLP channels; GGUF export needs "
                "at least one of each in every layer (remove whole layers with structures=['layers'] instead)."
            )
        if n_head % n_kv:
            raise PruneInputError(f"Layer {index}: {n_head} query heads are not a multiple of {n_kv} KV heads.")


def permute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Rows of a q/k projection (or bias) reordered from Transformers' rotate-half layout to llama.cpp's adjacent
    pairs: within each head, row j of the first half and row j of the second half become rows 2j and 2j+1."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of `permute_rotary` (llama.cpp's layout back to Transformers')."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _layer_tensor(hf_name: str, spec: GGUFFamily) -> tuple[int, str, str] | None:
    """(layer index, module, weight/bias) of a decoder-layer tensor name, None for other names."""
    prefix = spec.layers.split(".")
    parts = hf_name.split(".")
    if len(parts) < len(prefix) + 3 or parts[: len(prefix)] != prefix or not parts[len(prefix)].isdigit():
        return None
    return int(parts[len(prefix)]), ".".join(parts[len(prefix) + 1 : -1]), parts[-1]


def gguf_tensor_name(hf_name: str, family: str = "llama") -> str | None:
    """llama.cpp's name for a Transformers tensor name of `family`; None for buffers llama.cpp recomputes (rotary
    inv_freq). Refuses tensors llama.cpp's graph for the family would not load."""
    spec = FAMILIES[family]
    if hf_name in spec.global_tensors:
        return spec.global_tensors[hf_name]
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    found = _layer_tensor(hf_name, spec)
    if found is not None:
        layer, module, kind = found
        if module in spec.tensors and kind == "bias" and spec.biases is not None and module not in spec.biases:
            raise PruneInputError(
                f"GGUF export: llama.cpp's `{spec.arch}` graph has no bias on `{module}` (`{hf_name}`); prune "
                "without output-bias compensation for llama.cpp."
            )
        if module in spec.tensors and kind in ("weight", "bias"):
            return f"blk.{layer}.{spec.tensors[module]}.{kind}"
    modules = ", ".join(sorted(spec.tensors))
    others = ", ".join(sorted(spec.global_tensors))
    raise PruneInputError(
        f"GGUF export does not know the tensor `{hf_name}` (a {spec.name} checkpoint has {spec.layers}.N.{{{modules}}} "
        f"and {others})."
    )


def _to_llama_cpp_rows(hf_name: str, array: np.ndarray, layout: GGUFLayout) -> np.ndarray:
    """A tensor's rows in llama.cpp's layout: q/k permuted for pair-rotating graphs, the family's transforms."""
    found = _layer_tensor(hf_name, layout.spec)
    if found is None:
        return array
    layer, module, _ = found
    if layout.permutes_rotary and module in ("self_attn.q_proj", "self_attn.k_proj"):
        array = permute_rotary(array, layout.heads[layer] if module == "self_attn.q_proj" else layout.kv_heads[layer])
    if module in layout.spec.transforms:
        array = layout.spec.transforms[module](array, layout.heads[layer])
    return array


def _rope_settings(config: dict) -> dict:
    """Rotary base and scaling from `rope_parameters` (Transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
    params = dict(config.get("rope_parameters") or {})
    if not params:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise PruneInputError(f"GGUF export supports rotary scaling default, linear and llama3, not {rope_type!r}.")
    params["rope_type"] = rope_type
    return params


def _llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor for Llama 3.1's frequency-dependent scaling (one factor per rotary pair)."""
    base = float(params.get("rope_theta", 10000.0))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_context = float(params.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _write_hparams(writer, config: dict, layout: GGUFLayout, outtype: str, name: str) -> None:
    """Hyper-parameters: per-layer arrays for `deci`, single values otherwise."""
    import gguf

    def per_layer(values):
        return values if layout.per_layer else values[0]

    writer.add_name(name)
    writer.add_block_count(len(layout.heads))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(layout.hidden_size)
    writer.add_feed_forward_length(per_layer(layout.ffn))
    writer.add_head_count(per_layer(layout.heads))
    writer.add_head_count_kv(per_layer(layout.kv_heads))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    if layout.spec.norm == "rms":
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    else:
        writer.add_layer_norm_eps(float(config["layer_norm_epsilon"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    if layout.spec.rotary:
        rope = _rope_settings(config)
        writer.add_rope_dimension_count(layout.rope_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
    if layout.spec.extra_hparams is not None:
        layout.spec.extra_hparams(writer, config)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _encode(name: str, array: np.ndarray, outtype: str) -> tuple[np.ndarray, object]:
    """The tensor data in the output type (1-D tensors stay float32, as llama.cpp's converter keeps them); a matrix
    whose rows do not split into q8_0 blocks of 32 falls back to f16, as llama.cpp's converter does."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or outtype == "f32":
        return array, None
    if outtype == "f16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        logger.info("%s: %d columns do not split into %s blocks; written as f16.", name, array.shape[-1], outtype)
        return array.astype(np.float16), None


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PruneInputError(f"{model_dir} has no *.safetensors weights; GGUF export reads safetensors checkpoints.")
    return files


def _check_tensor_names(model_dir: Path, family: str) -> None:
    """Every tensor has a llama.cpp name for the family (read from the shards' headers, before anything is written)."""
    from safetensors import safe_open

    for file in _safetensors_files(model_dir):
        with safe_open(file, framework="pt") as shard:
            for hf_name in shard.keys():
                gguf_tensor_name(hf_name, family)


def _checkpoint_tensors(model_dir: Path):
    """(name, float32 array) for every tensor of the checkpoint's safetensors shards."""
    from safetensors import safe_open

    for file in _safetensors_files(model_dir):
        with safe_open(file, framework="pt") as shard:
            for hf_name in shard.keys():
                yield hf_name, shard.get_tensor(hf_name).float().numpy()


def _add_tensors(writer, model_dir: Path, layout: GGUFLayout, config: dict, outtype: str) -> None:
    """Every tensor under its llama.cpp name, its rows in llama.cpp's layout."""
    seen = set()
    for hf_name, array in _checkpoint_tensors(model_dir):
        name = gguf_tensor_name(hf_name, layout.family)
        if name is None:
            continue
        array = _to_llama_cpp_rows(hf_name, array, layout)
        data, raw_dtype = _encode(name, array, outtype)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        seen.add(name)
    if "output.weight" not in seen and not config.get("tie_word_embeddings", False):
        raise PruneInputError(f"{model_dir} has no lm_head.weight and `tie_word_embeddings` is false.")
    rope = _rope_settings(config)
    if layout.spec.rotary and rope["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope, layout.rope_dim))


def _warn_sliding_window(config: dict) -> None:
    """llama.cpp's `llama`/`qwen2` graphs attend to the whole context; Transformers honours a sliding window."""
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", config.get("model_type") != "qwen2")
    if window and uses_window and int(window) < int(config.get("max_position_embeddings", 0)):
        logger.warning(
            "The checkpoint's sliding window (%s tokens) is not written: llama.cpp attends to the whole "
            "context, so outputs differ past %s tokens.",
            window,
            window,
        )


def export_gguf(model_dir, output_path, outtype: str = "f32", overwrite: bool = False) -> Path:
    """Write the checkpoint in `model_dir` (stock or pruned LLaMA / Mistral / Qwen2, per-layer widths included;
    stock-shaped Qwen3, Phi-3, GLM, GLM-4 and BLOOM) as one GGUF file for llama.cpp, with its tokenizer. Returns the written path.

    `outtype`: f32 (exact), f16, bf16 or q8_0 (matrices only; norms stay f32). An existing file is replaced only
    with `overwrite=True`; the file is written beside its target and renamed into place, so a failed export leaves
    nothing behind."""
    if outtype not in OUTTYPES:
        raise PruneInputError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}.")
    model_dir, output_path = Path(model_dir), Path(output_path)
    _check_output(output_path, overwrite)
    config = normalized_config(
        read_json_object(model_dir / "config.json", "a checkpoint's config.json holds an object")
    )
    layout = gguf_layout(config)
    _check_tensor_names(model_dir, layout.family)
    _warn_sliding_window(config)
    gguf = _import_gguf()
    handle, temporary = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".tmp", dir=output_path.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(temporary, layout.arch)
        _write_hparams(writer, config, layout, outtype, _model_name(model_dir))
        add_tokenizer(writer, model_dir, int(config["vocab_size"]))
        _add_tensors(writer, model_dir, layout, config, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates the file private; a written file is not
        os.replace(temporary, output_path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    logger.info("Wrote %s (llama.cpp architecture `%s`, %s).", output_path, layout.arch, outtype)
    return output_path


# llama-vocab.cpp sets per-token attributes by `general.name`: for a name containing "phi-3" or "phi3" it looks these
# tokens up by text and fails to load the file when one is missing.
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
_PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _model_name(model_dir: Path) -> str:
    """`general.name`: the checkpoint directory's name, less "phi3" / "phi-3" when the vocabulary lacks the tokens
    llama.cpp then looks up (a Phi-3 name on another tokenizer would make the file fail to load)."""
    name = model_dir.resolve().name
    if _PHI3_NAME.search(name) and (model_dir / "tokenizer.json").is_file():
        missing = [token for token in _PHI3_NAME_TOKENS if token not in token_texts(model_dir)]
        if missing:
            renamed = _PHI3_NAME.sub("phi", name)
            logger.warning(
                "general.name written as %r, not %r: for a name with phi3 llama.cpp looks up %s, which this "
                "tokenizer lacks, and would not load the file.",
                renamed,
                name,
                ", ".join(missing),
            )
            name = renamed
    return name


def _check_output(output_path: Path, overwrite: bool) -> None:
    if output_path.is_dir():
        raise PruneInputError(f"{output_path} is a directory; give the path of the .gguf file to write.")
    if output_path.exists() and not overwrite:
        raise PruneInputError(f"{output_path} exists; pass --overwrite (overwrite=True) to replace it.")
    if not output_path.parent.is_dir():
        raise PruneInputError(f"{output_path.parent} is not a directory; create it first.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _import_gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "GGUF export needs the `gguf` package (llama.cpp's writer): pip install 'optimum-prune[gguf]'."
        ) from None
    return gguf
