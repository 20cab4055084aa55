"""Evaluation helpers shared by the CLI, the demo and the benchmarks: perplexity, parameter counts, summary tables.

Task accuracy with lm-eval ([`evaluate_tasks`]) takes a checkpoint, a model or a [`Pruner`], so this module sits
above the pruner; the measurements the pruner itself reports (parameter counts, perplexity) live in `metrics.py` and
are re-exported here.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer

from . import modeling  # noqa: F401 - registers the pruned model types with the Auto classes
from .inputs import check_device, load_causal_lm
from .metrics import TEXT_FILE_SUFFIXES, count_parameters, names_a_file, perplexity
from .output_dir import checkpoint_bytes
from .pruner import Pruner
from .utils.safe_weights import weights_loading_kwargs


def format_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (readable in a terminal and pasteable into README)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def summary_table(before: dict, after: dict) -> str:
    """Before/after table of parameters (and perplexity when measured)."""
    rows = [
        [
            "parameters",
            f"{before['parameters']:,}",
            f"{after['parameters']:,}",
            f"{after['parameters'] / before['parameters']:.3f}",
        ]
    ]
    if before.get("perplexity") is not None and after.get("perplexity") is not None:
        rows.append(
            [
                "perplexity",
                f"{before['perplexity']:.2f}",
                f"{after['perplexity']:.2f}",
                f"{after['perplexity'] / before['perplexity']:.3f}",
            ]
        )
    return format_table(["", "before", "after", "ratio"], rows)


LM_EVAL_INSTALL_HINT = (
    "Task evaluation needs EleutherAI's lm-eval (>=0.4.5), an optional extra: `pip install optimum-prune[eval]` "
    '(or `pip install "lm-eval>=0.4.5"`).'
)


def import_lm_eval():
    """lm-eval's entry points, imported on first use: the package is an optional extra and slow to import."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ModuleNotFoundError(LM_EVAL_INSTALL_HINT, name="lm_eval") from err
    return lm_eval, HFLM, TaskManager


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_evaluation(
    path: str | os.PathLike,
    *,
    dtype="auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load a checkpoint (pruned or not) and its tokenizer for evaluation, as `(model, tokenizer)` in eval mode.

    Importing `optimum_prune.modeling` first registers the pruned model types (`pruned_llama`, ...), so non-uniform
    checkpoints load without `trust_remote_code`; lm-eval's own loader would not know those types. Pickled weights
    are refused unless `allow_pickle=True` (unpickling can execute code).
    """
    check_device(device)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    safe_kwargs = weights_loading_kwargs(path, allow_pickle)
    model = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code, **safe_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.to(device or _default_device()).eval(), tokenizer


def _task_manager(task_manager_class, tasks: list[str], include_path):
    """An lm-eval `TaskManager` that knows every name in `tasks`, or a ValueError naming the unknown ones.

    Indexing lm-eval's ~15k built-in task configs takes seconds; when `include_path` alone defines the requested tasks,
    that index is skipped.
    """
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"`include_path` {str(path)!r} is not a directory of lm-eval task YAML files.")
    paths = [str(p) for p in paths]
    if paths:
        manager = task_manager_class(include_path=paths, include_defaults=False)
        if all(task in manager.all_tasks for task in tasks):
            return manager
    manager = task_manager_class(include_path=paths or None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        import difflib

        hints = sorted({m for task in unknown for m in difflib.get_close_matches(task, manager.all_tasks, n=3)})
        raise ValueError(
            f"Unknown lm-eval task(s): {', '.join(unknown)}. Use lm-eval's task, group or tag names "
            f"(`lm-eval ls tasks` lists its {len(manager.all_tasks)}), or define local tasks as YAML files in a "
            "directory passed as `--include-path` / `include_path`."
            + (f" Close matches: {', '.join(hints)}." if hints else "")
        )
    return manager


def _collect_metrics(results: dict) -> dict[str, dict[str, dict[str, float | None]]]:
    """lm-eval's `{"acc,none": v, "acc_stderr,none": s, ...}` per task as `{metric: {"value": v, "stderr": s}}`.

    A metric under a filter other than lm-eval's default `none` keeps the filter in its name (`exact_match,strict`).
    """
    metrics = {}
    for task, entry in results.items():
        task_metrics = {}
        for key, value in entry.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue  # name, alias, sample_len and the stderr entries (read below)
            metric, filter_name = key.split(",", 1)
            stderr = entry.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else f"{metric},{filter_name}"
            task_metrics[name] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,  # lm-eval writes "N/A"
            }
        metrics[task] = task_metrics
    return metrics


def evaluate_tasks(
    model,
    tasks: str | list[str],
    *,
    tokenizer=None,
    include_path: str | os.PathLike | list | None = None,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    dtype="auto",
    trust_remote_code: bool = False,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Zero- or few-shot accuracy on lm-eval tasks (EleutherAI's harness, the `eval` extra).

    The model is always handed to lm-eval as an object (its `HFLM` wrapper around a loaded model), so pruned types
    such as `pruned_llama` load through optimum-prune and lm-eval scores exactly the model given.

    Args:
        model (`str`, `os.PathLike`, `PreTrainedModel` or [`Pruner`]):
            A checkpoint directory (or Hub id), a loaded causal LM (then pass `tokenizer`), or a pruner.
        tasks (`str` or `list[str]`):
            lm-eval task, group or tag names (`"arc_easy,piqa"` or a list), or names defined under `include_path`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed with a model object; loaded from the directory otherwise.
        include_path (`str` or `list`, *optional*):
            Directories of lm-eval task YAML files (local tasks). Relative `data_files` in them resolve from the
            current working directory, as in lm-eval.
        num_fewshot (`int`, *optional*, defaults to `0`):
            In-context examples per question.
        limit (`int` or `float`, *optional*):
            Examples per task (a fraction when below 1), for quick checks; unset: all.
        batch_size (`int` or `"auto"`, *optional*, defaults to `8`):
            Requests per forward pass in lm-eval (`"auto"`: the largest that fits).
        device (`str`, *optional*):
            Where a loaded-from-path model runs; defaults to CUDA when available. A model object stays where it is.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`):
            Loading dtype for a path (`"auto"`: the checkpoint's).
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            For checkpoints whose model code ships beside the weights (ChatGLM).

    Returns:
        `dict`: `{task: {metric: {"value": float, "stderr": float | None}}}`, e.g.
        `{"arc_easy": {"acc": {"value": 0.71, "stderr": 0.009}, "acc_norm": {...}}}`.

    Example:

    ```python
    >>> from optimum_prune.evaluation import evaluate_tasks
    >>> evaluate_tasks("out/", ["arc_easy", "piqa"], limit=100)["arc_easy"]["acc"]["value"]
    ```
    """
    lm_eval, hflm_class, task_manager_class = import_lm_eval()
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    tasks = [t.strip() for t in tasks]
    if not tasks:
        raise ValueError("`tasks` is empty: name at least one lm-eval task.")
    if num_fewshot < 0:
        raise ValueError(f"`num_fewshot` must be >= 0, got {num_fewshot}.")
    if limit is not None and limit <= 0:
        raise ValueError(f"`limit` must be positive (a count, or a fraction below 1), got {limit}.")
    manager = _task_manager(task_manager_class, tasks, include_path)

    if isinstance(model, Pruner):
        model, tokenizer = model.model, tokenizer or model.tokenizer
    elif isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer = load_for_evaluation(
            model, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("Pass the model's `tokenizer` with a model object.")
    was_training = model.training
    model.eval()
    lm = hflm_class(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
        )
    finally:
        model.train(was_training)
    return _collect_metrics(output["results"])


__all__ = [
    "LM_EVAL_INSTALL_HINT",
    "TEXT_FILE_SUFFIXES",
    "checkpoint_bytes",
    "count_parameters",
    "evaluate_tasks",
    "format_table",
    "load_for_evaluation",
    "names_a_file",
    "perplexity",
    "summary_table",
]
