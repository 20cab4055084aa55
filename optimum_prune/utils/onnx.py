"""ONNX export and ONNX Runtime inference of pruned checkpoints with optimum-onnx.

Stock-config results export as they are. The registered pruned types (`pruned_llama`, ...) build the same modules as
their base family, so their export config is the base family's (`LlamaOnnxConfig`), registered under the pruned
`model_type` the way optimum-onnx registers its own (`TasksManager.create_register("onnx")`). Per-layer head counts
need per-layer KV caches, which optimum-onnx sizes from one global count: the registered config draws each layer's
dummy cache with that layer's head count (`_per_layer_onnx_config`), and `align_ort_cache_shapes` gives an
`ORTModelForCausalLM` per-layer empty caches read from the graph.

`import optimum_prune` calls `install_onnx_integration`, which applies both when Optimum first imports the modules
concerned (`optimum.exporters.onnx.model_configs`, `optimum.onnxruntime.modeling_decoder`), so that
`optimum.pipelines.pipeline(..., accelerator="ort")`, `ORTModelForCausalLM.from_pretrained(..., export=True)` and
`ORTModelForCausalLM.from_pretrained(onnx_dir)` work with every checkpoint the package writes, without importing
ONNX Runtime up front.

optimum-onnx 0.1.0 needs Transformers < 4.58, so this runs in the 4.57 environment (`make test-compat`).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable

from ..modeling import PRUNED_MODEL_CLASSES


logger = logging.getLogger(__name__)


def is_optimum_onnx_available() -> bool:
    """Whether `optimum.exporters.onnx` (the optimum-onnx distribution) is importable."""
    try:
        return importlib.util.find_spec("optimum.exporters.onnx") is not None
    except ModuleNotFoundError:  # no `optimum` at all
        return False


def _base_model_type(config_class) -> str:
    """The stock `model_type` a registered pruned config derives from (`PrunedLlamaConfig` -> "llama")."""
    for parent in config_class.__mro__[1:]:
        model_type = getattr(parent, "model_type", "")
        if model_type:
            return model_type
    raise ValueError(f"{config_class.__name__} does not derive from a stock config class with a `model_type`.")


def register_onnx_configs() -> list[str]:
    """Register an ONNX export config for every registered pruned model type, reusing its base family's.

    Idempotent. Returns the pruned model types registered; `[]` (with a debug message) when optimum-onnx is not
    installed. `import optimum_prune` runs it when Optimum loads its exporters' configs (`install_onnx_integration`),
    so `optimum-cli export onnx --model <pruned_llama dir>`, `main_export`,
    `ORTModelForCausalLM.from_pretrained(..., export=True)` and `optimum.pipelines.pipeline(..., accelerator="ort")`
    know the pruned types; it also makes Optimum count the package's model classes as Transformers models.

    Example:

    ```python
    >>> from optimum_prune.utils.onnx import register_onnx_configs
    >>> register_onnx_configs()
    ['pruned_llama']
    ```
    """
    if not is_optimum_onnx_available():
        logger.debug("optimum-onnx is not installed; no ONNX export configs registered.")
        return []
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the stock families' ONNX configs
    from optimum.exporters.tasks import TasksManager

    supported = TasksManager._SUPPORTED_MODEL_TYPE  # model_type -> {exporter: {task: constructor}}
    register = TasksManager.create_register("onnx")
    registered = []
    for pruned_type, (config_class, _) in PRUNED_MODEL_CLASSES.items():
        base_type = _base_model_type(config_class)
        constructors = supported.get(base_type, {}).get("onnx", {})
        if not constructors:
            logger.debug("optimum-onnx has no ONNX config for %r; %r cannot be exported.", base_type, pruned_type)
            continue
        for task, constructor in constructors.items():  # `functools.partial(config_cls, task=task)`
            register(pruned_type, task)(_per_layer_onnx_config(constructor.func))
        registered.append(pruned_type)
    _count_pruned_classes_as_transformers(TasksManager)
    return registered


def _is_pruned_model_class(model_class) -> bool:
    """Whether `model_class` is one of the package's Transformers models (`PrunedLlamaForCausalLM`, ...)."""
    from transformers import PreTrainedModel

    return (
        isinstance(model_class, type)
        and issubclass(model_class, PreTrainedModel)
        and model_class.__module__.split(".")[0] == __name__.split(".")[0]
    )


