"""Which engine prunes a checkpoint, and [`prune_checkpoint`]: checkpoint in, pruned checkpoint out, any engine.

Three engines run the one pipeline (the [`Planner`] plans from shapes and scores, `writer.py` writes the output):

- `memory`: the model loaded with `AutoModelForCausalLM.from_pretrained` ([`Pruner`]); everything is possible there
  (every criterion, evaluation, devices, dtypes, iterative pruning);
- `dispatched`: the same, spread with `device_map` over devices, CPU and disk; a disk-offloaded model's plan is
  written layer by layer from the original shards, so the offloaded part is never loaded for surgery;
- `streaming`: layer by layer from the safetensors shards ([`prune_streaming`]), for layer-local criteria.

Each is an [`Engine`] (`check` what it cannot run, then `run` a checked [`PruneJob`]), registered in `ENGINES`.
[`choose_engine`] is the one place that decides which, for the Python API and the CLI alike (the CLI only parses
arguments and calls [`prune_checkpoint`]).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

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
    declared_model_type,
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
        streaming.check_plan_streamable(plan, config, declared_model_type(model_dir))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class PruneJob:
    """One run, checked: the checkpoint, the config it runs with, where it goes, and how it is loaded, evaluated and
    written. What an [`Engine`] runs."""

    model: str | os.PathLike
    config: PrunerConfig
    output_dir: str | os.PathLike | None
    calibration_data: object = None
    eval_data: object = None
    eval_seq_len: int = 256
    eval_windows: int | None = 64
    loading: dict = field(default_factory=dict)  # dtype, device, placement, trust_remote_code, allow_pickle
    writing: dict = field(default_factory=dict)  # max_shard_size, overwrite
    plan: object = None
    dry_run: bool = False
    offload_hidden_states: str | os.PathLike | None = None

    @property
    def evaluation(self) -> tuple:
        return self.eval_data, self.eval_seq_len, self.eval_windows

    @property
    def needs_loaded_model(self) -> bool:
        """Evaluation and a device exist only for a loaded model."""
        return bool(self.eval_data) or bool(self.loading.get("device"))


class Engine(Protocol):
    """How a checkpoint is pruned into an output folder. Every engine plans with the [`Planner`], collects the
    statistics a criterion `needs` with the same accumulators (`calibration.Statistics`), applies plans with
    `surgery`, and writes with `writer.py`; they differ only in where the layers are while that happens."""

    name: str

    def check(self, job: PruneJob) -> None:
        """Refuse, with one line, what this engine cannot run, before any work."""

    def run(self, job: PruneJob) -> dict:
        """Prune and write; returns `before`, `after` and `model_type` (see [`prune_checkpoint`])."""


class MemoryEngine:
    """The model loaded with `AutoModelForCausalLM.from_pretrained` ([`Pruner`]): every criterion, evaluation, devices
    and dtypes."""

    name = MEMORY

    def check(self, job: PruneJob) -> None:
        if job.dry_run:
            raise ValueError("`--dry-run` plans a streaming run from the config alone; add `--streaming`.")
        if job.plan is not None:
            raise ValueError(
                "`--plan` applies a plan layer by layer from the checkpoint's shards; add `--streaming` (in Python, "
                "`PruningPlan.from_pretrained(path).apply(model)` applies it to a loaded model)."
            )

    def load(self, job: PruneJob):
        loading = dict(job.loading)
        device = loading.pop("device", None)
        placement = {k: loading.pop(k, None) for k in ("device_map", "max_memory", "offload_folder")}
        pruner = AutoPruner.from_pretrained(
            job.model, pruner_config=job.config, **loading, **{k: v for k, v in placement.items() if v is not None}
        )
        if device:
            pruner.model.to(device)
        return pruner

    def run(self, job: PruneJob) -> dict:
        pruner = self.load(job)
        before = self.measure(pruner, job)
        pruner.prune(calibration_data=job.calibration_data)
        return self.save(pruner, job, before)

    @staticmethod
    def measure(pruner, job: PruneJob) -> dict:
        measured = {"parameters": count_parameters(pruner.model)}
        if job.eval_data:  # recorded on the pruner, so the card's results table and `model-index` carry the values
            measured["perplexity"] = pruner.evaluate(*job.evaluation)
        return measured

    def save(self, pruner, job: PruneJob, before: dict) -> dict:
        after = self.measure(pruner, job)
        pruner.save_pretrained(job.output_dir, overwrite=job.writing.get("overwrite", False))
        return {"engine": self.name, "before": before, "after": after, "model_type": pruner.model.config.model_type}


class DispatchedEngine(MemoryEngine):
    """The loaded model spread with `device_map` over devices, CPU and disk. A disk-offloaded model is scored where it
    is and its plan written layer by layer from the original shards, so the offloaded part is never loaded for
    surgery."""

    name = DISPATCHED

    def run(self, job: PruneJob) -> dict:
        pruner = self.load(job)
        before = self.measure(pruner, job)
        if not (offloaded_to_disk(pruner.model) and os.path.isdir(job.model) and not job.eval_data):
            pruner.prune(calibration_data=job.calibration_data)
            return self.save(pruner, job, before)
        computed = pruner.compute_plan(calibration_data=job.calibration_data)
        if not shards_can_apply(computed, pruner.config, job.model):
            pruner.apply_plan(computed, calibration_data=job.calibration_data)
            return self.save(pruner, job, before)
        data = job.calibration_data if computed.reconstruction else None  # a refit plan is refit layer by layer too
        report = streaming.prune_streaming(
            job.model, pruner.config, data, job.output_dir, plan=computed, **job.writing
        )
        return {**_streaming_result(report), "engine": self.name, "before": before}


class StreamingEngine:
    """Layer by layer from the safetensors shards ([`prune_streaming`]), for layer-local criteria: the checkpoint's
    dtype, on the CPU, no evaluation."""

    name = STREAMING

    def check(self, job: PruneJob) -> None:
        loading = job.loading
        if job.needs_loaded_model or loading.get("device_map") is not None or not _keeps_dtype(loading):
            raise ValueError(
                "`--streaming` keeps the checkpoint's dtype, runs on the CPU and does not evaluate; drop --eval, "
                "--device, --device-map and --dtype."
            )

    def run(self, job: PruneJob) -> dict:
        options = {"trust_remote_code": job.loading.get("trust_remote_code", False)}
        report = streaming.prune_streaming(
            job.model,
            job.config,
            job.calibration_data,
            job.output_dir,
            dry_run=job.dry_run,
            plan=job.plan,
            offload_hidden_states=job.offload_hidden_states,
            **options,
            **job.writing,
        )
        return _streaming_result(report)


ENGINES: dict[str, Engine] = {
    engine.name: engine for engine in (MemoryEngine(), DispatchedEngine(), StreamingEngine())
}


def _keeps_dtype(loading: dict) -> bool:
    return loading.get("dtype", torch.float32) in (torch.float32, "auto")


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
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    loading = {"dtype": dtype, "device": device, **placement}
    job = PruneJob(
        model,
        pruner_config,
        output_dir,
        calibration_data,
        eval_data,
        eval_seq_len,
        eval_windows,
        loading={**loading, "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle},
        writing={"max_shard_size": max_shard_size, "overwrite": overwrite},
        plan=plan,
        dry_run=dry_run,
        offload_hidden_states=offload_hidden_states,
    )
    choice = choose_engine(
        pruner_config,
        model,
        streaming_asked=streaming_asked,
        device_map=device_map,
        dtype=dtype,
        needs_loaded_model=job.needs_loaded_model,
        trust_remote_code=trust_remote_code,
    )
    engine = ENGINES[choice.engine]
    job = dataclasses.replace(job, config=choice.config)
    engine.check(job)
    return engine.run(job)


def _check_placement(device, device_map, max_memory, offload_folder) -> None:
    if device_map is not None and device:
        raise ValueError("`--device` and `--device-map` both place the model; give one of them.")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("`--max-memory` and `--offload-folder` apply with `--device-map` (e.g. `--device-map auto`).")


def _streaming_result(report: dict) -> dict:
    plan = report.get("plan")
    return {
        "engine": STREAMING,
        "before": {"parameters": report["params_before"]},
        "after": {"parameters": report["params_after"]},
        "model_type": None if plan is None else plan.model_type,
        "streaming": report,
    }
