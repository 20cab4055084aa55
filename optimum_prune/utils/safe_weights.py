"""No pickle without opt-in: every loader checks a checkpoint here before Transformers (or torch) reads a weight.

Unpickling runs whatever code the file names, so a pickled checkpoint (`pytorch_model*.bin`, `*.pt`, `*.pth`,
`*.ckpt`) is refused unless the user says `allow_pickle=True` (CLI: `--allow-pickle`). The check only looks at file
names; what enforces it is the `use_safetensors=True` that [`weights_loading_kwargs`] returns, which makes
Transformers' own loader refuse `.bin` files, for local directories and Hub repos (cached or not) alike.
"""

from __future__ import annotations

import fnmatch
import logging
import os


logger = logging.getLogger(__name__)

PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def pickle_refusal(source, file_name: str) -> ValueError:
    """The one message for refused pickled weights: why, how to opt in, and the safe alternative."""
    return ValueError(
        f"{os.fspath(source)} has only pickled weights ({file_name}), and loading a pickle can execute arbitrary "
        "code. If you trust this checkpoint, opt in with `allow_pickle=True` (command line: `--allow-pickle`); "
        "better, convert it once to safetensors (`AutoModelForCausalLM.from_pretrained(path).save_pretrained(dst)` "
        "writes `model.safetensors`, or use the Hub's safetensors converter) and load the converted copy."
    )


def weights_loading_kwargs(path, allow_pickle: bool = False, **hub_kwargs) -> dict:
    """Refuse a checkpoint (local directory or Hub repo, cached or not) whose only weights are pickled, unless
    `allow_pickle`; returns the kwargs that keep `from_pretrained` to safetensors (`{}` when pickle is allowed).

    hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only`, as given to `from_pretrained`.
    """
    if allow_pickle:
        return {}
    pickled = pickled_weights_only(path, **hub_kwargs)
    if pickled is not None:
        raise pickle_refusal(path, pickled)
    return {"use_safetensors": True}


def pickled_weights_only(path, **hub_kwargs) -> str | None:
    """The name of a pickled weights file of `path` when it has no safetensors weights, else None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.listdir(path))
        if any(name.endswith(".safetensors") for name in files):
            return None
        return next((f for f in files if any(fnmatch.fnmatch(f, p) for p in PICKLE_WEIGHT_PATTERNS)), None)
    return _hub_pickled_weights_only(path, hub_kwargs)


def _hub_pickled_weights_only(repo_id: str, hub_kwargs: dict) -> str | None:
    """As `pickled_weights_only` for a Hub repo, through Transformers' `has_file` (the cache when offline)."""
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )
    from transformers.utils.hub import has_file

    kwargs = {k: hub_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in hub_kwargs}
    try:
        if any(has_file(repo_id, name, **kwargs) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
            return None
        return next((name for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) if has_file(repo_id, name, **kwargs)), None)
    except (OSError, ValueError) as err:  # unknown repo or revision: `from_pretrained` reports it in its own words
        logger.debug("Could not list the weights of %s: %s", repo_id, err)
        return None