def _count_pruned_classes_as_transformers(tasks_manager) -> None:
    """Make `TasksManager` infer the library "transformers" for the package's model classes.

    optimum-onnx 0.1.0 infers a loaded model's library from its class's module name (`transformers.*`), so the
    `optimum_prune.modeling` classes fail with "The library name could not be automatically inferred" (the
    remote-code copies, `transformers_modules.*`, pass). Idempotent.
    """
    infer = tasks_manager._infer_library_from_model_or_model_class  # a classmethod, bound to `tasks_manager`
    if getattr(infer, "counts_pruned_classes", False):
        return

    def infer_library(model=None, model_class=None):
        if (model is None) != (model_class is None) and _is_pruned_model_class(model_class or type(model)):
            return "transformers"
        return infer(model=model, model_class=model_class)

    infer_library.counts_pruned_classes = True
    tasks_manager._infer_library_from_model_or_model_class = staticmethod(infer_library)


def cache_heads_per_layer(config) -> list[int] | None:
    """Each decoder layer's KV-cache head count for a config with per-layer widths (`per_layer_config`); `None` when
    every layer has the global one."""
    if not getattr(config, "per_layer_overrides", None):
        return None
    heads = []
    for i in range(config.num_hidden_layers):
        layer = config.layer_config(i)
        heads.append(getattr(layer, "num_key_value_heads", None) or layer.num_attention_heads)
    return heads


def _cache_head_dim(config) -> int | None:
    """The KV cache's head size of a registered pruned config (its explicit `head_dim`); `None` for other configs.

    optimum-onnx 0.1.0's dummy caches for OPT and BLOOM use `hidden_size // num_attention_heads`, which head pruning
    changes while the heads keep their width."""
    if not hasattr(config, "layer_config"):  # not one of the package's registered types
        return None
    return getattr(config, "head_dim", None)


def _per_layer_pkv_generator(generator_class):
    """`generator_class` drawing layer i's dummy cache with layer i's head count and the config's head size (4D
    `[batch, heads, seq, head_dim]`)."""
    import torch

    class PerLayerPastKeyValuesGenerator(generator_class):
        def __init__(self, task, normalized_config, *args, **kwargs):
            super().__init__(task, normalized_config, *args, **kwargs)
            self.model_config = getattr(normalized_config, "config", None)

        def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
            past = super().generate(input_name, framework=framework, int_dtype=int_dtype, float_dtype=float_dtype)
            heads, head_dim = cache_heads_per_layer(self.model_config), _cache_head_dim(self.model_config)
            if input_name != "past_key_values" or framework != "pt" or (heads is None and head_dim is None):
                return past
            heads = heads or [None] * len(past)
            return [
                tuple(
                    torch.rand((t.shape[0], h or t.shape[1], t.shape[2], head_dim or t.shape[3]), dtype=t.dtype)
                    if t.dim() == 4
                    else t
                    for t in pair
                )
                for pair, h in zip(past, heads)
            ]

    PerLayerPastKeyValuesGenerator.__name__ = f"PerLayer{generator_class.__name__}"
    return PerLayerPastKeyValuesGenerator


@functools.cache
def _per_layer_onnx_config(onnx_config_class):
    """A subclass of a family's ONNX config whose dummy KV caches follow per-layer head counts (unchanged otherwise)."""
    generators = tuple(
        _per_layer_pkv_generator(g) if "past_key_values" in getattr(g, "SUPPORTED_INPUT_NAMES", ()) else g
        for g in onnx_config_class.DUMMY_INPUT_GENERATOR_CLASSES
    )
    attrs = {"DUMMY_INPUT_GENERATOR_CLASSES": generators}
    pkv = getattr(onnx_config_class, "DUMMY_PKV_GENERATOR_CLASS", None)
    if pkv is not None:
        attrs["DUMMY_PKV_GENERATOR_CLASS"] = _per_layer_pkv_generator(pkv)
    attrs["__module__"] = __name__
    return type(f"PerLayer{onnx_config_class.__name__}", (onnx_config_class,), attrs)


def align_ort_cache_shapes(model):
    """Make an `ORTModelForCausalLM` size its empty KV cache from the ONNX graph, not from the config.

    optimum-onnx 0.1.0 takes the cache's head size as `hidden_size // num_attention_heads` (and, for model types it
    does not list, the KV head count as `num_attention_heads`). After head or hidden-channel pruning neither holds:
    the tensors keep `head_dim` and `num_key_value_heads`, and the first `generate`/forward call fails with
    "Got invalid dimensions for input: past_key_values.0.key". The exported graph states both sizes exactly; this
    copies them onto the model. Returns `model`. Once `optimum_prune` is imported, every `ORTModelForCausalLM`
    gets this when it is built (`install_onnx_integration`); call it yourself only on a model built before that.

    Args:
        model (`ORTModelForCausalLM`):
            A model loaded with `ORTModelForCausalLM.from_pretrained` (or `pipeline(...).model`).
    """
    shapes = {
        node.name: node.shape  # [batch, kv_heads, past_len, head_dim]
        for node in model.session.get_inputs()
        if node.name.startswith("past_key_values.") and len(node.shape) == 4
    }
    if not shapes:
        return model
    _, num_key_value_heads, _, head_dim = next(iter(shapes.values()))
    if isinstance(num_key_value_heads, int) and isinstance(head_dim, int):
        model.num_key_value_heads, model.embed_size_per_head = num_key_value_heads, head_dim
    if len({shape[1] for shape in shapes.values()}) > 1:  # per-layer head counts: per-layer empty caches
        _give_per_layer_empty_caches(model, shapes)
        _give_per_layer_output_shapes(model)
    return model


