"""Saving and publishing: weights, config, tokenizer, plan, pruner config, results and model card.

Everything a pruned checkpoint carries is written by one code path ([`Pruner.save_pretrained`], atomic), and
[`Pruner.push_to_hub`] uploads that same folder in one commit, so a local save and a Hub upload hold the same files.
The card is built from the package's `templates/pruned_model.md` with `huggingface_hub.ModelCard`, so its metadata (base model,
tags, licence, `model-index`) is the YAML the Hub parses.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .cli_args import config_to_args


logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "pruned_model.md"  # package data
RESULTS_NAME = "pruning_results.json"
CHART_NAME = "layer_widths.png"

# BibTeX of the methods, keyed by short names; `CRITERION_CITATIONS` says which a criterion's card cites
# (shared/PAPERS.md lists the sources). Authors we could not confirm are written "and others".
BIBTEX = {
    "llm_pruner": """@inproceedings{ma2023llmpruner,
  title = {LLM-Pruner: On the Structural Pruning of Large Language Models},
  author = {Ma, Xinyin and Fang, Gongfan and Wang, Xinchao},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2023},
  eprint = {2305.11627},
  archivePrefix = {arXiv}
}""",
    "mini_llm": """@article{cheng2024minillm,
  title = {MINI-LLM: Memory-Efficient Structured Pruning for Large Language Models},
  author = {Cheng, Hongrong and Zhang, Miao and Shi, Javen Qinfeng},
  journal = {arXiv preprint arXiv:2407.11681},
  year = {2024}
}""",
    "llm_bip": """@article{wu2024llmbip,
  title = {LLM-BIP: Structured Pruning for Large Language Models with Block-Wise Forward Importance Propagation},
  author = {Wu, Haihang},
  journal = {arXiv preprint arXiv:2412.06419},
  year = {2024}
}""",
    "flap": """@inproceedings{an2024flap,
  title = {Fluctuation-based Adaptive Structured Pruning for Large Language Models},
  author = {An, Yongqi and others},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year = {2024},
  eprint = {2312.11983},
  archivePrefix = {arXiv}
}""",
    "wanda": """@article{sun2023wanda,
  title = {A Simple and Effective Pruning Approach for Large Language Models},
  author = {Sun, Mingjie and others},
  journal = {arXiv preprint arXiv:2306.11695},
  year = {2023}
}""",
    "shortgpt": """@article{men2024shortgpt,
  title = {ShortGPT: Layers in Large Language Models are More Redundant Than You Expect},
  author = {Men, Xin and others},
  journal = {arXiv preprint arXiv:2403.03853},
  year = {2024}
}""",
    "lora": """@inproceedings{hu2022lora,
  title = {LoRA: Low-Rank Adaptation of Large Language Models},
  author = {Hu, Edward J. and others},
  booktitle = {International Conference on Learning Representations},
  year = {2022},
  eprint = {2106.09685},
  archivePrefix = {arXiv}
}""",
}

# Magnitude and random are the baselines of LLM-Pruner, whose coupled-group formulation every width criterion uses;
# Wanda-SP is the structured Wanda of the FLAP repository.
CRITERION_CITATIONS = {
    "taylor": ("llm_pruner",),
    "magnitude": ("llm_pruner",),
    "random": ("llm_pruner",),
    "mini_llm": ("mini_llm", "llm_pruner"),
    "bip": ("llm_bip",),
    "flap": ("flap",),
    "wanda_sp": ("wanda", "flap"),
    "block_influence": ("shortgpt",),
}


def count_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates per token of every `nn.Linear` (in_features x out_features each, LM head included).

    Computed from the shapes alone, so it is exact for the projections and needs no forward pass. Attention scores
    (which grow with the sequence length) and embedding lookups are left out; for the small models this package is
    tested on they are a few percent at 256 tokens, and pruning heads reduces them in proportion.
    """
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def hub_base_model(name_or_path: str | None) -> str | None:
    """`name_or_path` when it is a Hub repo id, else None (a local path must not become `base_model` metadata)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name_or_path or os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def base_model_license(name_or_path: str | None) -> str | None:
    """The `license` of the base model's card when it can be read without network access.

    A local directory's `README.md` is parsed directly; for a Hub id only a card already in the local cache is used
    (the weights were just downloaded from there, so it usually is). Unknown licences stay unknown: no default is
    guessed, because a wrong licence on a published derivative is worse than none.
    """
    if not name_or_path:
        return None
    readme = Path(name_or_path) / "README.md"
    if not readme.is_file() and hub_base_model(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "README.md")
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    try:
        license = ModelCard.load(readme).data.license
    except Exception as err:  # noqa: BLE001 - a malformed base card must not block saving the pruned model
        logger.warning("Could not read the base model card %s (%s); the licence is left unset.", readme, err)
        return None
    return license if isinstance(license, str) else None


def layer_widths_from_plan(plan) -> dict[str, list[int | None]]:
    """Kept units per decoder layer for each per-layer structure of `plan` (original layer order, None = removed)."""
    widths: dict[str, list[int | None]] = {}
    removed = set(plan.removed_layers)
    for key, total in plan.unit_counts.items():
        structure, _, layer = key.rpartition(".")
        if not structure or not layer.isdigit():
            continue  # model-wide group sets (hidden channels)
        row = widths.setdefault(structure, [None] * plan.num_layers)
        row[int(layer)] = None if int(layer) in removed else len(plan.kept.get(key, range(total)))
    return widths


def plan_is_uniform(plan) -> bool:
    """Whether every kept decoder layer has the same width in every structure (then a chart shows nothing)."""
    for row in layer_widths_from_plan(plan).values():
        if len({w for w in row if w is not None}) > 1:
            return False
    return True


def plot_layer_widths(plan, path: str | os.PathLike, title: str = "Kept width per layer") -> bool:
    """Draw the kept fraction of every structure per layer to a PNG; returns False when matplotlib is missing.

    One bar group per decoder layer, one bar per structure, as a fraction of the original width with the absolute
    kept count on top, so per-layer allocation (which layers were spared) is visible at a glance.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; never opens a window
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; the model card has no per-layer width chart.")
        return False
    widths = layer_widths_from_plan(plan)
    totals = {}
    for key, total in plan.unit_counts.items():
        totals.setdefault(key.rpartition(".")[0], total)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * plan.num_layers + 2), 3.5))
    bar = 0.8 / max(1, len(widths))
    for j, (structure, row) in enumerate(sorted(widths.items())):
        xs = [i + (j - (len(widths) - 1) / 2) * bar for i in range(plan.num_layers)]
        fractions = [0.0 if w is None else w / totals[structure] for w in row]
        bars = ax.bar(xs, fractions, width=bar, label=f"{structure} (of {totals[structure]})")
        for rect, w in zip(bars, row):
            label = "removed" if w is None else str(w)
            ax.annotate(label, (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", fontsize=6)
    ax.set_xticks(range(plan.num_layers))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt_ppl(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _ratio(after, before) -> str:
    return "" if after is None or not before else f" (x{after / before:.2f})"


def prune_command(base_model: str, pruner_config, calibration: str | None = None) -> str:
    """The `optimum-prune prune` command line that makes the same plan from `base_model` (every PrunerConfig field that
    differs from its default, in the parser's syntax, shell-quoted; the output folder is `OUT`).

    `calibration` is written when it names a file; data given in Python (a string, token ids, a dataset) has no path,
    so the command says `CALIBRATION_FILE` where the user must put it.
    """
    args = ["optimum-prune", "prune", "--model", base_model, *config_to_args(pruner_config)]
    if calibration:
        args += ["--calibration", _file_or(calibration, "CALIBRATION_FILE")]
    return shlex.join([*args, "--output", "OUT"])


def _file_or(data: str | None, placeholder: str) -> str:
    """`data` when it names a file, else `placeholder`: a command cannot pass data given in Python (a string, token ids,
    a dataset), which cards describe in words."""
    return data if data and os.path.isfile(data) else placeholder


def describe_allocation(pruner_config, plan=None) -> str:
    """How widths were chosen per layer, in words, for the card's "allocation" row (every allocation field set).

    `plan` gives the number of whole layers removed when the config leaves it to the target."""
    config = pruner_config
    if config.allocation == "flap":
        parts = ["FLAP adaptive: one threshold over the heads and MLP channels of every layer"]
    elif config.global_ranking:
        normalization = "raw scores"
        if config.global_normalization == "mean":
            normalization = "each layer's scores divided by their mean"
        parts = [f"global ranking: one threshold per structure across layers ({normalization})"]
    elif config.layer_ratios is not None:
        parts = [f"per-layer ratios {config.layer_ratios} (scaled by one common factor where they miss the target)"]
    elif config.uniform or not config.non_uniform:
        parts = ["uniform: the same widths in every layer"]
    else:
        parts = ["same ratio in every prunable layer"]
    for name, what in (("attention_layers", "attention heads"), ("mlp_layers", "MLP channels")):
        layers = getattr(config, name)
        if layers is not None:
            parts.append(f"{what} pruned only in layers {_layer_ranges(layers)}")
    if config.min_heads > 1:
        parts.append(f"at least {config.min_heads} query heads per pruned layer")
    if config.min_channels > 1:
        parts.append(f"at least {config.min_channels} MLP channels per pruned layer")
    if config.head_rounding == "up":
        parts.append("kept head counts rounded up (MLP channels absorb the rest)")
    if config.round_to > 1:
        parts.append(f"channel widths multiples of {config.round_to}")
    if "layers" in config.structures:
        removed = len(plan.removed_layers) if plan is not None else config.num_layers_to_remove
        count = "whole layers" if removed is None else f"{removed} whole layer{'' if removed == 1 else 's'}"
        parts.append(f"{count} removed, scored by `{config.layer_importance or config.importance}`")
    if config.iterative_steps > 1:
        parts.append(f"{config.iterative_steps} steps, re-scored between steps")
    if config.bias_compensation:
        parts.append("bias compensation (removed channels' mean contribution folded into output biases)")
    if config.streaming:
        parts.append("layer by layer from the checkpoint's shards (streaming)")
    return "; ".join(parts)


def _layer_ranges(layers: list[int]) -> str:
    """`[0, 1, 2, 5]` as `0-2, 5`."""
    ranges: list[list[int]] = []
    for i in layers:
        if ranges and i == ranges[-1][-1] + 1:
            ranges[-1].append(i)
        else:
            ranges.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in ranges)


def build_model_card(
    *,
    base_model: str | None,
    pruner_config,
    plan,
    model_config,
    params_before: int,
    params_after: int,
    macs_before: int | None = None,
    macs_after: int | None = None,
    evaluation: dict | None = None,
    recovery: dict | None = None,
    results: list[dict] | None = None,
    repo_or_path: str = "path/to/pruned-model",
    command: str | None = None,
    calibration: str | None = None,
    license: str | None = None,
    chart: str | None = None,
) -> ModelCard:
    """A model card from `templates/pruned_model.md` with Hub metadata (base model, tags, licence, model-index).

    Args:
        evaluation (`dict`, *optional*):
            Measured perplexities: keys `perplexity_base`, `perplexity_pruned`, `perplexity_recovered`, and `eval_data`,
            `eval_seq_len`, `eval_windows` describing the text. The final model's perplexity goes into `model-index`.
        recovery (`dict`, *optional*): LoRA recovery settings and training figures ([`Pruner.recover`]).
        results (`list[dict]`, *optional*): extra table rows `{"name", "before", "after"}`.
        license (`str`, *optional*): overrides the licence read from the base model's card.
        chart (`str`, *optional*): file name of the per-layer width chart saved beside the card.
    """
    importance = pruner_config.importance
    evaluation = evaluation or {}
    hub_id = hub_base_model(base_model)
    model_type = model_config.model_type
    base_model_type = getattr(model_config, "base_model_type", None) or model_type
    base_name = base_model or "BASE_MODEL"
    model_name = f"{Path(str(base_model or 'model')).name}-pruned-{round(100 * pruner_config.pruning_ratio)}"
    if recovery:
        model_name += "-recovered"
    card_data = ModelCardData(
        model_name=model_name,
        base_model=hub_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license or base_model_license(base_model),
        tags=list(dict.fromkeys(["pruned", "structured-pruning", "optimum-prune", importance])),
        eval_results=_eval_results(evaluation),
    )
    keys = list(CRITERION_CITATIONS.get(importance, ()))
    if recovery:
        keys += ["llm_pruner", "lora"]
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        base_model=base_name,
        base_model_url=f"https://huggingface.co/{hub_id}" if hub_id else None,
        importance=importance,
        importance_kwargs=json.dumps(pruner_config.importance_kwargs) if pruner_config.importance_kwargs else None,
        structures=", ".join(f"`{s}`" for s in pruner_config.structures),
        allocation=describe_allocation(pruner_config, plan),
        removed_layers=list(plan.removed_layers) if plan is not None else [],
        pruning_ratio=f"{pruner_config.pruning_ratio:.1%}",
        achieved_ratio=f"{1 - params_after / params_before:.2%}",
        calibration=(
            f"{pruner_config.num_calibration_samples} x {pruner_config.calibration_seq_len} tokens"
            + (f" from `{calibration}`" if calibration else "")
        ),
        rows=_result_rows((params_before, params_after), (macs_before, macs_after), evaluation, recovery)
        + list(results or []),
        eval_desc=_eval_description(evaluation),
        recovery=recovery,
        recovery_desc=describe_recovery(recovery) if recovery else None,
        chart=chart,
        needs_package=model_type != base_model_type,
        model_type=model_type,
        base_model_type=base_model_type,
        repo_or_path=repo_or_path,
        is_hub_repo=hub_base_model(repo_or_path) is not None,
        command=command or _reproduce_commands(base_name, pruner_config, calibration, evaluation, recovery),
        citations=[BIBTEX[k] for k in dict.fromkeys(keys)],
    )


def describe_recovery(recovery: dict) -> str:
    """The card's recovery row: the loss (LM or distillation from the teacher), what was trained, the data."""
    if recovery.get("finetune", "lora") == "lora":
        trained = f"LoRA r={recovery['r']}, alpha={recovery['lora_alpha']} on {', '.join(recovery['target_modules'])}"
    else:
        trained = "full fine-tuning"
    if recovery.get("method", "lm") == "distill":
        terms = [f"KL divergence of logits at T={recovery['temperature']}"]
        terms += [f"{recovery['lm_weight']} x LM loss"] if recovery.get("lm_weight") else []
        terms += [f"{recovery['hidden_weight']} x hidden-state loss"] if recovery.get("hidden_weight") else []
        teacher = f" `{recovery['teacher']}`" if recovery.get("teacher") else ""
        trained = f"distillation from the unpruned model{teacher} ({' + '.join(terms)}), {trained}"
    data = f" from `{recovery['train_data']}`" if recovery.get("train_data") else ""
    merged = "; merged into the weights" if recovery.get("finetune", "lora") == "lora" else ""
    return (
        f"{trained}; {recovery['max_steps']} steps of {recovery['batch_size']} x {recovery['block_size']} tokens"
        f"{data}, lr {recovery['learning_rate']}{merged}"
    )


def _recovered_stage_name(recovery: dict | None) -> str:
    if recovery and recovery.get("method") == "distill":
        return "perplexity after distillation recovery"
    if recovery and recovery.get("finetune") == "full":
        return "perplexity after full fine-tuning recovery"
    return "perplexity after LoRA recovery"


def _recover_flags(recovery: dict) -> str:
    """The `recover` options that reproduce the loss and what was trained (the LoRA default adds nothing)."""
    flags = ""
    if recovery.get("method") == "distill":
        teacher = f" --teacher {shlex.quote(recovery['teacher'])}" if recovery.get("teacher") else ""
        flags += (
            f" --method distill{teacher} --temperature {recovery['temperature']} --lm-weight {recovery['lm_weight']}"
            f" --hidden-weight {recovery['hidden_weight']}"
        )
    if recovery.get("finetune") == "full":
        return flags + " --full-finetune"
    return flags + f" --lora-r {recovery['r']} --lora-alpha {recovery['lora_alpha']}"


def _eval_description(evaluation: dict) -> str | None:
    if not evaluation.get("eval_data"):
        return None
    return (
        f"`{evaluation['eval_data']}`, {evaluation.get('eval_windows', '?')} windows of "
        f"{evaluation.get('eval_seq_len', '?')} tokens"
    )


def _eval_results(evaluation: dict) -> list[EvalResult] | None:
    """The final model's perplexity as `model-index` metadata (None when none was measured)."""
    final_ppl = evaluation.get("perplexity_recovered") or evaluation.get("perplexity_pruned")
    if final_ppl is None:
        return None
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Language modelling",
            dataset_type="text",
            dataset_name=Path(str(evaluation.get("eval_data") or "held-out text")).name,
            metric_type="perplexity",
            metric_name="perplexity",
            metric_value=round(float(final_ppl), 4),
        )
    ]


