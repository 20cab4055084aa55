"""How each Transformers family maps onto llama.cpp (`FAMILIES`), read from llama.cpp's src/models/<arch>.cpp and
convert_hf_to_gguf.py (conversion/*.py): architecture, tensor names, what its graph cannot run, extra metadata.

The writer (`gguf.py`) only reads this table, so a family is one entry here plus, where its graph needs them, a check
(what it refuses) and a metadata hook.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from ..errors import PruneInputError


# What families without a llama.cpp mapping here need, for the refusal message.
OTHER_FAMILIES = {"opt": "llama.cpp has no OPT architecture"}
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
_LLAMA_ATTENTION = {module: name for module, name in _LLAMA_TENSORS.items() if not module.startswith("mlp.")}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_QKV_BIASES = frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"})
_GLOBAL_TENSORS = MappingProxyType(
    {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
)


@dataclass(frozen=True)
class GGUFExperts:
    """A sparse MLP's experts, which llama.cpp stores stacked: one [experts, rows, columns] tensor per projection.

    `count` / `width`: the config fields with the number of experts and each expert's intermediate size (llama.cpp
    reads one of each for every layer). `per_expert`: Transformers' per-expert module, the expert index as `{}`, ->
    llama.cpp's stacked tensor (stock checkpoints: Transformers 5 saves them in this layout). `fused`: Transformers
    5's fused 3-D parameters (as `pruned_*` checkpoints store them) -> the llama.cpp tensors their equal row blocks
    become (gate_up_proj: gate rows, then up rows)."""

    count: str
    width: str
    per_expert: Mapping
    fused: Mapping


@dataclass(frozen=True)
class GGUFFamily:
    """How one Transformers family maps onto llama.cpp.

    `arch`: the llama.cpp architecture of stock-shaped (uniform) checkpoints. `per_layer_arch`: the one for per-layer
    widths, None where no llama.cpp graph runs the family with per-layer widths (refused, naming uniform=True).
    `tensors`: layer module -> llama.cpp tensor. `biases`: the modules whose bias llama.cpp loads (None: all of
    `tensors`). `permute_qk`: llama.cpp's graph rotates adjacent pairs of head channels (NORM rope) where Transformers'
    code for the family rotates the two halves of a head, so q/k rows are permuted as the converter does for LLaMA;
    False where both rotate the same channels (NEOX-rope graphs, and GLM, whose Transformers code rotates interleaved
    pairs). `full_query_width`: the graph sizes the query and attention output as the hidden size (head pruning cannot
    run). `extra_hparams`: f(writer, config, layout) writing the family keys its converter writes beyond the common
    ones.

    For families not laid out as LLaMA: `layers` (the decoder layers' prefix), `global_tensors` (full names; None:
    not written), `config_aliases` (the family's config field -> the common name, per-layer overrides included),
    `config_defaults` (fields the config leaves implicit), `activation` and `activation_field` (the activation the
    graph computes and the config field naming it; None: fixed, not read), `norm` ("rms" or "layer": which epsilon
    key), `norm_offset` (Transformers' norms scale by offset + weight, llama.cpp's by the stored weight: added to every
    `*norm.weight`, as the converter does for Gemma), `rotary` (rope keys written), `transforms` (layer module ->
    f(array, heads), rows reordered into llama.cpp's layout), `query_scale` (f(config, layout): the factor that turns
    the attention scale llama.cpp's graph applies into Transformers', folded into the rows of `query_scale_module`),
    `experts` (a sparse MLP's experts), `sliding_window` (the graph runs the config's sliding window, written by
    `extra_hparams`), `check` (f(config, heads) raising what else the graph cannot run)."""

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
    activation_field: str = "hidden_act"
    norm: str = "rms"
    norm_offset: float = 0.0
    rotary: bool = True
    transforms: Mapping = field(default_factory=dict)
    query_scale: Callable | None = None
    query_scale_module: str = "self_attn.q_proj"
    experts: GGUFExperts | None = None
    sliding_window: bool = False
    check: Callable | None = None

    @property
    def uniform_fields(self) -> tuple[str, ...]:
        """Config fields llama.cpp's graph reads once for every layer, beyond heads and MLP width."""
        return (self.experts.count, self.experts.width) if self.experts is not None else ()


def rope_settings(config: dict) -> dict:
    """Rotary base and scaling from `rope_parameters` (Transformers 5; the full-attention layers' where sliding
    layers have their own, as Gemma 3's) or `rope_theta`/`rope_scaling` (4.x)."""
    params = dict(config.get("rope_parameters") or {})
    params = dict(params.get("full_attention", params))
    if not params:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise PruneInputError(f"GGUF export supports rotary scaling default, linear and llama3, not {rope_type!r}.")
    params["rope_type"] = rope_type
    return params


def sliding_rope_theta(config: dict) -> float | None:
    """The sliding-window layers' own rotary base (Gemma 3: `rope_parameters["sliding_attention"]`, 4.x:
    `rope_local_base_freq`), None where they share the others'."""
    sliding = (config.get("rope_parameters") or {}).get("sliding_attention")
    if sliding is not None:
        if (sliding.get("rope_type") or "default") != "default":
            raise PruneInputError("GGUF export: llama.cpp scales no sliding-window layer's rotary embedding.")
        return float(sliding.get("rope_theta", 10000.0))
    local = config.get("rope_local_base_freq")
    return None if local is None else float(local)


def _phi3_hparams(writer, config: dict, layout) -> None:
    """Phi3MiniModel.set_gguf_parameters: the pre-scaling context (read for rope scaling) is written too."""
    original = config.get("original_max_position_embeddings") or rope_settings(config).get(
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


def _gemma_hparams(writer, config: dict, layout) -> None:
    """Gemma2Model / Gemma3Model.set_gguf_parameters: soft-capping, the sliding window and which layers use it (one
    flag per layer from `layer_types`, so removed layers keep their kinds), the sliding layers' rotary base."""
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    window = config.get("sliding_window")
    sliding = [kind == "sliding_attention" and bool(window) for kind in config.get("layer_types") or ()]
    if any(sliding):
        writer.add_sliding_window(int(window))
    if sliding:
        writer.add_sliding_window_pattern(sliding)
    if (theta := sliding_rope_theta(config)) is not None:
        writer.add_rope_freq_base_swa(theta)


def _gemma_query_scale(large_layer_count: int) -> Callable:
    """llama.cpp's gemma graphs scale queries by 1/sqrt(head_dim), or 1/sqrt(hidden // heads) for the layer count of
    the 27B model; Transformers by 1/sqrt(query_pre_attn_scalar). The ratio is folded into the query rows."""

    def scale(config: dict, layout) -> float:
        used = layout.hidden_size // layout.heads[0] if len(layout.heads) == large_layer_count else layout.head_dim
        return math.sqrt(used / float(config.get("query_pre_attn_scalar") or layout.head_dim))

    return scale


def _check_gemma(attention_softcapping: bool) -> Callable:
    """What llama.cpp's gemma2 (`attention_softcapping`) or gemma3 graph cannot express: gemma2 always soft-caps
    attention and final logits and reads the embeddings as its output layer; gemma3 never soft-caps attention."""

    def check(config: dict, heads: list[int]) -> None:
        name = "gemma2" if attention_softcapping else "gemma3"
        capped = [key for key in ("attn_logit_softcapping", "final_logit_softcapping") if config.get(key)]
        if attention_softcapping and len(capped) < 2:
            raise PruneInputError(
                f"GGUF export: llama.cpp's `{name}` graph always soft-caps attention and final logits, and this "
                "checkpoint leaves attn_logit_softcapping or final_logit_softcapping unset; only Gemma 2 with both (as "
                "released) runs."
            )
        if attention_softcapping and not config.get("tie_word_embeddings", True):
            raise PruneInputError(
                f"GGUF export: llama.cpp's `{name}` graph reads the embeddings as its output layer, and this "
                "checkpoint's lm_head is separate (tie_word_embeddings is false); only tied Gemma 2 runs."
            )
        if not attention_softcapping and config.get("attn_logit_softcapping"):
            raise PruneInputError(
                f"GGUF export: llama.cpp's `{name}` graph has no attention soft-capping, and this checkpoint sets "
                f"attn_logit_softcapping={config['attn_logit_softcapping']}; only Gemma 3 without it (as released) runs."
            )
        kinds = config.get("layer_types")
        if kinds is not None and len(kinds) != len(heads):
            raise PruneInputError(f"The config lists {len(kinds)} layer_types for {len(heads)} layers.")
        if (
            attention_softcapping
            and kinds is not None
            and not ("sliding_attention" in kinds and config["sliding_window"])
        ):
            raise PruneInputError(
                f"GGUF export: llama.cpp's `{name}` graph needs a sliding-window layer (its cache fails without one), "
                "and this checkpoint has none; keep one when removing layers (structures=['layers'])."
            )

    return check


def _moe_hparams(writer, config: dict, layout) -> None:
    """Expert counts and widths (TextModel / Qwen2MoeModel.set_gguf_parameters), from the pruned config."""
    experts = layout.spec.experts
    writer.add_expert_count(layout.widths[experts.count])
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_expert_feed_forward_length(layout.widths[experts.width])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))