def _give_per_layer_empty_caches(model, shapes: dict) -> None:
    """Wrap `model.forward` so that a call without `past_key_values` gets zero-length caches shaped per layer (the
    model's own would give every layer the same head count)."""
    import torch

    forward = model.forward

    def per_layer_forward(input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is None and input_ids is not None:  # the model's own empty caches would be used
            batch = input_ids.shape[0]
            empty = [
                torch.zeros((batch, shapes[name][1], 0, shapes[name][3]), dtype=model.dtype, device=model.device)
                for name in model.key_value_input_names  # layer 0 key, layer 0 value, layer 1 key, ...
            ]
            past_key_values = tuple(zip(empty[0::2], empty[1::2]))  # per layer (key, value), as a cache is passed
        return forward(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)

    model.forward = per_layer_forward


def _give_per_layer_output_shapes(model) -> None:
    """Wrap `model._prepare_io_binding` so that, with IO binding, each layer's returned cache is allocated with that
    layer's head count (the model passes one global shape for every `present.*` output)."""
    graph_shapes = {
        node.name: node.shape  # [batch, kv_heads, total_len, head_dim]
        for node in model.session.get_outputs()
        if node.name.startswith("present.") and len(node.shape) == 4
    }
    prepare = model._prepare_io_binding

    def per_layer_prepare(model_inputs, *args, known_output_shapes=None, **kwargs):
        if known_output_shapes:
            known_output_shapes = {
                name: (shape[0], graph_shapes[name][1], shape[2], graph_shapes[name][3])
                if name in graph_shapes
                else shape
                for name, shape in known_output_shapes.items()
            }
        return prepare(model_inputs, *args, known_output_shapes=known_output_shapes, **kwargs)

    model._prepare_io_binding = per_layer_prepare


def _size_caches_from_graph(ort_model_class) -> None:
    """Wrap `ort_model_class.__init__` (`ORTModelForCausalLM`) so that every instance gets `align_ort_cache_shapes`.

    That is where optimum-onnx 0.1.0 derives the cache sizes from the config; for a graph whose cache inputs agree
    with them (any unpruned model) the values stay the same. Idempotent.
    """
    init = ort_model_class.__init__
    if getattr(init, "sizes_caches_from_graph", False):
        return

    @functools.wraps(init)
    def init_then_align(self, *args, **kwargs):
        init(self, *args, **kwargs)
        align_ort_cache_shapes(self)

    init_then_align.sizes_caches_from_graph = True
    ort_model_class.__init__ = init_then_align


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` right after the module `name` is first executed (Optimum imports it lazily)."""

    def __init__(self, name: str, callback: Callable):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once: the finders below locate the module, and a later import is a no-op
        for finder in sys.meta_path:
            spec = getattr(finder, "find_spec", lambda *args: None)(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_call(module):
            exec_module(module)
            _run_hook(callback, module)

        spec.loader.exec_module = exec_then_call
        return spec


def _run_hook(callback: Callable, module) -> None:
    """Call `callback(module)`; a failure is logged, never raised into the user's `import` of an Optimum module."""
    try:
        callback(module)
    except Exception as error:  # an optimum-onnx release that moved what the callback adapts
        logger.warning("optimum-prune could not adapt %s (%s): pruned checkpoints may not run there.", module, error)


def _after_import(name: str, callback: Callable) -> None:
    """`callback(module)` now if `name` is imported, else right after its first import."""
    if name in sys.modules:
        _run_hook(callback, sys.modules[name])
    elif not any(isinstance(finder, _AfterImport) and finder.name == name for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def install_onnx_integration() -> None:
    """Let optimum-onnx export and run every checkpoint the package writes; `import optimum_prune` calls this.

    Registers the pruned model types' ONNX configs (`register_onnx_configs`) once Optimum imports its exporters'
    configs, and sizes every `ORTModelForCausalLM`'s empty KV cache from its graph (`align_ort_cache_shapes`) once
    Optimum imports that class. Neither module is imported here (that would load ONNX Runtime on every
    `import optimum_prune`). Nothing happens without optimum-onnx.
    """
    if not is_optimum_onnx_available():
        return
    _after_import("optimum.exporters.onnx.model_configs", lambda module: register_onnx_configs())
    _after_import(
        "optimum.onnxruntime.modeling_decoder", lambda module: _size_caches_from_graph(module.ORTModelForCausalLM)
    )
