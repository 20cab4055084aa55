"""GGUF export for llama.cpp (and Ollama, LM Studio, llama-cpp-python), per-layer widths included.

llama.cpp reads `<arch>.attention.head_count`, `.head_count_kv` and `.feed_forward_length` either as one value or as
one entry per layer, and its `deci` graph (made for NVIDIA's pruned Nemotron-NAS models) builds every layer with its
own `n_head(il)`, `n_head_kv(il)` and `n_ff(il)`, the head size coming from `attention.key_length`. So (`FAMILIES` in
`gguf_families.py`, one entry per Transformers family, read from llama.cpp's src/models/<arch>.cpp and its converter):

- a uniform checkpoint (stock or `pruned_*` with equal layers, hidden channels and removed layers included) is
  written as its family's llama.cpp architecture: LLaMA / Mistral / Mixtral as `llama`, Qwen2 as `qwen2`, Qwen3 as
  `qwen3`, GLM-4 as `glm4`, Gemma 2 / 3 as `gemma2` / `gemma3`, Qwen2-MoE / Qwen3-MoE as `qwen2moe` / `qwen3moe`,
  removed experts included; Phi-3 (`phi3`), GLM (`chatglm`), BLOOM (`bloom`) and Qwen2-MoE with all their heads and
  hidden channels, their graphs sizing the query as the hidden size;
- a LLaMA-family checkpoint with per-layer widths (`per_layer_config`) as `deci`, with per-layer arrays; the other
  graphs build every layer with layer 0's widths (and expert count), so per-layer checkpoints of the other families
  are refused.

Tensors get llama.cpp's names; the `llama` and `deci` graphs rotate pairs of adjacent head channels while
Transformers rotates the two halves of a head, so q/k rows (and biases) are permuted the way llama.cpp's own
converter does (the NEOX-rope graphs rotate halves, GLM's Transformers code interleaved pairs: no permutation);
BLOOM's fused per-head [q, k, v] rows are regrouped, Gemma's (1 + w) norms stored as 1 + w, and a layer's experts
stacked into one tensor per projection, as llama.cpp's converter does. Written with the `gguf` package (llama.cpp's
Python writer). What llama.cpp cannot run is refused before anything is written.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PruneInputError
from ..inputs import read_json_object
from .gguf_families import FAMILIES, OTHER_FAMILIES, SUPPORTED, GGUFFamily, rope_settings
from .gguf_vocab import add_tokenizer, token_texts


logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


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
    widths: dict = field(default_factory=dict)  # the family's other fields read once for every layer (expert counts)
    query_scale: float = 1.0  # folded into the query rows: llama.cpp's attention scale -> Transformers'

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
    others = {key: widths(key) for key in spec.uniform_fields}
    uniform = all(len(set(values)) == 1 for values in (heads, kv_heads, ffn, *others.values()))
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
    rope_dim = int(head_dim * float(rope_settings(config).get("partial_rotary_factor", 1.0))) if spec.rotary else 0
    widths_once = {key: values[0] for key, values in others.items()}
    layout = GGUFLayout(arch, family, hidden_size, head_dim, heads, kv_heads, ffn, rope_dim, widths_once)
    if spec.query_scale is not None:
        layout.query_scale = spec.query_scale(config, layout)
    return layout


def _family(config: dict) -> str:
    """The base family of a stock or `pruned_*` config; refuses families llama.cpp cannot run as exported."""
    model_type = config.get("model_type")
    family = config.get("base_model_type") or str(model_type).removeprefix("pruned_")
    if family in FAMILIES:
        spec = FAMILIES[family]
        if spec.activation is not None and config.get(spec.activation_field, spec.activation) != spec.activation:
            raise PruneInputError(
                f"GGUF export needs `{spec.activation_field}` {spec.activation} (llama.cpp's {spec.arch} graph), got "
                f"{config.get(spec.activation_field)!r}."
            )
        return family
    reason = OTHER_FAMILIES.get(family, "this exporter does not know it")
    raise PruneInputError(
        f"GGUF export supports {SUPPORTED} checkpoints (stock and pruned; per-layer widths for LLaMA, Mistral and "
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
    experts = spec.experts
    modules = ", ".join(
        sorted([*spec.tensors, *(experts.per_expert if experts else ()), *(experts.fused if experts else ())])
    )
    others = ", ".join(sorted(spec.global_tensors))
    raise PruneInputError(
        f"GGUF export does not know the tensor `{hf_name}` (a {spec.name} checkpoint has {spec.layers}.N.{{{modules}}} "
        f"and {others})."
    )


def _to_llama_cpp_rows(hf_name: str, array: np.ndarray, layout: GGUFLayout) -> np.ndarray:
    """A tensor's values in llama.cpp's layout: norm offsets added, q/k permuted for pair-rotating graphs, the query
    scale folded in, the family's transforms."""
    spec = layout.spec
    if spec.norm_offset and hf_name.endswith("norm.weight"):
        array = array + np.float32(spec.norm_offset)
    found = _layer_tensor(hf_name, spec)
    if found is None:
        return array
    layer, module, _ = found
    if layout.permutes_rotary and module in ("self_attn.q_proj", "self_attn.k_proj"):
        array = permute_rotary(array, layout.heads[layer] if module == "self_attn.q_proj" else layout.kv_heads[layer])
    if module == spec.query_scale_module and layout.query_scale != 1.0:
        array = array * np.float32(layout.query_scale)
    if module in spec.transforms:
        array = spec.transforms[module](array, layout.heads[layer])
    return array


