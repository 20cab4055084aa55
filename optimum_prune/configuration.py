"""PrunerConfig: what to prune and how, as a Transformers-style config (`save_pretrained` / `from_pretrained`)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields

from transformers.utils import PushToHubMixin

from .architectures.base import LAYERS, STRUCTURES


logger = logging.getLogger(__name__)

CONFIG_NAME = "pruner_config.json"


@dataclass
class PrunerConfig(PushToHubMixin):
    """Configuration of a structured-pruning run.

    Args:
        pruning_ratio (`float`, *optional*, defaults to `0.2`):
            Fraction of the model's *total* parameters to remove (embeddings and head included), as papers report it.
            The result lands within ±1 point of it, or pruning fails with an error that says why.
        importance (`str`, *optional*, defaults to `"taylor"`):
            A registered criterion: see `optimum_prune.importance.IMPORTANCE_REGISTRY`.
        importance_kwargs (`dict`, *optional*):
            Variant arguments of the criterion, e.g. `{"p": 1}` for L1 magnitude or `{"granularity": "vector"}`.
        structures (`list[str]`, *optional*, defaults to `["attention_heads", "mlp_channels"]`):
            Any of `"attention_heads"`, `"mlp_channels"`, `"hidden_channels"`, `"layers"`.
        num_calibration_samples (`int`, *optional*, defaults to `32`):
            Calibration windows for data-driven criteria.
        calibration_seq_len (`int`, *optional*, defaults to `128`):
            Tokens per calibration window.
        round_to (`int`, *optional*, defaults to `1`):
            Keep channel widths (MLP and hidden) multiples of this, e.g. 8 for tensor-core friendly shapes.
        seed (`int`, *optional*, defaults to `0`):
            Seeds calibration sampling and the `random` criterion.
        streaming (`bool`, *optional*, defaults to `False`):
            Prune layer by layer from the checkpoint's shards with [`optimum_prune.streaming.prune_streaming`] (for
            models larger than memory): layer-local criteria and per-layer structures only, sequential statistics.

    Example:

    ```python
    >>> from optimum_prune import PrunerConfig
    >>> config = PrunerConfig(pruning_ratio=0.2, importance="magnitude", structures=["mlp_channels"])
    >>> config.pruning_ratio
    0.2
    ```
    """

    pruning_ratio: float = field(default=0.2, metadata={"help": "Fraction of total parameters to remove."})
    importance: str = field(default="taylor", metadata={"help": "Registered importance criterion."})
    importance_kwargs: dict = field(default_factory=dict, metadata={"help": "Variant arguments of the criterion."})
    structures: list[str] = field(
        default_factory=lambda: ["attention_heads", "mlp_channels"],
        metadata={"help": f"Structures to prune, any of {list(STRUCTURES)}."},
    )
    num_calibration_samples: int = field(default=32, metadata={"help": "Number of calibration windows."})
    calibration_seq_len: int = field(default=128, metadata={"help": "Tokens per calibration window."})
    round_to: int = field(default=1, metadata={"help": "Keep channel widths multiples of this."})
    seed: int = field(default=0, metadata={"help": "Seed for calibration sampling and random scores."})
    streaming: bool = field(default=False, metadata={"help": "Prune layer by layer from the checkpoint's shards."})

    def __post_init__(self):
        from .importance import IMPORTANCE_REGISTRY

        if isinstance(self.pruning_ratio, bool) or not isinstance(self.pruning_ratio, (int, float)):
            raise TypeError(f"`pruning_ratio` must be a number in [0, 1), got {self.pruning_ratio!r}.")
        if not 0 <= self.pruning_ratio < 1:
            raise ValueError(f"`pruning_ratio` must be in [0, 1), got {self.pruning_ratio}.")
        self.pruning_ratio = float(self.pruning_ratio)
        if self.importance not in IMPORTANCE_REGISTRY:
            raise ValueError(f"Unknown `importance` {self.importance!r}; choose one of {sorted(IMPORTANCE_REGISTRY)}.")
        if not isinstance(self.importance_kwargs, dict):
            raise TypeError(f"`importance_kwargs` must be a dict, got {type(self.importance_kwargs).__name__}.")
        if isinstance(self.structures, str):
            self.structures = [self.structures]
        self.structures = list(self.structures)
        unknown = [s for s in self.structures if s not in STRUCTURES]
        if unknown or not self.structures:
            raise ValueError(f"`structures` must be a non-empty subset of {list(STRUCTURES)}, got {self.structures}.")
        if len(set(self.structures)) != len(self.structures):
            raise ValueError(f"`structures` has duplicates: {self.structures}.")
        if LAYERS in self.structures and len(self.structures) > 1:
            raise ValueError(
                "`structures=['layers']` (depth pruning) cannot be combined with width structures yet; "
                f"got {self.structures}."
            )
        for name in ("num_calibration_samples", "calibration_seq_len", "round_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
        if not isinstance(self.streaming, bool):
            raise ValueError(f"`streaming` must be True or False, got {self.streaming!r}.")
        if self.streaming:
            from .streaming import check_streaming_config

            check_streaming_config(self)
        # Fail now, not after calibration, on bad criterion arguments or structures it cannot score.
        importance = self.build_importance()
        if importance.structures is not None and not set(self.structures) <= set(importance.structures):
            raise ValueError(
                f"`importance={self.importance!r}` scores only {list(importance.structures)}, got `structures="
                f"{self.structures}`."
            )

    def build_importance(self):
        from .importance import get_importance

        kwargs = dict(self.importance_kwargs)
        if self.importance == "random":
            kwargs.setdefault("seed", self.seed)
        return get_importance(self.importance, **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> PrunerConfig:
        """Build from a dict; keys this version does not know are ignored with a warning (newer files)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown PrunerConfig keys %s (written by a newer optimum-prune?).", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write `pruner_config.json` to `save_directory`. `push_to_hub(repo_id)` (from `PushToHubMixin`) uploads it."""
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` ({save_directory}) must be a directory, not a file.")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> PrunerConfig:
        """Load from a directory, a `pruner_config.json` path, or a Hub repo id (kwargs go to `cached_file`)."""
        from transformers.utils import cached_file

        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            file = path
        elif os.path.isdir(path):
            file = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"No {CONFIG_NAME} in {path}.")
        else:
            file = cached_file(path, CONFIG_NAME, **kwargs)
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
