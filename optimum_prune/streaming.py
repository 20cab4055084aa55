"""Streaming pruning: prune a checkpoint larger than memory, one decoder layer at a time.

The model is built on the meta device from its config (no weights), so group sets and allocation come from shapes
alone: the in-memory [`Pruner`]'s own allocation code runs on that skeleton. Only the modules before the first decoder
layer (embeddings, rotary tables) are materialised to turn the calibration tokens into the first layer's inputs; then
each decoder layer in turn is read from the checkpoint's safetensors shards (`safe_open`, one layer's tensors at a time)
and freed again. The output shards are laid out in advance from the planned shapes and each pruned layer is written to
its place as soon as it exists; the rest of the checkpoint (final norm, LM head) is copied through tensor by tensor.
Peak memory is one layer and the calibration hidden states, whatever the depth; `offload_hidden_states` moves the
hidden states to a memory-mapped file.

Two flows, chosen by the allocation:

- Uniform or given widths (`layer_ratios`, `attention_layers`, `mlp_layers`, `min_heads`, `min_channels`, `uniform`)
  are known from the shapes, so one pass suffices: each layer is scored on its own input hidden states, pruned with the
  same group sets and surgery as the in-memory path, run *pruned* to produce the next layer's inputs (sequential
  statistics, as SparseGPT and FLAP compute them) and written. Data-driven criteria then give plans that differ from
  the in-memory path after the first layer; [`sequential_plan`] runs the same loop on a model in memory, as the
  reference.
- `global_ranking=True` and `allocation="flap"` rank every layer's scores together. Pass 1 scores each layer on the
  *unpruned* model's activations (running it unpruned to produce the next layer's inputs) and keeps only the score
  vectors (and, for bias compensation, each consumer's per-channel input means): a few KB per layer. The in-memory
  allocation then sets the widths, and pass 2 reads each layer again and prunes and writes it (no calibration data).
  The plan, bias compensation included, is exactly the in-memory plan; per-layer widths are saved as the registered
  pruned type with `per_layer_config`, as in memory.

Families: those registered with `register_family(..., streaming=True)`, listed by `STREAMING_MODEL_TYPES` (LLaMA,
Mistral, Qwen2, Qwen3, Phi-3, Gemma 2/3, OPT, BLOOM, GLM, GLM-4 and the MoE families Mixtral, Qwen2-MoE, Qwen3-MoE
and their `pruned_*` types, whose per-expert checkpoints are read and written through Transformers' own conversions,
`checkpoint_conversion.py`). What a family computes before its first layer (OPT's learned positions and `project_in`,
BLOOM's embedding LayerNorm and ALiBi tensor, rotary tables, the causal mask) is computed by the family's own forward
and captured at the first layer. After pruning, a layer is made
to compute what it computes in the pruned checkpoint from the spec alone (`_sync_layer_attrs`): the module attributes
surgery syncs, the config records (BLOOM's original ALiBi heads), and the pruned type's layer class where it has one.
ChatGLM remote-code checkpoints are refused: convert them to `glm` once first (`convert_chatglm_checkpoint`).

Only layer-local criteria can run this way (mini_llm with its block-local loss, `loss="block"`, included): a criterion
that needs the whole model's loss (`taylor`, `mini_llm`'s default) or a model-wide structure (`hidden_channels`,
`layers`) cannot, and is refused with an error that says what can. Bias
compensation needs the two-pass flow (its means must come from the unpruned model).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from . import modeling  # noqa: F401 - registers the pruned model types that the pruned config may need
from .allocation import select_top, uniform_allocation
from .architectures.base import (
    CHECKPOINT_CONVERTERS,
    ArchitectureSpec,
    get_architecture,
    streaming_model_types,
)
from .calibration import (
    Statistics,
    consumer_weight_names,
    hook_expert_routing,
    hook_linear_inputs,
    layer_output,
    prepare_calibration,
)
from .checkpoint_conversion import StoredNames, saved_tensors
from .compute_dtype import cast_floating, compute_in, resolve_compute_dtype, upcast
from .configuration import PrunerConfig
from .groups import GroupSet, decoder_layers, layer_prefix
from .hub import count_macs_per_token
from .importance.base import BLOCK_LOSS, INPUT_GRAM, ROUTING
from .inputs import (
    check_model_config,
    check_model_source,
    check_safetensors,
    check_seq_len,
    parse_size,
    read_config_json,
    safetensors_weight_map,
)
from .metrics import count_parameters
from .output_dir import atomic_directory, check_output_directory
from .plan import PruningPlan
from .planner import Planner, reconstruction_settings
from .reconstruction import (
    experts_refit_bytes,
    pruned_stream,
    reconstruct_planned_layer,
    refit_workspace_bytes,
)
from .streaming_checks import (
    LAYER_LOCAL_NEEDS,
    STREAMING_STRUCTURES,
    check_streaming_config,
    check_streaming_family,
    layer_local_criteria,
    mixed_layer_types,
    needs_global_scores,
)
from .surgery import (
    add_missing_biases,
    apply_plan,
    apply_width_units,
    check_plan,
    consumer_modules,
    prune_group_set,
    sync_module_attrs,
    write_unit_records,
)
from .writer import describe_data, run_summary, write_run_files


logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
BATCH_SIZE = 4  # calibration windows per forward, as `collect_statistics`
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def __getattr__(name: str):
    """`STREAMING_MODEL_TYPES`, read from the family registry when asked for, so families registered later count."""
    if name == "STREAMING_MODEL_TYPES":
        return streaming_model_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_plan_streamable(plan: PruningPlan, pruner_config: PrunerConfig, model_type: str | None = None) -> None:
    """Refuse a given plan that streaming cannot apply layer by layer; any criterion may have made it."""
    structures = sorted({key.split(".")[0] for key in plan.kept})
    other = [s for s in structures if s not in STREAMING_STRUCTURES]
    if other or plan.removed_layers:
        what = other + (["removed layers"] if plan.removed_layers else [])
        raise ValueError(
            f"Streaming applies plans of the per-layer structures {list(STREAMING_STRUCTURES)}; this plan also has "
            f"{what} (they need every layer at once): apply it in memory with `PruningPlan.apply`."
        )
    check_streaming_family(model_type)
    if model_type is not None and plan.model_type != model_type:
        raise ValueError(f"The plan was made for a {plan.model_type!r} model; this checkpoint is {model_type!r}.")


def _plan_group_sets(model: nn.Module, spec: ArchitectureSpec, plan: PruningPlan) -> dict[str, GroupSet]:
    """The group sets a given plan prunes, checked against the checkpoint's shapes as `apply_plan` checks them
    (`surgery.check_plan`), before any layer is read."""
    return check_plan(model, plan, spec, what="checkpoint")


# --------------------------------------------------------------------------------------------------------------------
# Reading and writing safetensors shards
# --------------------------------------------------------------------------------------------------------------------


class CheckpointReader:
    """Tensor names -> shard files of a safetensors checkpoint; reads a few tensors at a time.

    Each read opens its shard and closes it again, so no shard stays memory-mapped (mapped pages that were touched
    count towards the process's resident memory for as long as the mapping lives).
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = os.fspath(model_dir)
        single = os.path.join(self.model_dir, "model.safetensors")
        weight_map = safetensors_weight_map(self.model_dir)
        if weight_map is not None:
            self.files = weight_map
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise ValueError(
                f"{self.model_dir} has no safetensors checkpoint (model.safetensors or model.safetensors.index.json); "
                "streaming pruning reads safetensors only. Re-save the model with `save_pretrained`."
            )
        self.stored: dict[str, str] = {}  # model name -> name in the shard, where they differ (`add_prefix`)
        self.names: StoredNames | None = None  # model names -> stored names (`convert_names`)

    def add_prefix(self, prefix: str, names: set[str]) -> None:
        """Read the tensors of `names` that the shards store without `prefix` under their prefixed name."""
        for name in list(self.files):
            if name not in names and prefix + name in names:
                self.files[prefix + name] = self.files.pop(name)
                self.stored[prefix + name] = name

    def convert_names(self, model: nn.Module) -> None:
        """Read `model`'s tensors through the conversions Transformers applies when it loads this checkpoint
        (per-expert Linears stacked into fused experts); call after `add_prefix`."""
        self.names = StoredNames(model, self.files)

    def __contains__(self, name: str) -> bool:
        return name in (self.files if self.names is None else self.names.sources)

    def keys(self) -> list[str]:
        """The model's names of the stored tensors (after `convert_names`; the stored names before)."""
        return list(self.files if self.names is None else self.names.sources)

    def source_names(self, name: str) -> list[str]:
        """The stored tensors (under `files`' names) that make model tensor `name`."""
        return [name] if self.names is None else self.names.sources[name]

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (of the first one listed)."""
        from safetensors import safe_open

        for name, file in self.files.items():
            with safe_open(file, "pt") as f:
                dtype = SAFETENSORS_DTYPES.get(f.get_slice(self.stored.get(name, name)).get_dtype())
            if dtype is not None:
                return dtype
        return torch.float32

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """dtype and shape of every tensor, from the shard headers (no tensor is read)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        layout = {}
        for file, names in by_file.items():
            with safe_open(file, "pt") as f:
                for name in names:
                    view = f.get_slice(self.stored.get(name, name))
                    layout[name] = (SAFETENSORS_DTYPES.get(view.get_dtype()), tuple(view.get_shape()))
        return layout

    def load(self, names) -> dict[str, torch.Tensor]:
        """Read `names` (model names; grouped by shard, each shard opened once), converting stored tensors where the
        model's differ (`convert_names`)."""
        from safetensors import safe_open

        names = list(names)
        by_file: dict[str, list[str]] = {}
        for name in names if self.names is None else self.names.stored_names(names):
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, "pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(self.stored.get(name, name))
        if self.names is None:
            return tensors
        return {name: self.names.build(name, tensors) for name in names}


SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()} | {
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ShardWriter:
    """Writes a checkpoint whose tensor names, shapes and dtypes are known in advance straight to safetensors shards.

    The shards (of at most `max_shard_size` bytes; a larger tensor gets one of its own) and their headers are laid out
    when the writer is built, so each tensor is written to its place in its file as soon as it exists and nothing is
    buffered: writing the output costs no memory, however large the shards. Names follow `save_pretrained`
    (`model.safetensors`, or `model-0000k-of-0000N.safetensors` with an index).

    Args:
        directory: where the shards go.
        layout (`dict[str, tuple[torch.dtype, tuple[int, ...]]]`): every tensor the checkpoint will hold, in the order
            they are laid out.
        max_shard_size: bytes, or a string such as `"2GB"`.
    """

    def __init__(self, directory: str | os.PathLike, layout: dict, max_shard_size: int | str = "5GB"):
        self.directory = os.fspath(directory)
        max_bytes = parse_size(max_shard_size)
        shards: list[dict[str, tuple]] = [{}]
        sizes = [0]
        for name, (dtype, shape) in layout.items():
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and sizes[-1] + size > max_bytes:
                shards.append({})
                sizes.append(0)
            shards[-1][name] = (dtype, tuple(shape), sizes[-1], sizes[-1] + size)
            sizes[-1] += size
        self.total_bytes = sum(sizes)
        if len(shards) == 1:
            files = ["model.safetensors"]
        else:
            files = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
        self.places: dict[str, tuple[str, int, torch.dtype, tuple]] = {}  # name -> (file, file offset, dtype, shape)
        for file, shard, size in zip(files, shards, sizes):
            header = {"__metadata__": {"format": "pt"}}
            for name, (dtype, shape, begin, end) in shard.items():
                header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
            with open(os.path.join(self.directory, file), "wb") as f:
                f.write(len(encoded).to_bytes(8, "little"))
                f.write(encoded)
                f.truncate(8 + len(encoded) + size)
            for name, (dtype, shape, begin, _) in shard.items():
                self.places[name] = (file, 8 + len(encoded) + begin, dtype, shape)
        self.files = files
        self.written: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` to its place (it must have the dtype and shape of the layout)."""
        if name not in self.places:
            raise KeyError(f"{name!r} is not in the checkpoint layout.")
        file, offset, dtype, shape = self.places[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)} (the layout was "
                "computed from the planned shapes)."
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        with open(os.path.join(self.directory, file), "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self.written.add(name)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `name` is written in (the checkpoint's own, whatever dtype the run computed in)."""
        return self.places[name][2]

    def close(self) -> None:
        """Check that every tensor was written and write the index (none for a single shard)."""
        missing = sorted(set(self.places) - self.written)
        if missing:
            raise RuntimeError(f"Tensors {missing[:4]} were never written.")
        if len(self.files) == 1:
            return
        weight_map = {name: place[0] for name, place in sorted(self.places.items())}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Meta skeleton and materialisation
# --------------------------------------------------------------------------------------------------------------------


def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `config` on the meta device: every shape, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def materialize(
    model: nn.Module,
    module_name: str,
    reader: CheckpointReader,
    recurse: bool = True,
    dtype: torch.dtype | None = None,
) -> None:
    """Give `module_name` (and its children when `recurse`) real CPU tensors: persistent ones read from the checkpoint
    (floating-point ones cast to `dtype`, the compute dtype, when given), non-persistent buffers (rotary frequency
    tables, which checkpoints do not hold) recomputed by the model's own `_init_weights`, as `from_pretrained` does."""
    module = model.get_submodule(module_name) if module_name else model
    prefix = f"{module_name}." if module_name else ""
    modules = list(module.named_modules()) if recurse else [("", module)]
    for _, sub in modules:
        non_persistent = [
            b for n, b in sub.named_buffers(recurse=False) if n in sub._non_persistent_buffers_set and b.is_meta
        ]
        if non_persistent:
            sub.to_empty(device="cpu", recurse=False)
            model._init_weights(sub)
    local = {}
    for sub_name, sub in modules:
        sub_prefix = f"{sub_name}." if sub_name else ""
        for n, _ in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
            if n in sub._non_persistent_buffers_set:
                continue
            local[sub_prefix + n] = prefix + sub_prefix + n
    missing = [full for full in local.values() if full not in reader]
    if missing:
        raise ValueError(f"The checkpoint has no tensors {missing[:4]}; it does not match its config.json.")
    tensors = reader.load(local.values())
    for rel, full in local.items():
        owner_name, _, attr = rel.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = tensors.pop(full)  # each stored tensor freed as soon as its cast exists
        if dtype is not None:
            value = upcast(value, dtype)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value


def release(module: nn.Module) -> None:
    """Move a module's tensors back to the meta device, freeing their storage, and hand the freed memory back to the
    operating system (glibc keeps freed blocks below its mmap threshold, up to 32 MB, in its heap: without the trim,
    the heap of a long run grows with fragmentation instead of staying at one layer)."""
    module.to("meta")
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def output_embedding_names(model: nn.Module) -> set[str]:
    """Parameter names of the output embedding (LM head): not needed to compute any layer's inputs."""
    head = model.get_output_embeddings()
    if head is None:
        return set()
    for name, module in model.named_modules():
        if module is head:
            return {f"{name}.{n}" for n, _ in module.named_parameters()}
    return set()


# --------------------------------------------------------------------------------------------------------------------
# Layer inputs and the per-layer step
# --------------------------------------------------------------------------------------------------------------------


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records what the model passes it (hidden states, the causal mask, the rotary
    `position_embeddings` or BLOOM's `alibi`, position ids, ...) and stops the forward pass. So every family's own
    forward builds the layer inputs, however it builds them. With `stop=False` it passes its input on instead (the
    layers before the first of each `layer_types` kind in models that mix them); with `record=False` it records
    nothing."""

    def __init__(self, layer: nn.Module, record: bool = True, stop: bool = True):
        super().__init__()
        self.layer = layer
        self.record, self.stop = record, stop
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def __getattr__(self, name):  # the model may read attributes of its layers (e.g. `attention_type`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        rest = args[1:] if "hidden_states" not in kwargs and args else args
        if self.record:
            self.calls.append((hidden, rest, kwargs))
        if self.stop:
            raise _Captured
        return hidden  # only the next catcher reads it (and ignores it): no real layer runs before the last catcher


@dataclass
class LayerInputs:
    """The inputs of the current decoder layer, one entry per calibration batch.

    A model whose layers mix `layer_types` (Gemma's sliding-window and global layers) builds one mask (and, for Gemma
    3, one set of position embeddings) per kind: `by_type` holds each kind's `(args, kwargs)` per batch, and
    [`~LayerInputs.for_layer`] points `args`/`kwargs` at the ones a layer reads. Empty for every other model."""

    hidden: list[torch.Tensor]  # [B, T, H] each
    args: list[tuple]
    kwargs: list[dict]
    by_type: dict[str, tuple[list[tuple], list[dict]]] = field(default_factory=dict)

    def for_layer(self, config, index: int) -> LayerInputs:
        """These inputs with the attention arguments of decoder layer `index` (its `layer_types` kind); returns self."""
        if self.by_type:
            self.args, self.kwargs = self.by_type[config.layer_types[index]]
        return self


def first_layer_of_each_type(config) -> dict[str, int]:
    """`{kind: first layer index}` of a model whose layers mix `layer_types`; empty when all read the same inputs."""
    if not mixed_layer_types(config):
        return {}
    firsts: dict[str, int] = {}
    for index, kind in enumerate(config.layer_types[: config.num_hidden_layers]):
        firsts.setdefault(kind, index)
    return firsts


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, spec: ArchitectureSpec, batches: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> LayerInputs:
    """Run the model up to its first decoder layer on every batch of `BATCH_SIZE` windows and keep that layer's inputs.

    Calibration windows are unpadded, so `attention_mask` ([n, seq_len], 0 on padding) is usually absent; with one,
    the family's own forward turns it into what its layers read (OPT's mask and position ids, BLOOM's ALiBi tensor).
    In a model that mixes `layer_types`, the layers up to the first of each kind are stood in for by catchers too, so
    each kind's attention arguments are recorded (`LayerInputs.by_type`) and no real layer runs.
    """
    layers = model.get_submodule(spec.layers)
    firsts = first_layer_of_each_type(model.config)
    last = max(firsts.values(), default=0)
    originals = [layers[i] for i in range(last + 1)]
    catchers = [
        _Catcher(layer, record=i == 0 or i in firsts.values(), stop=i == last) for i, layer in enumerate(originals)
    ]
    for i, catcher in enumerate(catchers):
        layers[i] = catcher
    try:
        for start in range(0, len(batches), BATCH_SIZE):
            try:
                mask = None if attention_mask is None else attention_mask[start : start + BATCH_SIZE]
                model.base_model(input_ids=batches[start : start + BATCH_SIZE], attention_mask=mask, use_cache=False)
            except _Captured:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(catchers[-1].calls) != math.ceil(len(batches) / BATCH_SIZE):
        raise RuntimeError("The model's forward did not reach its first decoder layer.")
    inputs = LayerInputs(*map(list, zip(*catchers[0].calls)))
    for kind, index in firsts.items():
        inputs.by_type[kind] = ([c[1] for c in catchers[index].calls], [c[2] for c in catchers[index].calls])
    return inputs.for_layer(model.config, 0)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """The layer's output hidden states for every batch."""
    return [layer_output(layer(h, *a, **k)) for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs)]


@torch.no_grad()
def layer_statistics(
    model: nn.Module, layer_index: int, spec, names: set[str], inputs: LayerInputs, needs=frozenset()
) -> Statistics:
    """[`Statistics`] of one decoder layer: per-input-channel activation statistics of its scored Linears, from its
    inputs, with the same per-batch reductions (shared by Linears that read the same tensor) as `collect_statistics`;
    and, when `needs` has `routing`, what its router does (frequency, REAP), recorded as `collect_statistics` does."""
    stats = Statistics(model, None, param_names=names)
    stats._spec = spec
    prefix = layer_prefix(spec, layer_index)
    layer = model.get_submodule(prefix[:-1])
    linears = [
        (f"{prefix}{name}.weight", module)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and f"{prefix}{name}.weight" in names
    ]
    handles = hook_linear_inputs(stats, linears, consumer_weight_names(spec, names) if INPUT_GRAM in needs else ())
    if ROUTING in needs:
        handles += hook_expert_routing(stats, [(layer_index, layer)])
    try:
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            layer(hidden, *args, **kwargs)  # only the hooks' sums are kept: no second copy of the hidden states
    finally:
        for handle in handles:
            handle.remove()
    stats.num_samples = sum(h.shape[0] for h in inputs.hidden)

    def calibration_forward():  # forward-only criteria run the layer again (mini_llm's block-local loss)
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            layer(hidden, *args, **kwargs)

    stats.calibration_forward = calibration_forward
    return stats


@torch.no_grad()
def prune_layer(
    model: nn.Module,
    spec: ArchitectureSpec,
    layer_index: int,
    importance,
    group_sets: dict[str, GroupSet],
    kept_counts: dict[str, int],
    inputs: LayerInputs | None,
) -> dict[str, list[int]]:
    """Score and prune decoder layer `layer_index` of `model` (whose tensors must be real) in place.

    Returns the plan entries of the layer (kept unit indices of each pruned group set).
    """
    keys = [key for key, gs in group_sets.items() if gs.layer == layer_index]
    names = {s.name for key in keys for s in group_sets[key].slices}
    if importance.needs_data:
        stats = layer_statistics(model, layer_index, spec, names, inputs, importance.needs)
    else:
        stats = Statistics(model, None, param_names=names)
        stats._spec = spec
    kept = {}
    for key in keys:
        if kept_counts[key] < group_sets[key].num_units:
            scores = importance.score(group_sets[key], stats).float()
            kept[key] = select_top(scores, kept_counts[key], group_sets[key].num_groups)  # query heads: per KV group
    del stats  # holds the unpruned tensors
    for key, units in kept.items():
        prune_group_set(model, group_sets[key], units)
    return kept


def _write_unit_records(model: nn.Module, spec: ArchitectureSpec, shape_model: nn.Module, kept) -> None:
    """The kept units recorded in the config fields that `spec.config_writers` keep (BLOOM's original ALiBi heads) of
    `shape_model.config`, as the in-memory path writes them: from the unpruned config and the plan entries `kept`."""
    if not spec.config_writers:
        return
    source = SimpleNamespace(config=copy.deepcopy(model.config))
    counts = {key: max(units) + 1 for key, units in kept.items()}  # `write_unit_records` reads `kept` only
    plan = PruningPlan(model.config.model_type, len(decoder_layers(model, spec)), unit_counts=counts, kept=kept)
    write_unit_records(source, spec, plan)
    for writer in spec.config_writers:
        records = getattr(source.config, writer.field, None)
        if records is not None:
            setattr(shape_model.config, writer.count_field, getattr(source.config, writer.count_field))
            setattr(shape_model.config, writer.field, records)


def _sync_layer_attrs(
    model: nn.Module, spec: ArchitectureSpec, layer_index: int, shape_model: nn.Module, kept: dict[str, list[int]]
) -> None:
    """Make decoder layer `layer_index` of `model`, just pruned, compute what it computes in the pruned checkpoint.

    Declarative, from the spec, with surgery's own functions: the module attributes its forward reads from the config
    (`spec.module_attrs`: OPT's and BLOOM's head counts and widths) are set from the planned config; the layer's kept
    units are recorded in the config fields that `spec.config_writers` keep (BLOOM's original ALiBi heads), in
    `shape_model.config`, which is the config the streamed checkpoint is saved with; and when the pruned model type
    has its own layer class (`adopt_pruned_layer`: BLOOM's block that picks its kept heads' rows of the original
    ALiBi tensor, which the unpruned model before the first layer builds for every head), the layer becomes one.

    `model` keeps its unpruned config; `kept` holds the plan entries of every layer pruned so far.
    """
    _write_unit_records(model, spec, shape_model, kept)
    sync_module_attrs(model, spec, _layer_config(shape_model.config, layer_index), [layer_index])
    adopt = getattr(shape_model, "adopt_pruned_layer", None)
    if adopt is not None:
        adopt(decoder_layers(model, spec)[layer_index], layer_index)


def _planner(model: nn.Module, spec: ArchitectureSpec, pruner_config: PrunerConfig) -> Planner:
    """The [`Planner`] of the meta skeleton (prunable layers, floors, per-layer ratios, global and FLAP allocation,
    bias means): it needs only shapes and scores, so the streaming plan is made by the same code as the in-memory one.

    Building it resolves `bias_compensation` as the in-memory path does. Only the two-pass allocations can compensate
    (their statistics are the unpruned model's, as in memory); a one-pass run plans with it off and leaves
    `pruner_config` untouched (an explicit `True` was refused by `check_streaming_config`). Unset reconstruction is
    resolved the same way: by the planner in two passes, off in one.
    """
    if not needs_global_scores(pruner_config):
        pruner_config = copy.copy(pruner_config)
        pruner_config.bias_compensation = False
        pruner_config.reconstruction = bool(
            pruner_config.reconstruction
        )  # unset: off, as `streaming=True` resolves it
    # The parameters allocation counts, taken now: materialising the embeddings later unties a tied LM head, which
    # `named_parameters` would then list (and count) twice.
    planner = Planner(model, spec, pruner_config, params=dict(model.named_parameters()))
    if pruner_config.non_uniform:
        planner.check_per_layer_support()
    return planner


def _prunable_group_sets(planner: Planner) -> tuple[dict[str, GroupSet], dict[str, GroupSet]]:
    """Every width group set of the model (the plan's `unit_counts`) and the prunable ones (`attention_layers`,
    `mlp_layers`)."""
    all_group_sets = planner.group_sets()
    return all_group_sets, planner.prunable(all_group_sets)


def _shape_plan(model, group_sets, kept_counts) -> PruningPlan:
    """A plan with the planned widths (the first units of each group set, of each KV group for query heads): what
    the pruned shapes will be."""
    counts = {key: gs.num_units for key, gs in group_sets.items()}
    kept = {
        key: select_top(torch.zeros(group_sets[key].num_units), k, group_sets[key].num_groups)
        for key, k in kept_counts.items()
        if k < group_sets[key].num_units
    }
    num_layers = len(model.get_submodule(get_architecture(model.config.model_type).layers))
    return PruningPlan(model.config.model_type, num_layers, unit_counts=counts, kept=kept)


def _compensated_modules(model: nn.Module, spec: ArchitectureSpec, plan: PruningPlan, group_sets) -> set[str]:
    """Layer-relative paths of the consumers that bias compensation gives a bias they do not have (as
    `surgery.compensate_biases` does): every layer then carries one (`surgery.add_missing_biases`)."""
    paths = set()
    for key, means in plan.bias_means.items():
        for s, path in consumer_modules(spec, group_sets[key]):
            if s.name in means and model.get_submodule(s.name.rpartition(".")[0]).bias is None:
                paths.add(path)
    return paths


def _shape_model(model: nn.Module, spec: ArchitectureSpec, plan: PruningPlan, group_sets) -> nn.Module:
    """The pruned model on the meta device, by the in-memory surgery: the pruned shapes and config (the registered
    type with `per_layer_config` for per-layer widths, the bias fields of compensation). Compensation itself needs
    weights, so the biases it adds are added empty here and filled in by the layer pass."""
    shape = copy.deepcopy(model)
    add_missing_biases(shape, spec, _compensated_modules(shape, spec, plan, group_sets))
    return apply_plan(shape, dataclasses.replace(plan, bias_means={}), spec)


def _layer_config(config, layer_index: int):
    """The config of one decoder layer (a registered type with per-layer widths has one per layer)."""
    layer_config = getattr(config, "layer_config", None)
    return layer_config(layer_index) if layer_config is not None else config


@torch.no_grad()
def advance_inputs(layer: nn.Module, inputs: LayerInputs) -> None:
    """Turn `inputs` into the next layer's: run `layer` on each batch and write its output over the batch's hidden
    states (a decoder layer's output has its input's shape). Nothing but one batch's output is allocated, and offloaded
    hidden states stay in their file."""
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
        hidden.copy_(layer_output(layer(hidden, *args, **kwargs)))


class HiddenStateFile:
    """The calibration hidden states in a memory-mapped file instead of RAM: [num_samples, seq_len, hidden].

    The pages are file-backed, so the kernel writes them back and drops them under memory pressure instead of
    swapping; each layer step reads and rewrites the file batch by batch. The file is created in a fresh folder under
    `directory` and unlinked as soon as it is mapped (POSIX keeps the mapping), so nothing is left behind however the
    run ends: its disk space returns when the last view of `tensor` is freed (`close()`) or the process exits.
    """

    def __init__(self, directory: str | os.PathLike, shape: tuple[int, ...], dtype: torch.dtype):
        os.makedirs(directory, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="optimum-prune-hidden-", dir=directory)
        self.path = os.path.join(folder, "hidden_states.bin")
        numel = math.prod(shape)
        try:
            with open(self.path, "wb") as f:
                f.truncate(numel * torch.empty((), dtype=dtype).element_size())
            self.tensor = torch.from_file(self.path, shared=True, size=numel, dtype=dtype).view(shape)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        logger.info(
            "Calibration hidden states (%.1f MiB) are kept in a file under %s.", self.nbytes / 2**20, directory
        )

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def close(self) -> None:
        self.tensor = None


def capture_inputs(
    model: nn.Module, spec: ArchitectureSpec, batches: torch.Tensor, offload: str | os.PathLike | None = None
) -> tuple[LayerInputs, HiddenStateFile | None]:
    """The first layer's inputs (see [`capture_layer_inputs`]); with `offload`, a folder, the hidden states go batch
    by batch into a [`HiddenStateFile`] there and never all sit in RAM."""
    if offload is None:
        return capture_layer_inputs(model, spec, batches), None
    store = None
    inputs = LayerInputs([], [], [])
    for start in range(0, len(batches), BATCH_SIZE):
        part = capture_layer_inputs(model, spec, batches[start : start + BATCH_SIZE])
        hidden = part.hidden[0]  # [B, T, H]
        if store is None:
            store = HiddenStateFile(offload, (len(batches), *hidden.shape[1:]), hidden.dtype)
        view = store.tensor[start : start + hidden.shape[0]]
        view.copy_(hidden)
        inputs.hidden.append(view)
        inputs.args.append(part.args[0])
        inputs.kwargs.append(part.kwargs[0])
        for kind, (args, kwargs) in part.by_type.items():
            inputs.by_type.setdefault(kind, ([], []))
            inputs.by_type[kind][0].append(args[0])
            inputs.by_type[kind][1].append(kwargs[0])
    return inputs.for_layer(model.config, 0), store


def sequential_plan(model: nn.Module, pruner_config: PrunerConfig, batches: torch.Tensor | None) -> PruningPlan:
    """The plan a one-pass streaming run makes, computed on a model in memory (the reference for streaming).

    Runs the same per-layer loop as [`prune_streaming`] (statistics of each layer from the outputs of the already
    pruned layers before it) on a deep copy of `model`; `model` is left untouched. Two-pass configs
    (`global_ranking`, `allocation="flap"`) stream to the in-memory plan itself (`Pruner.make_plan`).
    """
    spec = get_architecture(model.config.model_type)
    check_streaming_config(pruner_config)
    if needs_global_scores(pruner_config):
        raise ValueError(
            "With `global_ranking` or `allocation='flap'` streaming makes the in-memory plan (two passes over the "
            "unpruned model); compute it with `AutoPruner.from_model(model, config).make_plan(...)`."
        )
    importance = pruner_config.build_importance()
    work = copy.deepcopy(model).eval()
    planner = _planner(work, spec, pruner_config)
    all_group_sets, group_sets = _prunable_group_sets(planner)
    kept_counts = planner.kept_counts(group_sets)
    shape_model = apply_plan(
        build_skeleton(copy.deepcopy(work.config), work.dtype), _shape_plan(work, all_group_sets, kept_counts), spec
    )
    layers = work.get_submodule(spec.layers)
    dtype = resolve_compute_dtype(pruner_config.compute_dtype, work.dtype, "cpu")
    kept = {}
    with compute_in(work, layers, dtype):  # as streaming computes: a layer at a time in the compute dtype
        inputs = capture_layer_inputs(work, spec, batches) if importance.needs_data else None
        for i in range(len(layers)):
            if inputs is not None:
                inputs.for_layer(work.config, i)
            kept.update(prune_layer(work, spec, i, importance, group_sets, kept_counts, inputs))
            _sync_layer_attrs(work, spec, i, shape_model, kept)
            if inputs is not None and i + 1 < len(layers):
                advance_inputs(layers[i], inputs)
    counts = {key: gs.num_units for key, gs in all_group_sets.items()}
    return PruningPlan(model.config.model_type, len(layers), unit_counts=counts, kept=kept)


# --------------------------------------------------------------------------------------------------------------------
# The streaming entry point
# --------------------------------------------------------------------------------------------------------------------


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_peak_bytes(
    model: nn.Module,
    spec: ArchitectureSpec,
    pruner_config: PrunerConfig,
    needs_data: bool,
    offload: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Rough peak memory of the tensors a streaming run holds (the Python/PyTorch runtime itself, ~0.3-0.5 GB, comes
    on top). The largest of: the input phase (modules before the first layer plus the hidden states), a layer step (the
    unpruned layer, its `compute_dtype` copy when that is wider (`layer_compute_bytes`: the stored tensors and their
    casts coexist while the layer is read), its largest tensor sliced and scored in float32, the hidden states, one
    batch's output and activations) and the copy of the remaining tensors (the largest one). Output shards are written
    in place, never buffered. With `offload` the hidden states are file-backed pages the kernel can drop; one batch of
    them is counted. Hidden states and the layer forward are in `compute_dtype` (default: the checkpoint's). With
    `reconstruction` the layer step also holds the pruned model's hidden states and the widest consumer's refit
    (`refit_workspace_bytes`, its unpruned input width as the bound; an MoE layer's experts are refit together)."""
    layers = model.get_submodule(spec.layers)
    layer_prefix_ = spec.layers + "."
    head = output_embedding_names(model)
    stored_element = next(model.parameters()).element_size()
    computing = needs_data and compute_dtype is not None
    element = torch.empty((), dtype=compute_dtype).element_size() if computing else stored_element
    layer_bytes = max(_tensor_bytes(list(layer.parameters())) for layer in layers)
    layer_compute_bytes = layer_bytes * element // stored_element if element > stored_element else 0
    largest_in_layer = max(p.numel() for p in layers[0].parameters()) * element
    outside = [(n, p) for n, p in model.named_parameters() if not n.startswith(layer_prefix_)]
    prefix_bytes = _tensor_bytes(p for n, p in outside if n not in head)
    largest_outside = max((p.numel() * p.element_size() for _, p in outside), default=0)
    config = model.config
    hidden_size = config.hidden_size
    tokens = pruner_config.num_calibration_samples * pruner_config.calibration_seq_len if needs_data else 0
    hidden_states = tokens * hidden_size * element
    batch_tokens = min(BATCH_SIZE, pruner_config.num_calibration_samples) * pruner_config.calibration_seq_len
    batch_hidden = batch_tokens * hidden_size * element if needs_data else 0
    resident = batch_hidden if offload else hidden_states  # each layer's output overwrites its input (in place)
    mlp_width = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden_size
    wide = max(mlp_width * 3, 4 * hidden_size)
    heads = getattr(config, "num_attention_heads", 1)
    workspace = (
        (batch_tokens * wide + batch_tokens * heads * pruner_config.calibration_seq_len) * 4 if needs_data else 0
    )
    if BLOCK_LOSS in pruner_config.build_importance().needs:  # float64 target and W ± εz outputs of one batch
        workspace += 3 * batch_tokens * hidden_size * 8
    # The sliced copy of the largest weight and the float32 copies a criterion makes of it (|W|, then a reduction).
    scoring = largest_in_layer + 2 * largest_in_layer * 4 // element
    refit = 0
    if pruner_config.reconstruction and needs_data:
        head_dim = getattr(config, "head_dim", None) or hidden_size // heads
        linear = refit_workspace_bytes(max(mlp_width, heads * head_dim), hidden_size)
        refit = max(linear, experts_refit_bytes(layers, spec)) + resident
    phases = {
        "inputs": prefix_bytes + resident + workspace,
        "layer": layer_bytes + layer_compute_bytes + scoring + resident + batch_hidden + workspace + refit,
        "copy": largest_outside,
    }
    return {
        **{f"phase_{k}": v for k, v in phases.items()},
        "peak": max(phases.values()),
        "layer_bytes": layer_bytes,
        "layer_compute_bytes": layer_compute_bytes,
        "refit_bytes": refit,
    }


def _layer_index(name: str, layer_names: str) -> int:
    return int(name[len(layer_names) :].split(".")[0]) if name.startswith(layer_names) else -1


def _planned_widths(group_sets, kept_counts) -> dict[str, dict[str, int]]:
    widths: dict[str, dict[str, int]] = {}
    for key, gs in group_sets.items():
        widths.setdefault(gs.structure, {})[str(gs.layer)] = kept_counts.get(key, gs.num_units)
    return widths


def _uniform_estimate(planner, group_sets) -> dict[str, int] | None:
    """The uniform kept counts meeting the target: what a dry run of a two-pass config can show before any score."""
    config = planner.config
    try:
        return uniform_allocation(
            planner.params,
            group_sets,
            list(config.structures),
            config.pruning_ratio,
            config.round_to,
            config.head_rounding,
        )
    except ValueError:
        return None


def available_memory_bytes() -> int | None:
    """Memory available to a new allocation (psutil when installed, else `MemAvailable` of /proc/meminfo), or None
    where neither can be read."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def in_memory_bytes(model_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> int:
    """Bytes of the checkpoint's tensors once loaded (floating-point ones in `dtype`; default: as stored), from the
    shard headers. Raises ValueError when `model_dir` holds no safetensors checkpoint."""
    total = 0
    for stored, shape in CheckpointReader(model_dir).layout().values():
        stored = stored or torch.uint8
        target = dtype if dtype is not None and stored.is_floating_point else stored
        total += math.prod(shape) * torch.empty((), dtype=target).element_size()
    return total


def _score_all_layers(model, spec, reader, importance, group_sets, inputs, means, progress=None, dtype=None):
    """Pass 1 of a two-pass run: every prunable group set's scores, each layer scored on the *unpruned* model's
    activations (the layer is run unpruned, in `dtype`, to produce the next layer's inputs), as the in-memory path
    scores them.

    Keeps only the score vectors and, with a `means` dict, each consumer's per-channel input mean (bias compensation):
    a few KB per layer. Returns `{key: Tensor[num_units]}`.
    """
    layers = model.get_submodule(spec.layers)
    scores = {}
    for i in range(len(layers)):
        keys = [key for key, gs in group_sets.items() if gs.layer == i]
        names = {s.name for key in keys for s in group_sets[key].slices}
        materialize(model, f"{spec.layers}.{i}", reader, dtype=dtype if inputs is not None else None)
        if inputs is not None:
            inputs.for_layer(model.config, i)
            stats = layer_statistics(model, i, spec, names, inputs, importance.needs)
        else:
            stats = Statistics(model, None, param_names=names)
            stats._spec = spec
        for key in keys:
            scores[key] = importance.score(group_sets[key], stats).float()
            if means is not None:
                for s in group_sets[key].slices:
                    if s.consumer and s.dim == 1:
                        record = stats.activation(s.name)
                        means[s.name] = record.sum.double().cpu() / max(record.count, 1)  # [in]
        del stats
        if inputs is not None and i + 1 < len(layers):
            advance_inputs(layers[i], inputs)
        release(layers[i])
        logger.info("Layer %d/%d scored (pass 1 of 2).", i + 1, len(layers))
        if progress is not None:
            progress(i + 1, len(layers))
    return scores


@torch.no_grad()
def _apply_layer_plan(model, spec, layer_index, plan, group_sets, bias_paths) -> None:
    """Pass 2 of a two-pass run: prune decoder layer `layer_index` (real tensors) as `plan` says, compensating biases
    from the plan's means first, as `surgery.apply_plan` does; consumers that compensation gives a bias get a zero
    one in layers it does not touch (the bias field is per model)."""
    prefix = layer_prefix(spec, layer_index)
    apply_width_units(model, spec, plan, group_sets, layer=layer_index)
    for path in sorted(bias_paths):
        module = model.get_submodule(prefix + path)
        if module.bias is None:
            weight = module.weight
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype), requires_grad=False)


# --------------------------------------------------------------------------------------------------------------------
# The phases of a streaming run: open the checkpoint, plan the shapes, capture the calibration inputs, (two passes:
# score every layer and plan), prune and write each layer, write the rest.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What one streaming run carries from phase to phase."""

    model_dir: str
    pruner_config: PrunerConfig
    config: object  # the checkpoint's Transformers config
    spec: ArchitectureSpec
    reader: CheckpointReader
    model: nn.Module  # the weightless skeleton; one layer at a time is materialised
    tied: set[str]
    plan: PruningPlan | None  # given, or made by the two-pass allocation
    importance: object = None
    planner: Planner | None = None
    two_pass: bool = False
    compensate: bool = False
    all_group_sets: dict = dataclasses.field(default_factory=dict)
    group_sets: dict = dataclasses.field(default_factory=dict)
    kept_counts: dict | None = None
    shape_model: nn.Module | None = None  # the pruned model on the meta device: shapes and config
    bias_paths: set[str] = dataclasses.field(default_factory=set)
    checkpoint_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32  # of the layers that run a forward; the output keeps checkpoint_dtype
    reconstruction: dict = dataclasses.field(default_factory=dict)  # the plan's refit settings; empty: none

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def unit_counts(self) -> dict[str, int]:
        return {key: gs.num_units for key, gs in self.all_group_sets.items()}


def _open_checkpoint(model_dir: str, pruner_config: PrunerConfig, plan, trust_remote_code: bool) -> _Run:
    """Check the checkpoint and the config (before any remote code could be needed), build the skeleton and match
    the checkpoint's tensor names against it."""
    if check_model_source(model_dir) is None:
        raise ValueError(f"Streaming pruning reads a local checkpoint directory; {model_dir!r} is not one.")
    declared = read_config_json(model_dir)
    declared_type = declared["model_type"]
    if declared_type not in CHECKPOINT_CONVERTERS:
        check_model_config(declared, get_architecture(declared_type))  # an unknown family names the supported ones
    if plan is not None and not isinstance(plan, PruningPlan):
        plan = PruningPlan.from_pretrained(plan)
    check = check_streaming_config if plan is None else functools.partial(check_plan_streamable, plan)
    check(pruner_config, declared_type)
    check_safetensors(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    check(pruner_config, config.model_type)
    reader = CheckpointReader(model_dir)
    checkpoint_dtype = reader.dtype()
    model = build_skeleton(config, checkpoint_dtype, trust_remote_code)
    expected = set(model.state_dict())
    reader.add_prefix(f"{model.base_model_prefix}.", expected)  # checkpoints saved from the base model
    reader.convert_names(model)  # per-expert checkpoints of the fused MoE experts
    tied = output_embedding_names(model) if getattr(model.config, "tie_word_embeddings", False) else set()
    unknown = sorted(set(reader.keys()) - expected)
    absent = sorted(expected - set(reader.keys()) - tied)
    if unknown or absent:
        raise ValueError(
            f"The checkpoint's tensor names do not match {type(model).__name__}: unexpected {unknown[:4]}, missing "
            f"{absent[:4]}. Streaming needs a checkpoint saved by Transformers for this architecture."
        )
    spec = get_architecture(config.model_type)
    importance = pruner_config.build_importance()
    run = _Run(model_dir, pruner_config, config, spec, reader, model, tied, plan, importance)
    run.checkpoint_dtype = checkpoint_dtype
    run.compute_dtype = resolve_compute_dtype(pruner_config.compute_dtype, checkpoint_dtype, "cpu")
    return run


def _plan_shapes(run: _Run) -> None:
    """The planned widths before any weight is read: the given plan's, the allocation's (one pass), or the uniform
    estimate (two passes, whose widths follow from the scores)."""
    model, spec = run.model, run.spec
    if run.plan is not None:
        _given_plan_reconstruction(run)
        run.all_group_sets = _plan_group_sets(model, spec, run.plan)
        _set_shape_model(run)
        run.kept_counts = {key: len(units) for key, units in run.plan.kept.items()}
        return
    run.planner = _planner(model, spec, run.pruner_config)  # resolves `bias_compensation` for two-pass configs
    run.pruner_config = run.planner.config
    run.compensate = bool(run.pruner_config.bias_compensation)
    run.all_group_sets, run.group_sets = _prunable_group_sets(run.planner)
    run.two_pass = needs_global_scores(run.pruner_config)
    # Two-pass only (`check_streaming_config`).
    run.reconstruction = reconstruction_settings(run.pruner_config, spec, model.config)
    if run.two_pass:
        run.kept_counts = _uniform_estimate(run.planner, run.group_sets)
        return
    run.kept_counts = run.planner.kept_counts(run.group_sets)
    run.shape_model = apply_plan(copy.deepcopy(model), _shape_plan(model, run.all_group_sets, run.kept_counts), spec)


def _given_plan_reconstruction(run: _Run) -> None:
    """A given plan is refit when it was made with reconstruction (its damping) or when the config asks for it (the
    config's damping, then recorded in the written plan)."""
    run.reconstruction = run.plan.reconstruction or reconstruction_settings(run.pruner_config, run.spec, run.config)
    if run.reconstruction and not run.plan.reconstruction:
        run.plan = dataclasses.replace(run.plan, reconstruction=run.reconstruction)


def _check_reconstruction_inputs(run: _Run, offload_hidden_states) -> None:
    """Reconstruction carries the unpruned and the pruned model's hidden states side by side, in RAM."""
    if run.reconstruction and offload_hidden_states is not None:
        raise ValueError(
            "Streaming reconstruction keeps the unpruned and the pruned model's calibration hidden states in RAM "
            "(two copies); it cannot run with `offload_hidden_states`. Drop one of them, or use fewer calibration "
            "samples."
        )


@torch.no_grad()
def _reconstruct_layer(run: _Run, layer_index: int, inputs: LayerInputs, pruned: LayerInputs) -> None:
    """Refit the consumers the plan prunes in the (unpruned-shaped, materialised) layer and advance both streams;
    the same function the in-memory engine runs on every layer (`reconstruction.reconstruct_layer`). Units chosen by
    refit error may differ from the plan's: the config's unit records (BLOOM's ALiBi heads) follow the new plan."""
    layer = run.layers[layer_index]
    reconstruct_planned_layer(layer, run.spec, run.plan, run.all_group_sets, layer_index, inputs, pruned)
    if run.plan.reconstruction.get("selection") == "error":
        _write_unit_records(run.model, run.spec, run.shape_model, run.plan.kept)


def _set_shape_model(run: _Run) -> None:
    run.shape_model = _shape_model(run.model, run.spec, run.plan, run.all_group_sets)
    run.bias_paths = _compensated_modules(run.model, run.spec, run.plan, run.all_group_sets)


def _report(run: _Run, needs_data: bool, offload: bool) -> dict:
    """Sizes, planned widths and the peak-memory estimate: all a dry run returns."""
    params_before = count_parameters(run.model)
    if run.two_pass:  # the target; the widths come from the scores
        params_after = round(params_before * (1 - run.pruner_config.pruning_ratio))
    else:
        params_after = count_parameters(run.shape_model)
    tied_bytes = _tensor_bytes(p for n, p in run.model.named_parameters() if n in run.tied)
    return {
        "params_before": params_before,
        "params_after": params_after,
        "planned_widths": {} if run.kept_counts is None else _planned_widths(run.all_group_sets, run.kept_counts),
        "widths_from_scores": run.two_pass,
        "plan_given": run.planner is None,
        "estimated_peak_bytes": estimate_peak_bytes(
            run.model, run.spec, run.pruner_config, needs_data, offload, run.compute_dtype
        ),
        "checkpoint_dtype": _dtype_name(run.checkpoint_dtype),
        "compute_dtype": _dtype_name(run.compute_dtype if needs_data else run.checkpoint_dtype),
        "checkpoint_bytes": _tensor_bytes(run.model.state_dict().values()) - tied_bytes,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checkpoint_tokenizer(model_dir: str):
    """The tokenizer the checkpoint ships, or None: for a folder without one, Transformers 5 builds an empty default
    tokenizer for some types (OPT), which would then be copied into the output."""
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        return None


def _calibration_batches(run: _Run, calibration_data, tokenizer) -> torch.Tensor:
    config = run.pruner_config
    if calibration_data is None:
        name = run.importance.name if run.importance.needs_data else "bias compensation"
        if run.reconstruction and (run.plan is not None or not (run.importance.needs_data or run.compensate)):
            name = "reconstruction"
        raise ValueError(f"{name!r} needs calibration data (`calibration_data=`).")
    check_seq_len(config.calibration_seq_len, run.config)
    return prepare_calibration(
        calibration_data, tokenizer, config.num_calibration_samples, config.calibration_seq_len, seed=config.seed
    )


def _capture_calibration_inputs(run: _Run, batches, offload_hidden_states):
    """The first decoder layer's inputs for `batches` (and their file when offloaded), in the compute dtype; only what
    runs before the first layer is materialised for it (embeddings, rotary tables; not the LM head)."""
    if batches is None:
        return None, None
    layer_names = run.spec.layers + "."
    head = output_embedding_names(run.model)
    tensors = list(run.model.named_parameters()) + list(run.model.named_buffers())
    prefix_modules = sorted(
        {name.rpartition(".")[0] for name, _ in tensors if not name.startswith(layer_names) and name not in head}
    )
    embedding = run.model.get_input_embeddings()
    for name in prefix_modules:
        lookup = run.model.get_submodule(name) is embedding  # exact in any dtype: its output is cast instead
        materialize(run.model, name, run.reader, recurse=False, dtype=None if lookup else run.compute_dtype)
    handle = embedding.register_forward_hook(lambda module, args, output: cast_floating(output, run.compute_dtype))
    try:  # the family's forward builds masks and rotary tables in the dtype of the embeddings' output
        captured = capture_inputs(run.model, run.spec, batches, offload_hidden_states)
    finally:
        handle.remove()
    for name in prefix_modules:
        release(run.model.get_submodule(name))
    return captured


def _plan_from_scores(run: _Run, inputs, progress) -> None:
    """Pass 1 of a two-pass run: score every layer on the unpruned model's activations, then allocate and plan."""
    means = {} if run.compensate else None
    scores = _score_all_layers(
        run.model, run.spec, run.reader, run.importance, run.group_sets, inputs, means, progress, run.compute_dtype
    )
    run.kept_counts = run.planner.kept_counts(run.group_sets, scores)
    run.plan = run.planner.plan(run.all_group_sets, run.group_sets, scores, run.kept_counts, means=means)
    _set_shape_model(run)


def _release_hidden_states(hidden_file) -> None:
    """Free the calibration hidden states once their `inputs` are dropped (closing the offloaded file, if any)."""
    if hidden_file is not None:
        hidden_file.close()
    gc.collect()


def _output_layout(run: _Run) -> dict:
    """Output tensors: the checkpoint's own names (tied heads stay absent) and the biases compensation adds, with the
    planned shapes, in writing order (decoder layers first), in the checkpoint's dtypes (the skeleton's meta tensors
    take the compute dtype of the layers that ran)."""
    layer_names = run.spec.layers + "."
    shapes = {name: tuple(t.shape) for name, t in run.shape_model.state_dict().items()}
    source = run.reader.layout()
    names = run.reader.keys() + [n for n in shapes if n not in run.reader and n not in run.tied]
    dtypes = {n: source[run.reader.source_names(n)[0]][0] if n in run.reader else run.checkpoint_dtype for n in names}
    meta = {n: torch.empty(shapes[n], dtype=dtypes[n], device="meta") for n in names}
    saved = saved_tensors(run.shape_model, meta)  # the names `save_pretrained` writes (per-expert MoE Linears)
    order = sorted(saved, key=lambda n: (not n.startswith(layer_names), _layer_index(n, layer_names), n))
    return {n: (saved[n].dtype, tuple(saved[n].shape)) for n in order}


def _write_layers(run: _Run, writer: ShardWriter, inputs, progress) -> dict[str, list[int]]:
    """Read, prune and write each decoder layer; returns the kept units of a one-pass run (scored layer by layer on
    the pruned model's activations)."""
    model, spec, layers = run.model, run.spec, run.layers
    kept = {}
    pruned = pruned_stream(inputs) if run.reconstruction else None  # the pruned-and-refit model's hidden states
    for i in range(len(layers)):
        layer_name = f"{spec.layers}.{i}"
        computing = inputs is not None and (run.plan is None or bool(run.reconstruction))  # else only slicing
        materialize(model, layer_name, run.reader, dtype=run.compute_dtype if computing else None)
        for stream in (inputs, pruned):
            if stream is not None:
                stream.for_layer(model.config, i)
        if run.plan is not None:
            if pruned is not None:
                _reconstruct_layer(run, i, inputs, pruned)
            _apply_layer_plan(model, spec, i, run.plan, run.all_group_sets, run.bias_paths)
        else:
            kept.update(prune_layer(model, spec, i, run.importance, run.group_sets, run.kept_counts, inputs))
            _sync_layer_attrs(model, spec, i, run.shape_model, kept)
            if inputs is not None and i + 1 < len(layers):
                advance_inputs(layers[i], inputs)
        _write_tensors(run, writer, {f"{layer_name}.{n}": t for n, t in layers[i].state_dict().items()})
        release(layers[i])
        logger.info("Layer %d/%d pruned%s.", i + 1, len(layers), " (pass 2 of 2)" if run.two_pass else "")
        if progress is not None:
            progress(i + 1, len(layers))
    return kept


def _copy_other_tensors(run: _Run, writer: ShardWriter) -> None:
    """Everything outside the decoder layers is unchanged: copied one tensor at a time; then the index."""
    layer_names = run.spec.layers + "."
    for name in run.reader.keys():
        if not name.startswith(layer_names):
            _write_tensors(run, writer, run.reader.load([name]))
    writer.close()


def _write_tensors(run: _Run, writer: ShardWriter, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` (model names) under the names and in the dtypes of the output layout."""
    for name, tensor in saved_tensors(run.shape_model, tensors).items():
        writer.add(name, tensor.to(writer.dtype(name)))


def _write_config(run: _Run, directory: str) -> None:
    """The pruned config (and, for a registered type, its modeling files) and the checkpoint's generation config."""
    pruned_config = run.shape_model.config
    pruned_config.architectures = [type(run.shape_model).__name__]
    if getattr(run.shape_model, "_auto_class", None) is not None:
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(run.shape_model, directory, config=pruned_config)
    pruned_config.save_pretrained(directory)
    generation = os.path.join(run.model_dir, "generation_config.json")
    if os.path.isfile(generation):
        shutil.copy(generation, directory)


def _unset_reconstruction(pruner_config: PrunerConfig, offload_hidden_states) -> PrunerConfig:
    """Unset `reconstruction` is resolved on a copy of the config (the planner writes it back), and is off with
    offloaded hidden states, which a refit cannot run with."""
    if pruner_config.reconstruction is not None:
        return pruner_config
    return dataclasses.replace(pruner_config, reconstruction=None if offload_hidden_states is None else False)


def prune_streaming(
    model_dir: str | os.PathLike,
    pruner_config: PrunerConfig,
    calibration_data=None,
    output_dir: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    dry_run: bool = False,
    max_shard_size: int | str = "5GB",
    trust_remote_code: bool = False,
    offload_hidden_states: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    plan: PruningPlan | str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    """Prune the safetensors checkpoint in `model_dir` layer by layer into `output_dir`, never loading it whole.

    Uniform or given widths (`layer_ratios`, `attention_layers`, `mlp_layers`, `min_heads`, `min_channels`,
    `uniform`) are known from the shapes: one pass scores each layer on the pruned model's activations (sequential
    statistics), prunes and writes it. `global_ranking=True` and `allocation="flap"` need every layer's scores first:
    pass 1 scores each layer on the unpruned model's activations, the in-memory allocation then sets the widths, and
    pass 2 reads each layer again, prunes it and writes it; the plan is the in-memory plan.

    Args:
        model_dir: a local checkpoint directory (config.json + safetensors shards) of a type in
            `STREAMING_MODEL_TYPES`; shards saved from the base model (no `transformer.`/`model.` prefix) work too.
        pruner_config (`PrunerConfig`): a layer-local criterion (magnitude, random, wanda_sp, flap, bip, mini_llm
            with `loss="block"`; frequency and reap for experts) and the structures `attention_heads` (or
            `query_heads`) / `mlp_channels` / `experts`.
        calibration_data: as for [`Pruner.prune`] (needed by data-driven criteria).
        output_dir: where the pruned checkpoint goes (written atomically); not needed for `dry_run`.
        tokenizer: defaults to the checkpoint's own (needed for text calibration data, copied to the output).
        dry_run (`bool`): plan widths, parameter counts and estimated peak memory only; reads no weights. Widths that
            follow from scores (two-pass) are reported as the uniform estimate and the parameter target.
        max_shard_size: output shard size (`"5GB"`, bytes, as `save_pretrained`); shards are written in place, so
            their size costs no memory.
        offload_hidden_states (`str`, *optional*): a folder for the calibration hidden states between layers, kept in
            a memory-mapped file there instead of RAM (removed at the end); the result is the same.
        progress: called as `progress(layer, num_layers)` after each layer of each pass (benchmarks, progress bars).
        plan ([`PruningPlan`] or a path to `pruning_plan.json` or its folder, *optional*): apply this plan instead of
            making one: one pass that slices and writes each layer, no calibration data. Any criterion may have made
            it (`pruner_config` is the config it was made with, recorded in the output), e.g. Taylor on a model
            offloaded with `device_map`: the pruned checkpoint is then written without loading the offloaded part.
            Heads and MLP channels of the streamed families; bias compensation (the plan's means) included.
        overwrite (`bool`, *optional*, defaults to `False`): write into a non-empty `output_dir` (see `output_dir.py`).

    Returns:
        `dict` with `params_before`, `params_after`, `planned_widths`, `widths_from_scores` (True for two-pass
        configs), `estimated_peak_bytes` and, unless `dry_run`, `plan` (the [`PruningPlan`]).
    """
    pruner_config = _unset_reconstruction(pruner_config, offload_hidden_states)
    run = _open_checkpoint(os.fspath(model_dir), pruner_config, plan, trust_remote_code)
    _plan_shapes(run)
    needs_data = ((run.importance.needs_data or run.compensate) and run.plan is None) or bool(run.reconstruction)
    _check_reconstruction_inputs(run, offload_hidden_states)
    report = _report(run, needs_data, offload_hidden_states is not None)
    if dry_run:
        return report
    if output_dir is None:
        raise ValueError("`output_dir` is required unless `dry_run=True`.")
    expected = round(report["checkpoint_bytes"] * report["params_after"] / max(report["params_before"], 1))
    check_output_directory(output_dir, (run.model_dir,), overwrite, expected)  # before the layers are read
    tokenizer = tokenizer if tokenizer is not None else _checkpoint_tokenizer(run.model_dir)
    batches = _calibration_batches(run, calibration_data, tokenizer) if needs_data else None
    macs_before = count_macs_per_token(run.model)
    inputs, hidden_file = _capture_calibration_inputs(run, batches, offload_hidden_states)
    if run.two_pass:
        _plan_from_scores(run, inputs, progress)
        inputs = None  # pass 2 needs no hidden states, unless it refits: then the first layer's inputs again
        _release_hidden_states(hidden_file)
        if run.reconstruction:
            inputs, hidden_file = _capture_calibration_inputs(run, batches, None)
        report["params_after"] = count_parameters(run.shape_model)
        report["planned_widths"] = _planned_widths(run.all_group_sets, run.kept_counts)
    with atomic_directory(output_dir, (run.model_dir,), overwrite, expected) as tmp:
        writer = ShardWriter(tmp, _output_layout(run), max_shard_size)
        kept = _write_layers(run, writer, inputs, progress)
        inputs = None
        _release_hidden_states(hidden_file)
        _copy_other_tensors(run, writer)
        if run.plan is None:  # one pass: the plan is what each layer kept
            run.plan = PruningPlan(run.config.model_type, run.num_layers, unit_counts=run.unit_counts, kept=kept)
        _write_config(run, tmp)
        summary = run_summary(
            run.model_dir,
            describe_data(calibration_data),
            (report["params_before"], report["params_after"]),
            (macs_before, count_macs_per_token(run.shape_model)),
        )
        write_run_files(
            tmp,
            tokenizer=tokenizer,
            pruner_config=run.pruner_config,
            plan=run.plan,
            summary=summary,
            model_config=run.shape_model.config,
            repo_or_path=os.fspath(output_dir),
        )
    report["plan"] = run.plan
    return report


def format_dry_run(report: dict) -> str:
    """A short human-readable summary of a dry run (or a run) report."""

    def gib(n: int) -> str:
        return f"{n / 2**30:.2f} GiB"

    removed = 1 - report["params_after"] / report["params_before"]
    if report.get("widths_from_scores") and "plan" not in report:
        lines = [
            f"Parameters: {report['params_before']:,} -> about {report['params_after']:,} (target: {removed:.1%} "
            "removed, ±1 point)",
            "Widths per layer follow from every layer's scores (global ranking / FLAP allocation): they are known "
            "only after the first streaming pass. Uniform estimate:",
        ]
    else:
        lines = [f"Parameters: {report['params_before']:,} -> {report['params_after']:,} ({removed:.1%} removed)"]
    for structure, per_layer in report["planned_widths"].items():
        values = sorted(set(per_layer.values()))
        if len(values) == 1:
            lines.append(f"{structure}: keep {values[0]} units per layer ({len(per_layer)} layers)")
        else:
            widths = ", ".join(str(per_layer[k]) for k in sorted(per_layer, key=int))
            lines.append(f"{structure}: keep {widths} units in layers 0-{len(per_layer) - 1}")
    peak = report["estimated_peak_bytes"]
    copy = (
        f", its {report['compute_dtype']} copy {gib(peak['layer_compute_bytes'])}"
        if peak["layer_compute_bytes"]
        else ""
    )
    lines.append(
        f"Checkpoint: {gib(report['checkpoint_bytes'])}; estimated peak tensor memory: {gib(peak['peak'])} "
        f"(largest layer {gib(peak['layer_bytes'])}{copy}; plus the Python/PyTorch runtime)"
    )
    lines.append(
        f"Computing in {report['compute_dtype']}, one layer at a time; written in {report['checkpoint_dtype']} "
        "(--compute-dtype)"
    )
    return "\n".join(lines)


__all__ = [
    "LAYER_LOCAL_NEEDS",
    "STREAMING_MODEL_TYPES",  # noqa: F822 - served by the module `__getattr__`
    "STREAMING_STRUCTURES",
    "available_memory_bytes",
    "check_streaming_config",
    "check_streaming_family",
    "format_dry_run",
    "in_memory_bytes",
    "layer_local_criteria",
    "needs_global_scores",
    "prune_streaming",
    "sequential_plan",
]