@dataclass(frozen=True)
class ExpertTensor:
    """Where a tensor of a layer's experts goes: llama.cpp's stacked tensors (`names`, full names) and the expert it
    holds (`index`), None for a fused parameter of every expert (Transformers 5), split into `names` by rows."""

    layer: int
    names: tuple[str, ...]
    index: int | None


_PER_EXPERT = re.compile(r"(?P<block>.*\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)\.weight")


def expert_tensor(hf_name: str, spec: GGUFFamily) -> ExpertTensor | None:
    """The llama.cpp destination of an expert's projection or of a fused expert parameter; None for other tensors."""
    prefix = f"{spec.layers}."
    if spec.experts is None or not hf_name.startswith(prefix):
        return None
    layer, _, rest = hf_name.removeprefix(prefix).partition(".")
    if not layer.isdigit():
        return None
    if rest in spec.experts.fused:
        return ExpertTensor(int(layer), tuple(f"blk.{layer}.{t}.weight" for t in spec.experts.fused[rest]), None)
    match = _PER_EXPERT.fullmatch(rest)
    template = match and f"{match['block']}.{{}}.{match['proj']}"
    if template in spec.experts.per_expert:
        name = f"blk.{layer}.{spec.experts.per_expert[template]}.weight"
        return ExpertTensor(int(layer), (name,), int(match["index"]))
    return None


class ExpertStacks:
    """Experts' projections collected until a layer has all `count` of one, then stacked as llama.cpp stores them:
    [experts, rows, columns] (ggml's {columns, rows, experts}), expert i at index i as the router's row i."""

    def __init__(self, count: int):
        self.count = count
        self.parts: dict[str, dict[int, np.ndarray]] = {}

    def add(self, name: str, index: int, array: np.ndarray) -> np.ndarray | None:
        if index >= self.count:
            raise PruneInputError(f"`{name}` has expert {index}, and the config counts {self.count} experts.")
        parts = self.parts.setdefault(name, {})
        parts[index] = array
        if len(parts) < self.count:
            return None
        del self.parts[name]
        return np.stack([parts[i] for i in range(self.count)])

    def split(self, names: tuple[str, ...], array: np.ndarray):
        """A fused [experts, k x rows, columns] parameter as k stacked tensors (Qwen2MoeModel.modify_tensors)."""
        if array.shape[0] != self.count or array.shape[1] % len(names):
            raise PruneInputError(
                f"Fused experts of shape {tuple(array.shape)} for {self.count} experts ({names[0]})."
            )
        return zip(names, np.split(array, len(names), axis=1))

    def check_complete(self) -> None:
        for name, parts in self.parts.items():
            missing = sorted(set(range(self.count)) - set(parts))
            raise PruneInputError(f"The checkpoint lacks experts {missing} of `{name}` ({self.count} in the config).")


