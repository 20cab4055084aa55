"""Saving and publishing: weights, config, tokenizer, plan, pruner config and model card, written atomically."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "pruned_model.md"

CITATIONS = {
    "taylor": "Xinyin Ma, Gongfan Fang, Xinchao Wang. *LLM-Pruner: On the Structural Pruning of Large Language Models*. "
    "NeurIPS 2023. [arXiv:2305.11627](https://arxiv.org/abs/2305.11627)",
}


@contextlib.contextmanager
def atomic_directory(save_directory: str | os.PathLike):
    """Yield a temporary sibling directory that replaces `save_directory` only if the block succeeds.

    On any failure the temporary directory is removed and `save_directory` is left exactly as it was (absent, or with
    its previous contents).
    """
    target = Path(save_directory).resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"`save_directory` ({target}) exists and is not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        backup = None
        if target.exists():
            backup = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_model_card(
    *,
    base_model: str | None,
    pruner_config,
    plan,
    model_config,
    params_before: int,
    params_after: int,
    results: list[dict] | None = None,
    repo_or_path: str = "path/to/pruned-model",
    command: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """A model card from `model_cards/pruned_model.md` with Hub metadata (base model, tags, library)."""
    importance = pruner_config.importance
    card_data = ModelCardData(
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["pruned", "structured-pruning", "optimum-prune", importance],
    )
    model_type = model_config.model_type
    base_model_type = getattr(model_config, "base_model_type", model_type)
    structures = ", ".join(f"`{s}`" for s in pruner_config.structures)
    base_name = base_model or "the base model"
    command = command or (
        f"optimum-prune prune --model {base_name} --pruning-ratio {pruner_config.pruning_ratio} "
        f"--importance {importance} --structures {' '.join(pruner_config.structures)} --output OUT"
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=f"{Path(str(base_name)).name} pruned {pruner_config.pruning_ratio:.0%}",
        base_model=base_name,
        base_model_url=base_name if os.path.isdir(str(base_name)) else f"https://huggingface.co/{base_name}",
        importance=importance,
        importance_kwargs=pruner_config.importance_kwargs,
        structures=structures,
        pruning_ratio=f"{pruner_config.pruning_ratio:.1%}",
        achieved_ratio=f"{1 - params_after / params_before:.2%}",
        calibration=f"{pruner_config.num_calibration_samples} x {pruner_config.calibration_seq_len} tokens",
        params_before=f"{params_before:,}",
        params_after=f"{params_after:,}",
        results=results or [],
        needs_package=model_type != base_model_type,
        model_type=model_type,
        base_model_type=base_model_type,
        repo_or_path=repo_or_path,
        command=command,
        citations=CITATIONS.get(importance, "optimum-prune"),
    )
