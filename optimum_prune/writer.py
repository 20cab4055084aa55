"""One writer for what a pruned checkpoint carries besides its weights, used by every engine.

The engines write the weights their own way (`PreTrainedModel.save_pretrained` in memory, shard by shard from the
original shards when streaming) into the temporary folder of `output_dir.atomic_directory`; everything else (tokenizer,
the Transformers 4.57 spellings, `pruner_config.json`, `pruning_plan.json`, `pruning_results.json`, the per-layer width
chart and the model card) is written here, once, so a streamed checkpoint and an in-memory one hold the same files.
"""

from __future__ import annotations

import os

import torch
from huggingface_hub import ModelCard

from .hub import CHART_NAME, build_model_card, plan_is_uniform, plot_layer_widths, write_results
from .utils.compat import make_checkpoint_portable


def describe_data(data) -> str | None:
    """A short, human-readable name for user data (a file path as given, else its kind and size) for cards."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)) and os.path.isfile(data):
        return os.fspath(data)
    if isinstance(data, str):
        return f"a string of {len(data)} characters"
    if isinstance(data, torch.Tensor):
        return f"token ids {list(data.shape)}"
    if hasattr(data, "column_names"):
        return f"a datasets.Dataset of {len(data)} rows"
    if isinstance(data, (list, tuple)):
        return f"a list of {len(data)} texts"
    return type(data).__name__


def run_summary(
    base_model,
    calibration_data: str | None,
    params: tuple[int, int],
    macs: tuple[int | None, int | None],
    evaluation: dict | None = None,
    recovery: dict | None = None,
) -> dict:
    """What `pruning_results.json` holds: the base, the data, the sizes before and after, the measured perplexities
    and the recovery."""
    return {
        "base_model": base_model,
        "calibration_data": calibration_data,
        "params_before": params[0],
        "params_after": params[1],
        "macs_per_token_before": macs[0],
        "macs_per_token_after": macs[1],
        "evaluation": evaluation or {},
        "recovery": recovery,
    }


def summary_card(
    summary: dict, pruner_config, plan, model_config, repo_or_path: str, results=None, license=None, chart=None
) -> ModelCard:
    """The model card of a run described by `summary` (see [`run_summary`])."""
    return build_model_card(
        base_model=summary["base_model"],
        pruner_config=pruner_config,
        plan=plan,
        model_config=model_config,
        params_before=summary["params_before"],
        params_after=summary["params_after"],
        macs_before=summary["macs_per_token_before"],
        macs_after=summary["macs_per_token_after"],
        evaluation=summary["evaluation"],
        recovery=summary["recovery"],
        results=results,
        repo_or_path=repo_or_path,
        calibration=summary["calibration_data"],
        license=license,
        chart=chart,
    )


def write_run_files(
    directory: str | os.PathLike,
    *,
    tokenizer,
    pruner_config,
    plan,
    summary: dict,
    model_config,
    repo_or_path: str,
    results: list[dict] | None = None,
) -> None:
    """Write everything but the weights and config.json into `directory` (the engine wrote those)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    make_checkpoint_portable(directory)  # loads under Transformers 4.57 too
    pruner_config.save_pretrained(directory)
    plan.save_pretrained(directory)
    write_results(directory, summary)
    chart = None
    if not plan_is_uniform(plan) and plot_layer_widths(plan, os.path.join(directory, CHART_NAME)):
        chart = CHART_NAME
    card = summary_card(summary, pruner_config, plan, model_config, repo_or_path, results=results, chart=chart)
    card.save(os.path.join(directory, "README.md"))