def _llama_cpp_tensors(hf_name: str, array: np.ndarray, layout: GGUFLayout, stacks: ExpertStacks):
    """(llama.cpp name, array) for what one checkpoint tensor contributes: itself in llama.cpp's layout, an expert's
    stack once complete, or a fused expert parameter's parts; nothing for buffers llama.cpp recomputes."""
    expert = expert_tensor(hf_name, layout.spec)
    if expert is None:
        name = gguf_tensor_name(hf_name, layout.family)
        if name is not None:
            yield name, _to_llama_cpp_rows(hf_name, array, layout)
    elif expert.index is None:
        yield from stacks.split(expert.names, array)
    elif (stacked := stacks.add(expert.names[0], expert.index, array)) is not None:
        yield expert.names[0], stacked


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
        rope = rope_settings(config)
        writer.add_rope_dimension_count(layout.rope_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
    if layout.spec.extra_hparams is not None:
        layout.spec.extra_hparams(writer, config, layout)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _encode(name: str, array: np.ndarray, outtype: str) -> tuple[np.ndarray, object]:
    """The tensor data in the output type (1-D tensors stay float32, as llama.cpp's converter keeps them); a matrix
    whose rows do not split into q8_0 blocks of 32 falls back to f16, as llama.cpp's converter does."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if (
        array.ndim == 1 or outtype == "f32" or ".ffn_gate_inp." in name
    ):  # routers stay f32, as the converter keeps them
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
                if expert_tensor(hf_name, FAMILIES[family]) is None:
                    gguf_tensor_name(hf_name, family)


def _checkpoint_tensors(model_dir: Path):
    """(name, float32 array) for every tensor of the checkpoint's safetensors shards."""
    from safetensors import safe_open

    for file in _safetensors_files(model_dir):
        with safe_open(file, framework="pt") as shard:
            for hf_name in shard.keys():
                yield hf_name, shard.get_tensor(hf_name).float().numpy()


def _add_tensors(writer, model_dir: Path, layout: GGUFLayout, config: dict, outtype: str) -> None:
    """Every tensor under its llama.cpp name, in llama.cpp's layout, a layer's experts stacked."""
    seen = set()
    experts = layout.spec.experts
    stacks = ExpertStacks(layout.widths[experts.count] if experts is not None else 0)
    for hf_name, array in _checkpoint_tensors(model_dir):
        for name, values in _llama_cpp_tensors(hf_name, array, layout, stacks):
            data, raw_dtype = _encode(name, values, outtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
            seen.add(name)
    stacks.check_complete()
    if "output.weight" not in seen and not config.get("tie_word_embeddings", False):
        raise PruneInputError(f"{model_dir} has no lm_head.weight and `tie_word_embeddings` is false.")
    rope = rope_settings(config)
    if layout.spec.rotary and rope["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope, layout.rope_dim))


def _warn_sliding_window(config: dict, spec: GGUFFamily) -> None:
    """llama.cpp's `llama`/`qwen2` graphs attend to the whole context; Transformers honours a sliding window (written
    only for the graphs that run one)."""
    if spec.sliding_window:
        return
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
    stock-shaped Qwen3, Phi-3, GLM, GLM-4, BLOOM, Gemma 2 / 3, Mixtral, Qwen2-MoE and Qwen3-MoE) as one GGUF file for llama.cpp, with its tokenizer. Returns the written path.

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
    _warn_sliding_window(config, layout.spec)
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
