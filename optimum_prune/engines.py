"""Which engine prunes a checkpoint, and [`prune_checkpoint`]: checkpoint in, pruned checkpoint out, any engine.

Three engines run the one pipeline (the [`Planner`] plans from shapes and scores, `writer.py` writes the output):

- `memory`: the model loaded with `AutoModelForCausalLM.from_pretrained` ([`Pruner`]); everything is possible there
  (every criterion, evaluation, devices, dtypes, iterative pruning);
- `dispatched`: the same, spread with `device_map` over devices, CPU and disk; a disk-offloaded model's plan is
  written layer by layer from the original shards, so the offloaded part is never loaded for surgery;
- `streaming`: layer by layer from the safetensors shards ([`prune_streaming`]), for layer-local criteria.

[`choose_engine`] is the one place that decides, for the Python API and the CLI alike (the CLI only parses arguments
and calls [`prune_checkpoint`]).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import streaming
from .architectures.base import CHECKPOINT_CONVERTERS, get_architecture
from .auto import AutoPruner
from .configuration import PrunerConfig
from .inputs import (
    check_data_file,
    check_device,
    check_model_config,
    check_model_source,
    check_safetensors,
    check_seq_len,
    read_config_json,
)
from .metrics import count_parameters
from .output_dir import check_output_directory


logger = logging.getLogger(__name__)

MEMORY, DISPATCHED, STREAMING = "memory", "dispatched", "streaming"


@dataclass(frozen=True)
class EngineChoice:
    """The engine for a run, the config it runs with (`streaming=True` when streaming was chosen for lack of
    memory) and why, in words."""

    engine: str
    config: PrunerConfig
    reason: str


def choose_engine(
    config: PrunerConfig,
    checkpoint: str | os.PathLike,
    *,
    streaming_asked: bool = False,
    device_map=None,
    dtype=torch.float32,
    needs_loaded_model: bool = False,
    available_bytes: int | None = None,
    trust_remote_code: bool = False,
) -> EngineChoice:
    """Pick the engine: `streaming` when the config (or `streaming_asked`, e.g. to apply a given plan) asks for it; `dispatched` with a `device_map`; else `memory`,
    unless the local checkpoint would not fit in the available memory once loaded (at `dtype`; `"auto"` keeps the
    stored one) and streaming can prune it with this config.

    Args:
        needs_loaded_model: the run uses what only a loaded model offers (evaluation, a device, a dtype other than the
            checkpoint's or float32), so it is never moved to streaming.
        available_bytes: memory available to the run; measured when not given (`streaming.available_memory_bytes`).
    """
    if config.streaming or streaming_asked:
        return EngineChoice(STREAMING, config, "streaming was asked for")
    if device_map is not None:
        return EngineChoice(DISPATCHED, config, f"device_map={device_map!r}")
    if needs_loaded_model or not os.path.isdir(checkpoint) or dtype not in (torch.float32, "auto"):
        return EngineChoice(MEMORY, config, "in memory, as asked")
    available = available_bytes if available_bytes is not None else streaming.available_memory_bytes()
    try:
        needed = streaming.in_memory_bytes(checkpoint, None if dtype == "auto" else dtype)
    except ValueError:
        return EngineChoice(MEMORY, config, "no safetensors checkpoint to stream from")
    if available is None or needed <= available:
        return EngineChoice(MEMORY, config, "it fits in memory")
    sizes = f"about {needed / 2**30:.2f} GiB loaded, {available / 2**30:.2f} GiB available"
    try:
        streaming_config = PrunerConfig.from_dict({**config.to_dict(), "streaming": True})
        streaming.check_streaming_config(streaming_config, _model_type(checkpoint, trust_remote_code))
    except ValueError as err:
        logger.warning("The checkpoint needs %s, but it cannot be pruned layer by layer (%s); loading it.", sizes, err)
        return EngineChoice(MEMORY, config, f"{sizes}; streaming cannot run this config")
    logger.warning("The checkpoint needs %s: pruning layer by layer from its shards (streaming).", sizes)
    return EngineChoice(STREAMING, streaming_config, sizes)


def _model_type(checkpoint, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code).model_type


def check_run_inputs(model, config: PrunerConfig, calibration_data=None, eval_data=None, device=None) -> None:
    """What can be checked without loading the model, before any work: the device, the model path (or Hub id), its
    config.json, architecture and safetensors files, the data files, and the calibration window against the model's
    positions."""
    check_device(device)
    check_data_file(calibration_data, "--calibration")
    check_data_file(eval_data, "--eval")
    local = check_model_source(model)
    if local is None:
        return  # a Hub id: `AutoPruner.from_pretrained` checks what it downloads
    model_config = read_config_json(local)
    if model_config["model_type"] not in CHECKPOINT_CONVERTERS:
        check_model_config(model_config, get_architecture(model_config["model_type"]))
    if calibration_data is not None:
        check_seq_len(config.calibration_seq_len, model_config)
    check_safetensors(local)


def offloaded_to_disk(model) -> bool:
    return "disk" in (getattr(model, "hf_device_map", None) or {}).values()


def shards_can_apply(plan, config: PrunerConfig, model_dir) -> bool:
    """Whether streaming can apply `plan` to the checkpoint in `model_dir` as its shards are (not, say, a ChatGLM
    checkpoint that was converted when loaded)."""
    try:
        streaming.check_plan_streamable(plan, config, streaming.declared_model_type(model_dir))
    except ValueError:
        return False
    return True


def prune_checkpoint(
    model: str | os.PathLike,
    pruner_config: PrunerConfig,
    output_dir: str | os.PathLike | None,
    calibration_data=None,
    *,
    eval_data=None,
    eval_seq_len: int = 256,
    eval_windows: int | None = 64,
    dtype=torch.float32,
    device: str | None = None,
    device_map=None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    overwrite: bool = False,
    streaming_asked: bool = False,
    plan=None,
    dry_run: bool = False,
    max_shard_size: int | str = "5GB",
    offload_hidden_states: str | os.PathLike | None = None,
) -> dict:
    """Prune the checkpoint `model` (a local directory or Hub id) into `output_dir` with the engine [`choose_engine`]
    picks, after checking every input and the output location. What `optimum-prune prune` runs.

    `streaming_asked=True` streams whatever the config says (to apply a given `plan`, which any criterion may have
    made); `dry_run` (streaming only) plans widths, parameter counts and peak memory and writes nothing.

    Returns:
        `dict` with `engine`, `before` and `after` (`parameters`, and `perplexity` when `eval_data` is given),
        `model_type` (of the output) and, for streaming runs, `streaming` (the [`prune_streaming`] report; with
        `dry_run` nothing is written and only it is filled in).
    """
    check_run_inputs(model, pruner_config, calibration_data, eval_data, device)
    if not dry_run:  # before any work: never the input's folder, a non-empty foreign one, or unwritable
        inputs = (model, calibration_data, eval_data, plan)
        check_output_directory(output_dir, [i for i in inputs if isinstance(i, (str, os.PathLike))], overwrite)
    _check_placement(device, device_map, max_memory, offload_folder)
    loaded_only = bool(eval_data) or bool(device)
    choice = choose_engine(
        pruner_config,
        model,
        streaming_asked=streaming_asked,
        device_map=device_map,
        dtype=dtype,
        needs_loaded_model=loaded_only,
        trust_remote_code=trust_remote_code,
    )
    writing = {"max_shard_size": max_shard_size, "overwrite": overwrite}
    if choice.engine == STREAMING:
        if loaded_only or device_map is not None or dtype not in (torch.float32, "auto"):
            raise ValueError(
                "`--streaming` keeps the checkpoint's dtype, runs on the CPU and does not evaluate; drop --eval, "
                "--device, --device-map and --dtype."
            )
        streaming_options = {"trust_remote_code": trust_remote_code, "offload_hidden_states": offload_hidden_states}
        report = streaming.prune_streaming(
            model,
            choice.config,
            calibration_data,
            output_dir,
            dry_run=dry_run,
            plan=plan,
            **streaming_options,
            **writing,
        )
        return _streaming_result(report)
    if dry_run:
        raise ValueError("`--dry-run` plans a streaming run from the config alone; add `--streaming`.")
    if plan is not None:
        raise ValueError(
            "`--plan` applies a plan layer by layer from the checkpoint's shards; add `--streaming` (in Python, "
            "`PruningPlan.from_pretrained(path).apply(model)` applies it to a loaded model)."
        )
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    pruner = AutoPruner.from_pretrained(
        model,
        pruner_config=choice.config,
        allow_pickle=allow_pickle,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        **{k: v for k, v in placement.items() if v is not None},
    )
    if device:
        pruner.model.to(device)
    evaluation = (eval_data, eval_seq_len, eval_windows)
    return {"engine": choice.engine, **_prune_loaded(pruner, model, output_dir, calibration_data, evaluation, writing)}


def _check_placement(device, device_map, max_memory, offload_folder) -> None:
    if device_map is not None and device:
        raise ValueError("`--device` and `--device-map` both place the model; give one of them.")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("`--max-memory` and `--offload-folder` apply with `--device-map` (e.g. `--device-map auto`).")


def _prune_loaded(pruner, model_dir, output_dir, calibration_data, evaluation: tuple, writing: dict) -> dict:
    """The in-memory and dispatched engines: prune the loaded model (measuring perplexity around it when asked) and
    save; a model offloaded to disk is written layer by layer from the original shards instead, as its plan says."""
    eval_data = evaluation[0]
    before = {"parameters": count_parameters(pruner.model)}
    if eval_data:  # recorded on the pruner, so the card's results table and `model-index` carry the measured values
        before["perplexity"] = pruner.evaluate(*evaluation)
    if offloaded_to_disk(pruner.model) and os.path.isdir(model_dir) and not eval_data:
        # Score where the model is; write layer by layer from the shards when streaming can apply the plan.
        computed = pruner.compute_plan(calibration_data=calibration_data)
        if shards_can_apply(computed, pruner.config, model_dir):
            data = calibration_data if computed.reconstruction else None  # a refit plan is refit layer by layer too
            report = streaming.prune_streaming(model_dir, pruner.config, data, output_dir, plan=computed, **writing)
            return {**_streaming_result(report), "engine": DISPATCHED, "before": before}
        pruner.apply_plan(computed, calibration_data=calibration_data)
    else:
        pruner.prune(calibration_data=calibration_data)
    after = {"parameters": count_parameters(pruner.model)}
    if eval_data:
        after["perplexity"] = pruner.evaluate(*evaluation)
    pruner.save_pretrained(output_dir, overwrite=writing["overwrite"])
    return {"before": before, "after": after, "model_type": pruner.model.config.model_type}


def _streaming_result(report: dict) -> dict:
    plan = report.get("plan")
    return {
        "engine": STREAMING,
        "before": {"parameters": report["params_before"]},
        "after": {"parameters": report["params_after"]},
        "model_type": None if plan is None else plan.model_type,
        "streaming": report,
    }
