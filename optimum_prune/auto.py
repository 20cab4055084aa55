"""AutoPruner: the entry point, keyed by `model_type` like Transformers' auto classes."""

from __future__ import annotations

import logging
import os

from .architectures.base import (
    ARCHITECTURE_REGISTRY,
    CHECKPOINT_CONVERTERS,
    ArchitectureSpec,
    get_architecture,
    register_architecture,
)
from .configuration import PrunerConfig
from .inputs import (
    check_model_config,
    check_model_source,
    check_safetensors,
    declared_model_type,
    load_causal_lm,
    read_config_json,
)
from .pruner import Pruner
from .utils.safe_weights import weights_loading_kwargs


logger = logging.getLogger(__name__)


class AutoPruner:
    """Builds a [`Pruner`] for any registered architecture.

    Example:

    ```python
    >>> import torch
    >>> from optimum_prune import AutoPruner, PrunerConfig
    >>> config = PrunerConfig(pruning_ratio=0.2, importance="taylor")
    >>> pruner = AutoPruner.from_pretrained("path/to/llama", pruner_config=config, dtype=torch.float32)
    >>> model = pruner.prune(calibration_data="calibration.txt")
    ```
    """

    def __init__(self):
        raise OSError("AutoPruner is built with `AutoPruner.from_pretrained(...)` or `AutoPruner.from_model(...)`.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        pruner_config: PrunerConfig | None = None,
        *,
        allow_pickle: bool = False,
        **kwargs,
    ) -> Pruner:
        """Load a causal LM (kwargs go to `AutoModelForCausalLM.from_pretrained`: dtype, device_map, max_memory,
        offload_folder, revision, token, trust_remote_code) and its tokenizer, and return a [`Pruner`] for it.

        A checkpoint whose only weights are pickled (`pytorch_model*.bin`, `*.pt`, ...) is refused before anything is
        read, because unpickling can execute code: pass `allow_pickle=True` for one you trust (see
        `optimum_prune.utils.safe_weights`). Otherwise only safetensors weights are loaded.

        With `device_map="auto"` and `max_memory`, the model is spread over the GPUs, the CPU and the disk
        (`offload_folder`); every criterion runs on the dispatched model and the pruned model is dispatched again with
        each module on the device it had (see `optimum_prune.offload.apply_plan_dispatched` for the memory used).

        A checkpoint whose `model_type` has a registered converter (ChatGLM2/3 and GLM-4's remote-code `chatglm`) is
        converted to its native family instead, without running the checkpoint's modeling code; the kwargs then go
        to the converter (for `chatglm`: `dtype`, `device_map`, `allow_pickle`, `rope_ratio_mode` and the Hub
        arguments, see `optimum_prune.architectures.chatglm.load_chatglm_checkpoint`). The tokenizer is still loaded
        with `AutoTokenizer` and the `trust_remote_code` you pass.
        """
        from transformers import AutoConfig, AutoTokenizer

        if pruner_config is not None and pruner_config.streaming:
            raise ValueError(
                "`PrunerConfig(streaming=True)` prunes from the checkpoint's shards without loading the model: call "
                "`optimum_prune.streaming.prune_streaming(model_dir, pruner_config, calibration_data, output_dir)`."
            )
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "trust_remote_code", "cache_dir") if k in kwargs}
        local = check_model_source(pretrained_model_name_or_path, kwargs.get("revision"), kwargs.get("cache_dir"))
        safe_kwargs = weights_loading_kwargs(
            pretrained_model_name_or_path, allow_pickle, **hub_kwargs, **_local_files_only(kwargs)
        )
        declared = read_config_json(local) if local is not None else None
        if declared is not None:
            model_type = declared["model_type"]
        else:
            model_type = _checkpoint_model_type(pretrained_model_name_or_path, hub_kwargs)
        converter = CHECKPOINT_CONVERTERS.get(model_type)
        if converter is not None:
            if local is not None:
                check_safetensors(local)  # `load_causal_lm` checks them on the other path
            model = converter(pretrained_model_name_or_path, allow_pickle=allow_pickle, **kwargs)
            # Without an explicit choice, AutoTokenizer would read the checkpoint's `auto_map` and prompt to run it.
            hub_kwargs.setdefault("trust_remote_code", False)
        else:
            if declared is not None:  # fail before any config class (or remote code) is loaded
                check_model_config(declared, get_architecture(model_type))
            model_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
            spec = get_architecture(model_config.model_type)  # fail before loading weights
            if declared is None:
                check_model_config(model_config.to_dict(), spec)
            model = load_causal_lm(pretrained_model_name_or_path, **{**kwargs, **safe_kwargs})
        try:
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except (OSError, ValueError) as err:
            logger.warning(
                "No tokenizer loaded from %s (%s); pass token ids as calibration data.",
                pretrained_model_name_or_path,
                err,
            )
            tokenizer = None
        pruner = cls.from_model(
            model, pruner_config, tokenizer=tokenizer, name_or_path=str(pretrained_model_name_or_path)
        )
        pruner.offload_folder = kwargs.get("offload_folder")
        return pruner

    @classmethod
    def from_model(cls, model, pruner_config: PrunerConfig | None = None, tokenizer=None, name_or_path=None) -> Pruner:
        """A [`Pruner`] for a model already in memory, or dispatched with `device_map` (several devices, CPU or disk
        offload; see `optimum_prune.offload`)."""
        pruner_config = pruner_config if pruner_config is not None else PrunerConfig()
        if not isinstance(pruner_config, PrunerConfig):
            raise TypeError(f"`pruner_config` must be a PrunerConfig, got {type(pruner_config).__name__}.")
        model_type = model.config.model_type
        if model_type in CHECKPOINT_CONVERTERS and model_type not in ARCHITECTURE_REGISTRY:
            raise ValueError(
                f"A {model_type!r} model is pruned after conversion to its native family: use "
                "`AutoPruner.from_pretrained(path)` on its checkpoint, which converts it without running remote code."
            )
        spec = get_architecture(model_type)
        return Pruner(model, spec, pruner_config, tokenizer=tokenizer, name_or_path=name_or_path)

    @staticmethod
    def register(model_type: str, spec: ArchitectureSpec, exist_ok: bool = False) -> None:
        """Register the spec of a new family under its `model_type` (in memory and dispatched pruning); declare that it
        streams, or give it a checkpoint converter, with `optimum_prune.architectures.register_family`."""
        register_architecture(model_type, spec, exist_ok=exist_ok)

    @staticmethod
    def supported_model_types() -> list[str]:
        return sorted(ARCHITECTURE_REGISTRY)


def _local_files_only(kwargs: dict) -> dict:
    return {"local_files_only": kwargs["local_files_only"]} if "local_files_only" in kwargs else {}


def _checkpoint_model_type(path, hub_kwargs: dict) -> str | None:
    """`model_type` read from config.json as plain JSON (a directory or Hub repo), so that no `auto_map` code runs;
    None when there is no readable config.json (AutoConfig then raises its usual error)."""
    from transformers.utils import cached_file

    kwargs = {k: v for k, v in hub_kwargs.items() if k != "trust_remote_code"}
    try:
        config_file = cached_file(
            path,
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        logger.debug("Could not find config.json of %s: %s", path, err)
        return None
    return None if config_file is None else declared_model_type(config_file)
