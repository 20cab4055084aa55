"""Checks of what a user hands in (model paths and Hub ids, config.json, weight files, devices, sequence lengths),
run before any work, so that bad input gets one clear [`PruneInputError`] instead of a traceback from deep inside
Transformers, safetensors or torch, or a model silently built from weights that do not match its config."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

from .architectures.base import ATTENTION_HEADS
from .errors import PruneInputError


logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub repo id (`"name"` or `"org/name"`): it starts with
    `.`, `~` or a separator, has more than one separator, starts with a folder that exists here, or is no valid id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "~", "/", os.sep)) or name.endswith(("/", os.sep)):
        return True
    parts = re.split(r"[\\/]", name)
    if len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0])):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return is_offline() if is_offline is not None else bool(constants.HF_HUB_OFFLINE)


def check_model_source(name_or_path, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """The local checkpoint folder that `name_or_path` names, or None for a Hub repo id that can be fetched.

    Refuses a path that does not exist (Transformers would read it as a malformed repo id), a file, a folder without
    config.json, and a repo id that is neither cached nor downloadable because offline mode is on."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, CONFIG_FILE)):
            raise PruneInputError(
                f"Model folder {name!r} has no {CONFIG_FILE}; give a checkpoint folder written by `save_pretrained` "
                "(config.json and its weights)."
            )
        return name
    if os.path.exists(name):
        raise PruneInputError(
            f"Model {name!r} is a file; give the checkpoint's folder (config.json and its weights) or a Hub repo id."
        )
    if looks_like_path(name):
        raise PruneInputError(
            f"Model {name!r}: no such directory; give a local checkpoint folder or a Hub repo id such as 'org/name'."
        )
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, CONFIG_FILE, cache_dir=cache_dir, revision=revision)
        if not isinstance(cached, str):
            raise PruneInputError(
                f"Model {name!r} is not a local folder and not in the Hugging Face cache, and offline mode is on "
                "(HF_HUB_OFFLINE=1): download it once with offline mode off, or give a local folder."
            )
    return None


def read_json_object(file: str | os.PathLike, what: str) -> dict:
    """The JSON object in `file`, or one line naming the file and saying what it should hold (`what`)."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PruneInputError(f"{file} is not valid JSON ({err}); {what}.") from None
    if not isinstance(data, dict):
        raise PruneInputError(f"{file} holds a JSON {type(data).__name__}, not an object; {what}.")
    return data


def read_config_json(directory: str) -> dict:
    """The checkpoint's config.json as a dict; refuses a file that is not a JSON object."""
    file = os.path.join(directory, CONFIG_FILE)
    data = read_json_object(file, "a checkpoint's config.json is a JSON object written by `save_pretrained`")
    if not isinstance(data.get("model_type"), str):
        raise PruneInputError(f"{file} has no `model_type` string, so its architecture is unknown.")
    return data


def declared_model_type(config_file: str | os.PathLike) -> str | None:
    """`model_type` as a config.json (a file, or the directory holding it) states it, read as plain JSON so that no
    `auto_map` code runs (ChatGLM's config class is remote code); None when it cannot be read."""
    if os.path.isdir(config_file):
        config_file = os.path.join(config_file, CONFIG_FILE)
    try:
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        logger.debug("Could not read %s as a JSON object: %s", config_file, err)
        return None
    return model_type if isinstance(model_type, str) else None


def safetensors_weight_map(directory: str | os.PathLike) -> dict[str, str] | None:
    """Tensor name -> shard path from the checkpoint's `model.safetensors.index.json`; None without an index. Refuses
    an index that is not one, or that lists a shard that does not exist."""
    index = os.path.join(directory, SAFETENSORS_INDEX)
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = {name: os.path.join(directory, file) for name, file in json.load(f)["weight_map"].items()}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise PruneInputError(
            f"{index} is not a safetensors index (a JSON object with a `weight_map`): {err!r}."
        ) from None
    missing = sorted(file for file in set(weight_map.values()) if not os.path.isfile(file))
    if missing:
        raise PruneInputError(f"{index} lists {missing[0]}, which does not exist; the checkpoint is incomplete.")
    return weight_map


def check_safetensors(directory: str) -> None:
    """Open the header of every safetensors file the checkpoint in `directory` consists of (cheap: no tensor is
    read), so that a truncated or corrupt file is named before loading starts."""
    from safetensors import SafetensorError, safe_open

    weight_map = safetensors_weight_map(directory)
    files = [os.path.join(directory, SAFETENSORS_FILE)] if weight_map is None else sorted(set(weight_map.values()))
    for file in files:
        if not os.path.isfile(file):
            continue
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise PruneInputError(
                f"{file} is not a readable safetensors file ({err}); it is truncated or corrupt: save or download "
                "it again."
            ) from None