def _check_moe(renormalizes: bool) -> Callable:
    """What llama.cpp's MoE graphs fix: every layer sparse, top-k weights renormalised (`renormalizes`: qwen3moe and
    Mixtral's llama) or not (qwen2moe), one epsilon for every norm."""

    def check(config: dict, heads: list[int]) -> None:
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step") or 1) != 1:
            raise PruneInputError(
                "GGUF export: llama.cpp's MoE graphs make every layer sparse, and this checkpoint has dense MLP layers "
                "(mlp_only_layers / decoder_sparse_step); only checkpoints whose every layer is sparse run."
            )
        if bool(config.get("norm_topk_prob", renormalizes)) != renormalizes:
            state = "renormalises" if renormalizes else "does not renormalise"
            raise PruneInputError(
                f"GGUF export: llama.cpp's graph for this family {state} the top-k expert weights, and this "
                f"checkpoint sets norm_topk_prob={config.get('norm_topk_prob')}; only norm_topk_prob={renormalizes} runs."
            )
        eps = config.get("head_norm_eps")
        if eps is not None and float(eps) != float(config["rms_norm_eps"]):
            raise PruneInputError(
                "GGUF export: llama.cpp uses one epsilon for every norm, and this checkpoint's q/k norms keep their "
                "own (head_norm_eps, from hidden-channel pruning); prune without hidden_channels for llama.cpp."
            )

    return check


