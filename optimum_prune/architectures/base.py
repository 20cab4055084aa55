"""Declarative architecture specs: where each prunable structure lives in a decoder, and nothing else.

A spec holds no logic. Generic code in `groups.py` and `surgery.py` reads it to build the coupled groups, slice the
tensors and write the new widths into the config, the way Transformers' `base_model_tp_plan` lists colwise/rowwise
modules instead of coding them per model.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any


ATTENTION_HEADS = "attention_heads"
QUERY_HEADS = "query_heads"
MLP_CHANNELS = "mlp_channels"
HIDDEN_CHANNELS = "hidden_channels"
LAYERS = "layers"
# Whole experts of a Mixture-of-Experts block, with their router rows (`num_experts` per layer).
EXPERTS = "experts"
STRUCTURES = (ATTENTION_HEADS, QUERY_HEADS, MLP_CHANNELS, HIDDEN_CHANNELS, LAYERS, EXPERTS)
# Structures whose units are attention heads of some kind: they slice the same q/o tensors, so at most one of them is
# pruned in a run, and options about heads (`attention_layers`, `min_heads`) apply to whichever is chosen.
# `query_heads` is a structure of its own rather than an option of `attention_heads` because its unit differs: plans
# (`"query_heads.3": [query head indices]`), unit counts and scores are per query head, so a saved plan says which
# mode made it and applies unambiguously.
HEAD_STRUCTURES = (ATTENTION_HEADS, QUERY_HEADS)
# Where a structure's consumer output joins the residual stream in a decoder layer whose sublayers add straight into it
# (`ArchitectureSpec.residual_adds`): attention's is added to the layer's input, the MLP's sum is the layer's output.
RESIDUAL_SIDES = {ATTENTION_HEADS: "input", QUERY_HEADS: "input", MLP_CHANNELS: "output"}


@dataclass(frozen=True)
class Member:
    """One tensor that a structure's units own a slice of.

    Args:
        name (`str`):
            Parameter name, relative to the decoder layer for per-layer structures (`"self_attn.q_proj.weight"`) and
            to the model otherwise (`"model.embed_tokens.weight"`).
        dim (`int`):
            The dimension that is sliced: 0 for a Linear's output rows, 1 for its input columns.
        chunks (`int`, *optional*, defaults to `1`):
            Fused layouts: the dimension holds `chunks` equal parts (GLM's `gate_up_proj` holds gate then up) and a
            unit owns one block in each part.
        consumer (`bool`, *optional*, defaults to `False`):
            Whether this member *reads* the unit (o_proj columns, down_proj columns). Zeroing the consumer side removes
            a unit's contribution exactly; tests and bias compensation use it.
        parts (`tuple`, *optional*):
            Fused layouts with unequal parts (Phi-3's `qkv_proj` holds q, then k, then v, and q is larger under
            grouped-query attention): one entry per part, the `(parameter, dim)` of this layer whose size that part
            has, or `None` for the parts that share the rest equally. A unit owns an equal block of each part.
        owned_parts (`tuple[int, ...]`, *optional*):
            With `parts`: the parts the units own (all when empty); the others stay whole (query heads own only
            the q part of a fused qkv).
    """

    name: str
    dim: int
    chunks: int = 1
    consumer: bool = False
    parts: tuple = ()
    owned_parts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Width:
    """A config field derived from a tensor's shape: `field = param.shape[dim] // (config.divisor * factor)`, or
    `(param.shape[dim] - minus_param.shape[minus_dim]) // ...` with `minus = (minus_param, minus_dim)` (Phi-3's key/value
    heads: the fused qkv rows less the query rows, over 2 * head_dim)."""

    field: str
    param: str
    dim: int
    divisor: str | None = None
    factor: int = 1
    minus: tuple[str, int] | None = None


@dataclass(frozen=True)
class StructureSpec:
    """The coupled tensors of one structure kind inside one decoder layer (or the whole model, for hidden channels).

    Each unit (a KV group with its query heads, an MLP channel, a hidden channel) owns an equal contiguous block of
    every member's sliced dimension, so the block size follows from the member's size and the unit count. Members
    that a configuration lacks (biases when `attention_bias=False`) are skipped.

    `tied_groups` ties units together: the units form that many equal contiguous groups, and every group keeps the
    same number of units (at least one). Query heads under grouped-query attention are the case: query head `h` reads
    key/value head `h // (heads // kv_heads)`, so keeping `k` query heads in every KV group keeps that mapping and a
    stock config expresses the result (`num_attention_heads = kv_heads * k`). Ties are a constraint on selection and
    allocation, not on scoring: criteria still score every unit on its own.
    """

    members: tuple[Member, ...]
    units: Width
    widths: tuple[Width, ...] = ()
    tied_groups: Width | None = None


@dataclass(frozen=True)
class NormSpec:
    """How hidden-channel pruning keeps the normalisation statistics of the remaining channels unchanged.

    RMSNorm computed over H' kept channels differs from RMSNorm over all H channels with the removed ones zeroed by a
    factor sqrt(H / H') and an epsilon scaled by H / H'. Scaling the norm weights and `eps_field` makes the pruned
    model equal to the zeroed original exactly.
    """

    kind: str  # "rms" or "layer"
    eps_field: str | None = None
    eps_attr: str | None = None
    modules: tuple[str, ...] = ()  # model-level norms, e.g. "model.norm"
    layer_modules: tuple[str, ...] = ()  # per-layer norms, relative to the layer
    # Where the original epsilon goes when norms over another dimension (Qwen3's per-head `q_norm`/`k_norm` over
    # `head_dim`) build theirs from `eps_field` too: hidden-channel pruning leaves them alone, and the registered
    # pruned type builds them with this field.
    fixed_eps_field: str | None = None
    # `"eps"` (above) or `"residual"`: scale the whole residual stream by c = sqrt(H' / H) instead, so that the sum of
    # squares over the kept channels divided by H' equals the original mean and epsilon stays as it is. Needed where
    # other norms read the same epsilon field (Qwen3's and Gemma 3's per-head `q_norm`/`k_norm` over `head_dim`). The
    # stream's sources get the factor c (`embeddings`, the rows of `residual_writers`), and the norms that read it
    # (`modules`, `layer_modules`) divide it out of their weights; the final norm also divides out the factor a tied
    # `lm_head` shares with the embeddings.
    compensation: str = "eps"
    embeddings: tuple[str, ...] = ()  # modules whose weight rows are embedding vectors entering the stream
    # Embeddings that multiply by sqrt(hidden_size) (Gemma's `embed_scale`): the new width brings the factor c itself,
    # so their weights stay and their `embed_scale` is set to sqrt(H'), as a reloaded model builds it.
    scaled_embeddings: tuple[str, ...] = ()
    residual_writers: tuple[str, ...] = ()  # per-layer Linears whose outputs reach the stream (rows and bias scaled)
    # Norms of Gemma's kind compute `x_hat * (1 + weight)`: the effective scale is `weight_offset + weight`.
    weight_offset: float = 0.0


@dataclass(frozen=True)
class ConfigWriter:
    """A config field that records which original units of a structure survive, across every pruning.

    Surgery keeps `field` (a list of original unit indices, one per kept unit, identical in every layer) up to date:
    absent, it starts as `range(units)`; after pruning it keeps the entries of the kept units. `count_field` records
    the unit count of the unpruned model once. BLOOM uses it to give each kept head its original ALiBi slope, which
    is computed from the original head count and the head's original index.

    Args:
        structure (`str`): the structure whose kept units are recorded (`"attention_heads"`).
        field (`str`): config field with the original indices of the kept units.
        count_field (`str`): config field with the original unit count.
        units_field (`str`): config field with the current unit count (the starting `range`).
    """

    structure: str
    field: str
    count_field: str
    units_field: str


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything optimum-prune needs to know about one family, as data.

    Args:
        model_types (`tuple[str, ...]`): the Transformers `model_type` keys this spec serves.
        layers (`str`): dotted path of the decoder layer `ModuleList`.
        structures (`dict[str, StructureSpec]`): per-layer structures (`attention_heads`, `mlp_channels`).
        hidden (`StructureSpec`): model-wide hidden channels; members named from the model root, per-layer members in
            `hidden_layer_members`.
        hidden_layer_members (`tuple[Member, ...]`): members of every decoder layer that carry the hidden dimension.
        norm (`NormSpec`): the norm modules and how they are compensated under hidden-channel pruning.
        num_layers_field (`str`): config field with the layer count.
        layer_index_attrs (`tuple[str, ...]`): per-layer module attributes that store the layer index (KV cache).
        pruned_model_type (`str`): registered model type for shapes the stock config cannot express.
        derived_fields (`dict[str, tuple]`): config fields that some configs leave implicit, as `field: (numerator,
            denominator[, multiplier])` meaning `field = numerator * multiplier // denominator` (field names or
            integers): OPT and BLOOM derive `head_dim` as `hidden_size // num_attention_heads`, BLOOM's MLP is
            `hidden_size * 4 // 1` wide. They are written into the config before
            any width changes, so head pruning and hidden-channel pruning keep the original value, and dropped again
            when the stock config can express the result and derives the same value.
        structure_requirements (`dict[str, tuple[tuple[str, str], ...]]`): config fields that must be equal for a
            structure to be prunable, e.g. OPT's `hidden_channels` needs `word_embed_proj_dim == hidden_size` (no
            `project_in`/`project_out`). Checked before scoring, with an error that names the fields.
        module_attrs (`tuple[tuple[str, str], ...]`): `(attribute path, config field)` pairs of plain attributes
            that modules copy from the config at construction and read in `forward` (OPT's `self_attn.num_heads`).
            Paths are relative to a decoder layer, or to the model when they start with `"/"`. Surgery sets them
            from the pruned config so the model in memory computes what a reloaded one computes.
        config_writers (`tuple[ConfigWriter, ...]`): family-specific config fields that surgery writes from the plan
            (BLOOM's original ALiBi head indices).
        layer_module_attrs (`dict[str, tuple]`): per-layer module attributes that modules compute from widths at
            construction and read in `forward`, as `derived_fields` rules over *that layer's* width fields (LLaMA's
            `self_attn.num_key_value_groups = num_attention_heads // num_key_value_heads`, which query-head pruning
            changes, per layer under per-layer widths). Surgery sets them from the pruned tensors' shapes.
        layer_config_modules (`tuple[str, ...]`): modules of a decoder layer whose `forward` reads a width from
            `self.config` (Phi-3's attention splits its fused qkv at `config.num_attention_heads * head_dim`). Surgery
            gives them a view of the config with their own layer's widths (`LayerConfigView`), so per-layer widths and
            the layers streaming prunes one at a time compute what a reloaded model computes.
        bias_fields (`dict[str, str]`): consumer modules (relative to a decoder layer, e.g. `"mlp.down_proj"`) that
            the stock family builds without a bias, mapped to the boolean config field with which the registered
            pruned type builds one (`"down_proj_bias"`). Bias compensation adds a bias there and sets the field;
            consumers that already have a bias (OPT, BLOOM) need no entry.
        bias_compensation_default (`bool`): whether `importance="flap"` compensates by default (`bias_compensation=
            None`) when it can. An explicit `bias_compensation=True` works either way.
        residual_adds (`tuple[tuple[str, Any], ...] | None`): when each sublayer's consumer output is added straight
            into the residual stream (no norm after the sublayer, residual taken before the norm): `()` always
            (pre-norm LLaMA), `None` never (Gemma's and GLM-4's norms after each sublayer), else the `(config field,
            value)` pairs a config must have (a missing field counts as having it). Reconstruction then fits each
            consumer to the unpruned *stream* there, correcting the drift earlier layers left (`RESIDUAL_SIDES`).
    """

    model_types: tuple[str, ...]
    layers: str
    structures: dict[str, StructureSpec]
    hidden: StructureSpec
    hidden_layer_members: tuple[Member, ...]
    norm: NormSpec
    num_layers_field: str = "num_hidden_layers"
    layer_index_attrs: tuple[str, ...] = ()
    pruned_model_type: str | None = None
    lora_target_modules: tuple[str, ...] = ()
    derived_fields: dict[str, tuple] = field(default_factory=dict)
    structure_requirements: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    module_attrs: tuple[tuple[str, str], ...] = ()
    config_writers: tuple[ConfigWriter, ...] = ()
    layer_module_attrs: dict[str, tuple] = field(default_factory=dict)
    layer_config_modules: tuple[str, ...] = ()
    bias_fields: dict[str, str] = field(default_factory=dict)
    bias_compensation_default: bool = True
    residual_adds: tuple[tuple[str, Any], ...] | None = ()
    extra: dict = field(default_factory=dict)

    @property
    def supported_structures(self) -> tuple[str, ...]:
        return (*self.structures, HIDDEN_CHANNELS, LAYERS)


@dataclass(frozen=True)
class Family:
    """Everything optimum-prune knows about one `model_type`, registered once with [`register_family`].

    Args:
        model_type (`str`): the `model_type` of `config.json` (lowercase).
        spec (`ArchitectureSpec`, *optional*): where the prunable structures live; its `pruned_model_type` names the
            registered type (in `optimum_prune.modeling`) for shapes the stock config cannot express. `None` for a
            type that is only converted (ChatGLM's remote-code `chatglm`).
        streaming (`bool`, *optional*, defaults to `False`): whether its decoder layers have been checked to run one at
            a time from the shards against the in-memory model (`prune_streaming` refuses the others).
        converter (`Callable`, *optional*): `converter(path, **kwargs) -> PreTrainedModel` for checkpoints of this
            type that Transformers cannot load without remote code; it returns a model of a family with a spec, and
            `AutoPruner.from_pretrained` calls it before `AutoConfig`, so the remote code never runs.
    """

    model_type: str
    spec: ArchitectureSpec | None = None
    streaming: bool = False
    converter: Callable[..., Any] | None = None

    def __post_init__(self):
        if self.spec is not None and not isinstance(self.spec, ArchitectureSpec):
            raise TypeError(f"`spec` must be an ArchitectureSpec, got {type(self.spec).__name__}.")
        if self.converter is not None and not callable(self.converter):
            raise TypeError(f"`converter` must be callable, got {type(self.converter).__name__}.")
        if self.spec is None and self.converter is None:
            raise ValueError(f"Family {self.model_type!r} needs a `spec`, a `converter` or both.")
        if self.streaming and self.spec is None:
            raise ValueError(f"Family {self.model_type!r} streams, which needs a `spec` of its decoder layers.")

    @property
    def pruned_model_type(self) -> str | None:
        return None if self.spec is None else self.spec.pruned_model_type


# The one registry: `model_type` -> Family. The older names below are views of it.
FAMILY_REGISTRY: dict[str, Family] = {}


def register_family(
    model_type: str,
    spec: ArchitectureSpec | None = None,
    *,
    streaming: bool = False,
    converter: Callable[..., Any] | None = None,
    exist_ok: bool = False,
) -> Family:
    """Register a family under `model_type` (lowercase, as in `config.json`), like `AutoConfig.register`.

    Variants of a family are `dataclasses.replace` of its spec, each registered under its own type. Duplicates raise
    unless `exist_ok`, which replaces the whole record.
    """
    family = Family(model_type.lower(), spec, streaming, converter)
    if family.model_type in FAMILY_REGISTRY and not exist_ok:
        raise ValueError(f"Family {family.model_type!r} is already registered; pass `exist_ok=True` to replace it.")
    FAMILY_REGISTRY[family.model_type] = family
    return family


def streaming_model_types() -> tuple[str, ...]:
    """The registered types that `prune_streaming` accepts (`streaming=True`), sorted."""
    return tuple(sorted(key for key, family in FAMILY_REGISTRY.items() if family.streaming))


class FamilyFieldView(MutableMapping):
    """One field of every registered family that has it, as a `model_type`-keyed mapping (`ARCHITECTURE_REGISTRY`,
    `CHECKPOINT_CONVERTERS`). Writing sets that field of the family (adding the family if new) and keeps the others,
    so code and tests that edit the old dicts (`monkeypatch.setitem`) edit the one registry."""

    def __init__(self, field_name: str):
        self._field = field_name

    def __getitem__(self, model_type: str):
        value = getattr(FAMILY_REGISTRY.get(model_type), self._field, None)
        if value is None:
            raise KeyError(model_type)
        return value

    def __setitem__(self, model_type: str, value) -> None:
        family = FAMILY_REGISTRY.get(model_type)
        changes = {self._field: value}
        FAMILY_REGISTRY[model_type] = Family(model_type, **changes) if family is None else replace(family, **changes)

    def __delitem__(self, model_type: str) -> None:
        """Clear the field; the family goes when nothing is left (a family without a spec does not stream)."""
        if model_type not in self:
            raise KeyError(model_type)
        family = FAMILY_REGISTRY.pop(model_type)
        rest = {"spec": family.spec, "converter": family.converter, self._field: None}
        if rest["spec"] is not None or rest["converter"] is not None:
            streaming = family.streaming and rest["spec"] is not None
            FAMILY_REGISTRY[model_type] = replace(family, **rest, streaming=streaming)

    def __iter__(self):
        return (key for key, family in FAMILY_REGISTRY.items() if getattr(family, self._field) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


ARCHITECTURE_REGISTRY: MutableMapping[str, ArchitectureSpec] = FamilyFieldView("spec")


def register_architecture(model_type: str, spec: ArchitectureSpec, exist_ok: bool = False) -> None:
    """Register `spec` for `model_type` (lowercase, as in `config.json`), keeping the rest of an existing family.
    Duplicates raise unless `exist_ok`. `register_family` also declares streaming and a converter."""
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"`spec` must be an ArchitectureSpec, got {type(spec).__name__}.")
    key = model_type.lower()
    if key in ARCHITECTURE_REGISTRY and not exist_ok:
        raise ValueError(f"Architecture {key!r} is already registered.")
    ARCHITECTURE_REGISTRY[key] = spec


def get_architecture(model_type: str) -> ArchitectureSpec:
    """The spec for `model_type`; the error lists the supported types."""
    spec = ARCHITECTURE_REGISTRY.get(model_type)
    if spec is None:
        raise ValueError(
            f"optimum-prune has no architecture spec for model_type {model_type!r}. "
            f"Supported: {sorted(ARCHITECTURE_REGISTRY)}. Register one with `AutoPruner.register(model_type, spec)`."
        )
    return spec


# Checkpoint converters: a `model_type` that Transformers cannot load without remote code (ChatGLM's `chatglm`) can
# map exactly onto a registered native family. `AutoPruner.from_pretrained` looks the type up here before it touches
# `AutoConfig`, so the remote code is never run; each converter reads config.json and the weights itself.
CHECKPOINT_CONVERTERS: MutableMapping[str, Callable[..., Any]] = FamilyFieldView("converter")


def register_checkpoint_converter(model_type: str, converter: Callable[..., Any], exist_ok: bool = False) -> None:
    """Register `converter(path, **kwargs) -> PreTrainedModel` for checkpoints whose config.json has `model_type`.

    The converter returns a model of a registered architecture (the pruner then works on that model); it must not
    execute code shipped with the checkpoint, and it receives `allow_pickle` (refuse pickled weights without it, with
    `optimum_prune.utils.safe_weights.pickle_refusal`). Duplicates raise unless `exist_ok`. `register_family` is the
    same with the family's other fields.
    """
    if not callable(converter):
        raise TypeError(f"`converter` must be callable, got {type(converter).__name__}.")
    key = model_type.lower()
    if key in CHECKPOINT_CONVERTERS and not exist_ok:
        raise ValueError(f"A checkpoint converter for {key!r} is already registered.")
    CHECKPOINT_CONVERTERS[key] = converter


def adds_to_residual(spec: ArchitectureSpec, config) -> bool:
    """Whether `config`'s layers add each sublayer's consumer output straight into the residual stream (see
    `ArchitectureSpec.residual_adds`)."""
    if spec.residual_adds is None:
        return False
    return all(getattr(config, name, value) == value for name, value in spec.residual_adds)