def _reproduce_commands(base_name: str, pruner_config, calibration, evaluation: dict, recovery) -> str:
    """The `prune` command that makes the same plan (and the `recover` command, after a recovery)."""
    command = prune_command(base_name, pruner_config, calibration)
    eval_flags = ""
    if evaluation.get("eval_data") and os.path.isfile(str(evaluation["eval_data"])):
        eval_flags = " " + shlex.join(
            ["--eval", str(evaluation["eval_data"]), "--eval-seq-len", str(evaluation.get("eval_seq_len"))]
            + ["--eval-windows", str(evaluation.get("eval_windows"))]
        )
        command += eval_flags
    if recovery:
        train = shlex.quote(_file_or(recovery.get("train_data"), "TRAIN_FILE"))
        command += (
            f"\noptimum-prune recover --model OUT --train {train} "
            f"--max-steps {recovery['max_steps']} "
            f"--batch-size {recovery.get('per_device_train_batch_size', recovery['batch_size'])} "
            f"--gradient-accumulation-steps {recovery.get('gradient_accumulation_steps', 1)} "
            f"--block-size {recovery['block_size']} --learning-rate {recovery['learning_rate']} "
            f"{_recover_flags(recovery).lstrip()}{eval_flags} --output OUT-recovered"
        )
    return command