_LLAMA = GGUFFamily("LLaMA", "llama", _LLAMA_TENSORS, per_layer_arch="deci", permute_qk=True)
_MIXTRAL_W = {"w1": "gate", "w3": "up", "w2": "down"}  # Mixtral's per-expert names
_GEMMA_TENSORS = {
    **_LLAMA_ATTENTION,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# llama.cpp's `gemma2` graph: (1 + w) norms stored as 1 + w, before and after each branch; embeddings scaled by
# sqrt(hidden) (hidden-channel pruning sets Transformers' scale to sqrt(H') too), tied output, NEOX rope, GELU (tanh),
# attention and final soft-capping, sliding-window layers per flag; every layer built with layer 0's widths.
_GEMMA2 = GGUFFamily(
    "Gemma 2",
    "gemma2",
    _GEMMA_TENSORS,
    biases=_QKV_BIASES,
    extra_hparams=_gemma_hparams,
    global_tensors=MappingProxyType({**_GLOBAL_TENSORS, "lm_head.weight": None}),
    activation="gelu_pytorch_tanh",
    activation_field="hidden_activation",
    norm_offset=1.0,
    query_scale=_gemma_query_scale(46),
    sliding_window=True,
    check=_check_gemma(attention_softcapping=True),
)


def _moe_family(base: GGUFFamily, name: str, arch: str, router: tuple, experts: GGUFExperts, **changes):
    """`base`'s attention with a sparse MLP block in place of the dense MLP: `router` (its modules, as stored and as
    Transformers 5 names it) as llama.cpp's ffn_gate_inp, `experts` stacked."""
    tensors = {module: tensor for module, tensor in base.tensors.items() if not module.startswith("mlp.")}
    tensors.update({module: "ffn_gate_inp" for module in router}, **changes.pop("tensors", {}))
    return dataclasses.replace(
        base,
        name=name,
        arch=arch,
        tensors=tensors,
        per_layer_arch=None,
        experts=experts,
        extra_hparams=_moe_hparams,
        **changes,
    )


_FUSED_EXPERTS = MappingProxyType(
    {"mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "mlp.experts.down_proj": ("ffn_down_exps",)}
)
_QWEN_EXPERTS = GGUFExperts(
    "num_experts",
    "moe_intermediate_size",
    {f"mlp.experts.{{}}.{proj}_proj": f"ffn_{proj}_exps" for proj in ("gate", "up", "down")},
    _FUSED_EXPERTS,
)
_QWEN3 = GGUFFamily("Qwen3", "qwen3", {**_LLAMA_TENSORS, **_QK_NORMS}, biases=_QKV_BIASES)
_QWEN2 = dataclasses.replace(_LLAMA, name="Qwen2", arch="qwen2", permute_qk=False)
_QWEN_MOE_ALIASES = MappingProxyType({"num_local_experts": "num_experts"})

FAMILIES = {
    "llama": _LLAMA,
    "mistral": dataclasses.replace(_LLAMA, name="Mistral"),
    # Uniform Qwen2 runs as llama.cpp's `qwen2` (NEOX rope); per-layer widths as `deci`, which rotates pairs.
    "qwen2": _QWEN2,
    # llama.cpp's `qwen3` graph: per-head attn_q_norm/attn_k_norm before NEOX rope, q/k/v biases optional, no output
    # bias; every layer built with layer 0's head counts and MLP width.
    "qwen3": _QWEN3,
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
        {**_LLAMA_ATTENTION, "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
        biases=_QKV_BIASES,
        full_query_width=True,
    ),
    # llama.cpp's `glm4` graph (GLM-4-0414): norms after attention and MLP too, fused ffn_up, q/k/v biases, NORM rope
    # over the first half of each head (Transformers' GLM-4 rotates interleaved pairs too: no permutation).
    "glm4": GGUFFamily(
        "GLM-4",
        "glm4",
        {
            **_LLAMA_ATTENTION,
            "post_self_attn_layernorm": "post_attention_norm",
            "post_attention_layernorm": "ffn_norm",
            "mlp.gate_up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
            "post_mlp_layernorm": "post_ffw_norm",
        },
        biases=_QKV_BIASES,
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
    "gemma2": _GEMMA2,
    # llama.cpp's `gemma3` graph: Gemma 2's, plus per-head attn_q_norm/attn_k_norm (1 + w too, carrying the query
    # scale), an optional separate output, no attention soft-capping, the sliding layers' own rotary base.
    "gemma3_text": dataclasses.replace(
        _GEMMA2,
        name="Gemma 3",
        arch="gemma3",
        tensors={**_GEMMA_TENSORS, **_QK_NORMS},
        global_tensors=_GLOBAL_TENSORS,
        query_scale=_gemma_query_scale(62),
        query_scale_module="self_attn.q_norm",
        check=_check_gemma(attention_softcapping=False),
    ),
    # Mixtral runs as llama.cpp's `llama` with experts: ffn_gate_inp router, stacked ffn_{gate,up,down}_exps of width
    # feed_forward_length, softmax then top-k renormalised; q/k permuted as LLaMA's.
    "mixtral": _moe_family(
        _LLAMA,
        "Mixtral",
        "llama",
        ("block_sparse_moe.gate", "mlp.gate"),
        GGUFExperts(
            "num_local_experts",
            "intermediate_size",
            {f"block_sparse_moe.experts.{{}}.{w}": f"ffn_{proj}_exps" for w, proj in _MIXTRAL_W.items()},
            _FUSED_EXPERTS,
        ),
        config_aliases=MappingProxyType({"num_experts": "num_local_experts"}),
        check=_check_moe(renormalizes=True),
    ),
    # llama.cpp's `qwen2moe`: Qwen2's attention with the query sized as the hidden size (head pruning cannot run), no
    # output bias; top-k weights not renormalised; a shared expert behind a sigmoid gate (ffn_gate_inp_shexp, 1-D).
    "qwen2_moe": _moe_family(
        _QWEN2,
        "Qwen2-MoE",
        "qwen2moe",
        ("mlp.gate",),
        _QWEN_EXPERTS,
        tensors={
            **{f"mlp.shared_expert.{proj}_proj": f"ffn_{proj}_shexp" for proj in ("gate", "up", "down")},
            "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
        },
        biases=_QKV_BIASES,
        full_query_width=True,
        config_aliases=_QWEN_MOE_ALIASES,
        transforms=MappingProxyType({"mlp.shared_expert_gate": lambda array, heads: array.reshape(-1)}),
        check=_check_moe(renormalizes=False),
    ),
    # llama.cpp's `qwen3moe`: Qwen3's attention (q/k norms, NEOX rope), experts of expert_feed_forward_length, top-k
    # weights renormalised.
    "qwen3_moe": _moe_family(
        _QWEN3,
        "Qwen3-MoE",
        "qwen3moe",
        ("mlp.gate",),
        _QWEN_EXPERTS,
        config_aliases=_QWEN_MOE_ALIASES,
        check=_check_moe(renormalizes=True),
    ),
}
SUPPORTED = (
    "LLaMA, Mistral, Qwen2, Qwen3, Phi-3, GLM, GLM-4, BLOOM, Gemma 2, Gemma 3, Mixtral, Qwen2-MoE and Qwen3-MoE"
)
