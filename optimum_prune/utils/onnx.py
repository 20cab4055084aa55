"""ONNX export and ONNX Runtime inference of pruned checkpoints with optimum-onnx.

Stock-config results export as they are. The registered pruned types (`pruned_llama`, ...) build the same modules as
their base family, so their export config is the base family's (`LlamaOnnxConfig`), registered under the pruned
`model_type` the way optimum-onnx registers its own (`TasksManager.create_register("onnx")`).

optimum-onnx 0.1.0 needs Transformers < 4.58, so this runs in the 4.57 environment (`make test-compat`).
"""

from __future__ import annotations

import importlib.util
import logging


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
    installed. `optimum-cli` calls it through `optimum.commands.register.register_prune`, so
    `optimum-cli export onnx --model <pruned_llama dir>` works; call it yourself before `main_export`,
    `ORTModelForCausalLM.from_pretrained(..., export=True)` or `optimum.pipelines.pipeline(..., accelerator="ort")`.

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

    from ..modeling import PRUNED_MODEL_CLASSES

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
            register(pruned_type, task)(constructor.func)
        registered.append(pruned_type)
    return registered


def align_ort_cache_shapes(model):
    """Make an `ORTModelForCausalLM` size its empty KV cache from the ONNX graph, not from the config.

    optimum-onnx 0.1.0 takes the cache's head size as `hidden_size // num_attention_heads` (and, for model types it
    does not list, the KV head count as `num_attention_heads`). After head or hidden-channel pruning neither holds:
    the tensors keep `head_dim` and `num_key_value_heads`, and the first `generate`/forward call fails with
    "Got invalid dimensions for input: past_key_values.0.key". The exported graph states both sizes exactly; this
    copies them onto the model. Returns `model`.

    Args:
        model (`ORTModelForCausalLM`):
            A model loaded with `ORTModelForCausalLM.from_pretrained` (or `pipeline(...).model`).
    """
    for node in model.session.get_inputs():
        if node.name.startswith("past_key_values.") and node.name.endswith(".key"):
            _, num_key_value_heads, _, head_dim = node.shape  # [batch, kv_heads, past_len, head_dim]
            if isinstance(num_key_value_heads, int) and isinstance(head_dim, int):
                model.num_key_value_heads, model.embed_size_per_head = num_key_value_heads, head_dim
            break
    return model