def check_model_config(config: dict, spec) -> None:
    """Refuse a config.json (as a dict) whose attention shape the family cannot build: query heads that are no
    multiple of the key/value heads, or, without an explicit `head_dim`, a `hidden_size` the heads do not divide.
    Checked on the file's own fields, before a config class derives `head_dim` from them."""
    heads = spec.structures.get(ATTENTION_HEADS)
    if heads is None:
        return
    units_field = heads.units.field
    for width in heads.widths:
        value = config.get(width.field)
        if value is None:
            continue  # the config class's default applies
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PruneInputError(f"config.json: `{width.field}` must be a positive integer, got {value!r}.")
        units = config.get(units_field)
        if isinstance(units, int) and units > 0 and value % units:
            raise PruneInputError(
                f"config.json: `{width.field}` ({value}) must be a multiple of `{units_field}` ({units})."
            )
    num_heads, hidden_size = config.get(heads.widths[0].field), config.get("hidden_size")
    if isinstance(num_heads, int) and num_heads > 0 and isinstance(hidden_size, int) and not config.get("head_dim"):
        if hidden_size % num_heads:
            raise PruneInputError(
                f"config.json: `hidden_size` ({hidden_size}) must be divisible by `{heads.widths[0].field}` "
                f"({num_heads}) when no `head_dim` is given."
            )


def check_loading_info(info: dict, name_or_path) -> None:
    """Refuse a model whose weights and config.json disagree (`output_loading_info` of `from_pretrained`): weights
    the config does not describe would be dropped (say, a layer beyond `num_hidden_layers`) and tensors it describes
    but the weights lack would be random."""
    unexpected = sorted(info.get("unexpected_keys") or ())
    missing = sorted(info.get("missing_keys") or ())
    if unexpected or missing:
        found = [f"{len(unexpected)} tensors it does not describe (e.g. {unexpected[0]})"] if unexpected else []
        found += [f"{len(missing)} tensors missing (e.g. {missing[0]}), which would be random"] if missing else []
        raise PruneInputError(
            f"The weights of {os.fspath(name_or_path)!r} do not match its config.json: {' and '.join(found)}. Fix "
            "config.json (e.g. `num_hidden_layers`) to describe the weights."
        )


def load_causal_lm(name_or_path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)` after the checks above, refusing weights that do
    not match config.json instead of dropping or randomly initialising tensors."""
    from transformers import AutoModelForCausalLM

    local = check_model_source(name_or_path, kwargs.get("revision"), kwargs.get("cache_dir"))
    if local is not None:
        check_safetensors(local)
    with _held_records(LOADING_LOGGER) as held:
        model, info = AutoModelForCausalLM.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        check_loading_info(info, name_or_path)  # refused: the held "load report" would only contradict the error
        held.release()
    return model


LOADING_LOGGER = "transformers.modeling_utils"  # where `from_pretrained` logs its report of missing/unexpected keys


class _HeldRecords(logging.Filter):
    """Holds a logger's records back until `release()` hands them on; records not released are dropped."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self) -> None:
        self.logger.removeFilter(self)
        for record in self.records:
            self.logger.handle(record)
        self.records = []


@contextlib.contextmanager
def _held_records(name: str):
    """The records `name` logs inside the block, held back; an exception (other than our refusal) releases them, so
    Transformers' own report still comes before its error."""
    logger = logging.getLogger(name)
    held = _HeldRecords(logger)
    logger.addFilter(held)
    try:
        yield held
    except PruneInputError:
        raise
    except BaseException:
        held.release()
        raise
    finally:
        logger.removeFilter(held)


def check_device(device) -> None:
    """Refuse a device string torch does not know, or a CUDA / MPS device this machine does not have."""
    import torch

    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise PruneInputError(f"Device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise PruneInputError(f"Device {device!r}: CUDA is not available here ({why}); use cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise PruneInputError(
                f"Device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise PruneInputError(f"Device {device!r}: MPS is not available here; use cpu.")


def max_positions(config) -> int | None:
    """The longest sequence the model was built for (`max_position_embeddings`), None where the family has no such
    limit (BLOOM's ALiBi). `config` is a `PretrainedConfig` or the dict of a config.json."""
    value = (
        config.get("max_position_embeddings")
        if isinstance(config, dict)
        else getattr(config, "max_position_embeddings", None)
    )
    return value if isinstance(value, int) and value > 0 else None


def check_seq_len(seq_len: int, config, name: str = "calibration_seq_len") -> None:
    """Refuse a window longer than the model's positions."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise PruneInputError(
            f"`{name}={seq_len}` exceeds the model's {limit} positions (`max_position_embeddings`); use at most "
            f"{limit}."
        )


SIZE_UNITS = {
    "TIB": 2**40,
    "GIB": 2**30,
    "MIB": 2**20,
    "KIB": 2**10,
    "TB": 10**12,
    "GB": 10**9,
    "MB": 10**6,
    "KB": 10**3,
}


def parse_size(size: int | str) -> int:
    """Bytes of `size`: a positive int, or a string such as "500MB" / "2GB" / "1GiB" (as `save_pretrained` takes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        number, factor = size, 1
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if match is None:
            raise PruneInputError(
                f"Size {size!r} is not a size; give bytes or a number with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, "
                "TiB), e.g. 5GB."
            )
        number, factor = float(match.group(1)), SIZE_UNITS.get(match.group(2) or "B", 1)
    if number * factor < 1:
        raise PruneInputError(f"Size {size!r} must be at least one byte.")
    return int(number * factor)


def check_data_file(path, option: str) -> None:
    """Refuse a data file option (`--calibration`, `--eval`, `--train`) naming a file that does not exist, before the
    model is loaded."""
    if path is not None and not os.path.isfile(path):
        raise PruneInputError(f"{option} file {os.fspath(path)!r} does not exist; give a .txt or .jsonl file.")
