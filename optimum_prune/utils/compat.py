"""Where Transformers 4.57 and 5.x differ, in one place rather than version checks scattered about.

The package supports `transformers>=4.57`. Most of the API is shared: both majors accept `dtype=` in
`from_pretrained` (4.57 still reads `torch_dtype` as a deprecated alias), and `PretrainedConfig` is importable from
both. What differs is what 5.x *writes*, which 4.57 reads differently:

- RoPE: 5.x writes `rope_parameters = {"rope_type", "rope_theta", ...}`; 4.57 reads `rope_theta` and `rope_scaling`
  and ignores `rope_parameters`, so a 5.x checkpoint with a non-default base frequency would load under 4.57 with
  `rope_theta=10000` and silently different logits.
- Renamed fields: 5.x writes Qwen3-MoE's expert count as `num_local_experts` (reading `num_experts` through its
  `attribute_map`); 4.57 reads only `num_experts`, and would build its default 128 experts.
- Tokenizers: 5.x writes `"tokenizer_class": "TokenizersBackend"`, a class 4.57 does not have (`AutoTokenizer` raises
  "Tokenizer class TokenizersBackend does not exist"). Both majors load the same `tokenizer.json` as
  `PreTrainedTokenizerFast` (5.x maps that name back to `TokenizersBackend`).

The other way round, 4.57 accepts LLaMA configs that 5.x's strict validators refuse (`hidden_size` not a multiple of
`num_attention_heads`, after hidden-channel or head pruning); [`fails_transformers_5_validation`] lets surgery switch
to the registered pruned type under 4.x exactly as it does under 5.x.

[`make_checkpoint_portable`] adds the 4.57 spelling next to the 5.x one in a saved directory, so checkpoints written
under 5.x load under 4.57 with identical logits and tokenizers; 5.x ignores the added fields.
"""

from __future__ import annotations

import json
import logging
import os

import transformers
from packaging import version


logger = logging.getLogger(__name__)

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
IS_TRANSFORMERS_V5 = TRANSFORMERS_VERSION.major >= 5

# model_type -> {5.x field: 4.57 field} where 5.x renamed a field that 4.57 reads under its old name only.
_LEGACY_FIELD_NAMES = {
    "qwen3_moe": {"num_local_experts": "num_experts"},
    "pruned_qwen3_moe": {"num_local_experts": "num_experts"},
}

# 5.x class name -> a name both majors resolve to the same fast tokenizer.
_PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def legacy_rope_fields(config_dict: dict) -> dict:
    """The 4.57 fields (`rope_theta`, `rope_scaling`) equivalent to a 5.x `rope_parameters` entry.

    Returns `{}` when there is nothing to add: no `rope_parameters`, legacy fields already present, or per-layer-type
    parameters (`{"full_attention": {...}, ...}`) that have no single 4.57 spelling.

    Example:

    ```python
    >>> legacy_rope_fields({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    {'rope_theta': 500000.0, 'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}
    ```
    """
    params = config_dict.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params or "rope_theta" in config_dict:
        return {}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return {"rope_theta": params["rope_theta"], "rope_scaling": None if rope_type == "default" else scaling}


def legacy_field_names(config_dict: dict) -> dict:
    """The fields 4.57 reads under their old names (`_LEGACY_FIELD_NAMES`), with the values 5.x wrote.

    Example:

    ```python
    >>> legacy_field_names({"model_type": "qwen3_moe", "num_local_experts": 6})
    {'num_experts': 6}
    ```
    """
    renames = _LEGACY_FIELD_NAMES.get(config_dict.get("model_type"), {})
    return {old: config_dict[new] for new, old in renames.items() if new in config_dict and old not in config_dict}


def _legacy_config_fields(config_dict: dict) -> dict:
    return {**legacy_rope_fields(config_dict), **legacy_field_names(config_dict)}


def _update_json(path: str, update) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    changes = update(data)
    if not changes:
        return False
    data.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    return True


def _portable_tokenizer_class(data: dict) -> dict:
    name = data.get("tokenizer_class")
    return {"tokenizer_class": _PORTABLE_TOKENIZER_CLASSES[name]} if name in _PORTABLE_TOKENIZER_CLASSES else {}


def make_checkpoint_portable(save_directory: str | os.PathLike) -> None:
    """Add the Transformers 4.57 spelling of what 5.x wrote in `save_directory` (`config.json`,
    `tokenizer_config.json`), so the checkpoint loads under both majors with identical results. A no-op for files
    written by 4.57 and for files that are absent.

    Args:
        save_directory (`str` or `os.PathLike`):
            A directory written by `save_pretrained`.
    """
    config_path = os.path.join(save_directory, "config.json")
    if _update_json(config_path, _legacy_config_fields):
        logger.debug("Added the Transformers 4.x spelling of rope and renamed fields to %s.", config_path)
    tokenizer_path = os.path.join(save_directory, "tokenizer_config.json")
    if _update_json(tokenizer_path, _portable_tokenizer_class):
        logger.debug("Wrote a tokenizer_class that Transformers 4.x knows in %s.", tokenizer_path)


def fails_transformers_5_validation(config) -> bool:
    """Under Transformers 4.x, whether 5.x would refuse to load `config` because `hidden_size` is not a multiple of
    `num_attention_heads` (`LlamaConfig.validate_architecture` in 5.x; 4.57 only needs `head_dim`). Always `False`
    under 5.x, where building the config already ran the validators.

    Args:
        config ([`PretrainedConfig`]):
            The pruned model's config.
    """
    if IS_TRANSFORMERS_V5:
        return False
    hidden_size = getattr(config, "hidden_size", None)
    num_heads = getattr(config, "num_attention_heads", None)
    return (
        isinstance(hidden_size, int) and isinstance(num_heads, int) and num_heads > 0 and hidden_size % num_heads != 0
    )