def _result_rows(params: tuple[int, int], macs: tuple, evaluation: dict, recovery: dict | None = None) -> list[dict]:
    """The card's before/after table: parameters, MACs per token and the measured perplexities."""
    rows = [{"name": "parameters", "before": f"{params[0]:,}", "after": f"{params[1]:,}"}]
    if macs[0] and macs[1]:
        after = f"{macs[1]:,} (x{macs[1] / macs[0]:.2f})"
        rows.append({"name": "MACs per token (linear layers)", "before": f"{macs[0]:,}", "after": after})
    base_ppl = evaluation.get("perplexity_base")
    stages = [("perplexity", "perplexity_pruned"), (_recovered_stage_name(recovery), "perplexity_recovered")]
    for name, key in stages:
        value = evaluation.get(key)
        if value is None and not (key == "perplexity_pruned" and base_ppl is not None):
            continue
        rows.append({"name": name, "before": _fmt_ppl(base_ppl), "after": _fmt_ppl(value) + _ratio(value, base_ppl)})
    return rows


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
):
    """Upload every file of `folder` to `repo_id` in one commit and return the `CommitInfo`.

    The repo is created if needed (`exist_ok`), and so is the branch `revision` (from `main`). The token is passed to
    `huggingface_hub` only, which sends it in the Authorization header: it is never logged or written anywhere.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, token=token, repo_type="model", exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload pruned model with optimum-prune",
        token=token,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
    )
    logger.info("Uploaded %d files to %s: %s", len(os.listdir(folder)), repo_id, info.pr_url or info.commit_url)
    return info


def read_results(path: str | os.PathLike) -> dict:
    """`pruning_results.json` of a saved checkpoint ({} when absent)."""
    file = Path(path) / RESULTS_NAME
    if not file.is_file():
        return {}
    return json.loads(file.read_text(encoding="utf-8"))


def write_results(path: str | os.PathLike, results: dict) -> None:
    with open(Path(path) / RESULTS_NAME, "w", encoding="utf-8") as f:
        f.write(json.dumps(results, indent=2, sort_keys=True) + "\n")
