"""The options of `prune` and the mapping between them and a [`PrunerConfig`], both ways.

`build_pruner_config` reads a command line into a config; `config_to_args` writes a config back as the options that
rebuild it (the reproduce command of a model card, `hub.prune_command`). Both the `prune` command and the card
writer use them, so they live outside `commands/`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import MISSING, fields

import torch

from .architectures.base import STRUCTURES
from .compute_dtype import COMPUTE_DTYPE_CHOICES
from .configuration import PrunerConfig
from .inputs import parse_size
from .refit_selection import RECONSTRUCTION_SELECTIONS, RECONSTRUCTION_TARGETS


logger = logging.getLogger(__name__)


def add_prune_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `prune` (the same for both command-line entry points)."""
    _add_run_args(parser)
    _add_placement_args(parser)
    _add_allocation_args(parser)
    _add_reconstruction_args(parser)
    _add_streaming_args(parser)
    parser.add_argument(
        "--config", default=None, help="A pruner_config.json to start from (e.g. from a published checkpoint)."
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """The model, the output, the criterion, the data."""
    parser.add_argument("--model", required=True, help="Local directory or Hub id of a causal LM.")
    parser.add_argument("--output", required=True, help="Directory to write the pruned checkpoint to.")
    add_overwrite_arg(parser)
    parser.add_argument(
        "--pruning-ratio",
        type=float,
        default=DEFAULTS["pruning_ratio"],
        help="Fraction of total parameters to remove.",
    )
    parser.add_argument(
        "--importance", default=DEFAULTS["importance"], help="Importance criterion (e.g. taylor, magnitude)."
    )
    parser.add_argument(
        "--importance-kwargs", type=_json_object, default={}, help="Criterion variant as JSON, e.g. '{\"p\": 1}'."
    )
    parser.add_argument(
        "--structures",
        nargs="+",
        default=DEFAULTS["structures"],
        choices=STRUCTURES,
        help="Structures to prune.",
    )
    parser.add_argument("--calibration", default=None, help="Calibration data: a .txt or .jsonl file.")
    parser.add_argument("--num-calibration-samples", type=int, default=DEFAULTS["num_calibration_samples"])
    parser.add_argument("--calibration-seq-len", type=int, default=DEFAULTS["calibration_seq_len"])
    parser.add_argument("--round-to", type=int, default=DEFAULTS["round_to"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--eval", default=None, help="Text file for perplexity before and after.")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=64)


def _add_placement_args(parser: argparse.ArgumentParser) -> None:
    """Where and how the model is loaded."""
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument(
        "--compute-dtype",
        default=None,
        choices=COMPUTE_DTYPE_CHOICES,
        help="dtype of the calibration arithmetic, one layer at a time; the output keeps the checkpoint's dtype. "
        "Default auto: float32 on CPUs without native bfloat16/float16, the checkpoint's dtype on GPUs.",
    )
    parser.add_argument("--device", default=None, help="Device to prune on (cpu, cuda, cuda:1). Default: cpu.")
    parser.add_argument(
        "--device-map",
        type=_device_map,
        default=None,
        help="Spread the model with accelerate: auto, balanced, sequential, or a JSON {module: device} map.",
    )
    parser.add_argument(
        "--max-memory",
        type=_max_memory,
        default=None,
        help="With --device-map: memory per device, e.g. cpu=2GiB,0=20GiB,1=20GiB (the rest is offloaded to disk).",
    )
    parser.add_argument("--offload-folder", default=None, help="With --device-map: folder for disk-offloaded weights.")
    parser.add_argument("--trust-remote-code", action="store_true")
    add_allow_pickle_arg(parser)


def _add_allocation_args(parser: argparse.ArgumentParser) -> None:
    """How the widths are allocated (see `PrunerConfig`)."""
    allocation = parser.add_argument_group("allocation (see PrunerConfig)")
    allocation.add_argument(
        "--attention-layers", type=_layers, default=None, help="e.g. 4:29 (end exclusive) or 1,2,3."
    )
    allocation.add_argument("--mlp-layers", type=_layers, default=None, help="e.g. 4:29 (end exclusive) or 1,2,3.")
    allocation.add_argument("--layer-ratios", type=_layer_ratios, default=None, help='JSON list or {"layer": ratio}.')
    allocation.add_argument(
        "--global-ranking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="One threshold per structure across layers (default: on for taylor and bip, unless widths are given).",
    )
    allocation.add_argument("--global-normalization", choices=["mean", "none"], default=None)
    allocation.add_argument("--uniform", action="store_true", default=None, help="Same widths in every layer.")
    allocation.add_argument("--min-heads", type=int, default=None)
    allocation.add_argument("--min-channels", type=int, default=None)
    allocation.add_argument(
        "--head-rounding",
        choices=["nearest", "up"],
        default=None,
        help="Uniform kept head counts: nearest, or up (as FLAP's and LLM-Pruner's code).",
    )
    allocation.add_argument("--layer-importance", default=None, help="Criterion for whole layers.")
    allocation.add_argument("--num-layers-to-remove", type=int, default=None)
    allocation.add_argument(
        "--iterative-steps", type=int, default=None, help="Prune in N steps, re-scoring between steps."
    )
    allocation.add_argument("--allocation", choices=["flap"], default=None, help="FLAP's adaptive allocation.")
    allocation.add_argument(
        "--bias-compensation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Fold removed channels' mean contribution into output biases (default: on for flap).",
    )


def _add_reconstruction_args(parser: argparse.ArgumentParser) -> None:
    """Refitting the consumer Linears after the units are chosen (see `optimum_prune.reconstruction`)."""
    group = parser.add_argument_group("reconstruction (see PrunerConfig)")
    group.add_argument(
        "--reconstruction",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Refit o_proj/down_proj (each family's consumers) by ridge least squares on the calibration data "
        "(default: on where it applies: a criterion that reads calibration data, heads and MLP channels).",
    )
    group.add_argument(
        "--reconstruction-damping",
        type=float,
        default=None,
        help="Ridge damping of the refit, relative to the mean Gram diagonal (default 0.01).",
    )
    group.add_argument(
        "--reconstruction-selection",
        choices=RECONSTRUCTION_SELECTIONS,
        default=None,
        help="Units each layer keeps under reconstruction: the criterion's top units, or those whose removal leaves "
        "the least error after the refit (structured OBS). The criterion sets the widths either way (default: "
        "error).",
    )
    group.add_argument(
        "--reconstruction-target",
        choices=RECONSTRUCTION_TARGETS,
        default=None,
        help="What the refit matches: the unpruned residual stream where each consumer's output joins it (correcting "
        "the drift earlier layers left; families with post-sublayer norms fall back to output), or each consumer's "
        "own unpruned outputs (default: residual).",
    )


def _add_streaming_args(parser: argparse.ArgumentParser) -> None:
    """Layer-by-layer pruning from the checkpoint's shards."""
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="Prune layer by layer from the safetensors shards (models larger than memory; layer-local criteria).",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="With --streaming: print planned widths, parameter counts and estimated peak memory; write nothing.",
    )
    parser.add_argument(
        "--plan",
        default=None,
        metavar="PATH",
        help="With --streaming: apply this pruning_plan.json (or a folder holding one) instead of scoring; any "
        "criterion may have made it.",
    )
    parser.add_argument(
        "--max-shard-size", type=_shard_size, default="5GB", help="With --streaming: output shard size (e.g. 500MB)."
    )
    parser.add_argument(
        "--offload-hidden-states",
        default=None,
        metavar="DIR",
        help="With --streaming: keep the calibration hidden states in a memory-mapped file under DIR, not in RAM.",
    )


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    """`--overwrite`, shared by every command that writes a checkpoint."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Write into a non-empty --output that is not an optimum-prune checkpoint (only its checkpoint files are "
        "replaced).",
    )


def add_allow_pickle_arg(parser: argparse.ArgumentParser) -> None:
    """`--allow-pickle`, shared by every command that loads a checkpoint."""
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="Load pickled weights (pytorch_model*.bin, *.pt) when the checkpoint has no safetensors. Unpickling can "
        "execute code: only for checkpoints you trust.",
    )


DEFAULTS = {
    "pruning_ratio": 0.2,
    "importance": "taylor",
    "importance_kwargs": {},
    "structures": ["attention_heads", "mlp_channels"],
    "num_calibration_samples": 128,
    "calibration_seq_len": 128,
    "round_to": 1,
    "seed": 0,
}

ALLOCATION_ARGS = (
    "attention_layers",
    "mlp_layers",
    "layer_ratios",
    "global_ranking",
    "global_normalization",
    "uniform",
    "min_heads",
    "min_channels",
    "head_rounding",
    "layer_importance",
    "num_layers_to_remove",
    "allocation",
    "bias_compensation",
    "iterative_steps",
    "reconstruction",
    "reconstruction_damping",
    "reconstruction_selection",
    "reconstruction_target",
)


# PrunerConfig fields that `prune` has no option for (`config_to_args` cannot write them); every other field must have
# an option whose `dest` is the field's name (tests/test_model_card_run.py checks both).
NOT_CLI_FIELDS: tuple[str, ...] = ()
# Written even at their default, so that a card's command shows the settings a reader looks for first.
ALWAYS_WRITTEN = (
    "pruning_ratio",
    "importance",
    "structures",
    "num_calibration_samples",
    "calibration_seq_len",
    "round_to",
    "seed",
)


def config_to_args(config) -> list[str]:
    """The `prune` options that rebuild `config` (the inverse of `build_pruner_config`), one field at a time.

    The option of each field is looked up in the parser itself (by `dest`), so a new option is written in the
    parser's own syntax and a field without an option is noticed. Fields at their PrunerConfig default are left out,
    except `ALWAYS_WRITTEN`.
    """
    parser = argparse.ArgumentParser()
    add_prune_args(parser)
    actions = {action.dest: action for action in parser._actions}
    args = []
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in NOT_CLI_FIELDS or value is None:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if f.name == "bias_compensation" and config.importance != "flap":
            default = False  # what an unset value resolves to for every criterion but flap (see Pruner)
        if value == default and f.name not in ALWAYS_WRITTEN:
            continue
        if f.name not in actions:  # a programming error (the tests check every field); the card must still be saved
            logger.warning("PrunerConfig field %r has no `prune` option: the command cannot set it.", f.name)
            continue
        args += _option_tokens(actions[f.name], value)
    return args


def _option_tokens(action: argparse.Action, value) -> list[str]:
    """`value` as the command-line tokens of `action` (the syntax its parser reads back)."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true, or --x/--no-x
        if value:
            return [flag]
        negative = [s for s in action.option_strings if s.startswith("--no-")]
        return negative[:1]
    if action.nargs in ("+", "*"):
        return [flag, *(str(v) for v in value)]
    if action.type is _layers:
        return [flag, _layer_spec(value)]
    if isinstance(value, (dict, list)):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def _layer_spec(layers: list[int]) -> str:
    """`4:29` for consecutive layers (end exclusive), else `1,3,5`: what `_layers` reads back."""
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}:{layers[-1] + 1}"
    return ",".join(str(i) for i in layers)


def _layers(text: str) -> list[int]:
    """`4:29` (end exclusive) or `1,2,3`."""
    try:
        if ":" in text:
            start, end = (int(v) for v in text.split(":"))
            return list(range(start, end))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:END or a comma-separated list of layers, got {text!r}"
        ) from None


def _json_object(text: str) -> dict:
    """A JSON object, e.g. `{"p": 1}`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"p\": 1}}', got {text!r} ({err})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"p\": 1}}', got {text!r}")
    return value


def _layer_ratios(text: str) -> list | dict:
    """A JSON list of per-layer ratios, or a JSON object `{"layer": ratio}`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, (list, dict)):
        raise argparse.ArgumentTypeError(
            f"expected a JSON list of ratios such as '[0.1, 0.3]' or an object such as '{{\"2\": 0.5}}', got {text!r}"
        )
    return value


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(text: str) -> str | dict:
    """A strategy accelerate knows, one device for the whole model (cpu, cuda:1), or a JSON `{module: device}` map."""
    if text in DEVICE_MAP_STRATEGIES:
        return text
    try:
        torch.device(text)
        return text
    except RuntimeError:
        pass
    try:
        value = json.loads(text) if text.lstrip().startswith("{") else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(DEVICE_MAP_STRATEGIES)}, a device (cpu, cuda:0) or a JSON object such as "
            f'\'{{"model.layers.0": 0, "lm_head": "cpu"}}\', got {text!r}'
        )
    return value


def _shard_size(text: str) -> str:
    """A size `save_pretrained` takes (e.g. 5GB, 500MB); kept as given."""
    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _max_memory(text: str) -> dict:
    """`cpu=2GiB,0=20GiB` -> `{"cpu": "2GiB", 0: "20GiB"}` (GPU indices and plain byte counts as ints, as accelerate
    expects)."""
    memory = {}
    for item in text.split(","):
        device, sep, size = item.strip().partition("=")
        if not sep or not device or not size:
            raise argparse.ArgumentTypeError(
                f"expected DEVICE=SIZE[,DEVICE=SIZE...] (e.g. cpu=2GiB,0=20GiB), got {text!r}"
            )
        memory[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size  # bytes
    return memory


def build_pruner_config(args: argparse.Namespace):
    """PrunerConfig from the command line; options left out keep the `--config` file's or PrunerConfig's defaults."""
    base = PrunerConfig.from_pretrained(args.config).to_dict() if args.config else {}
    explicit = {
        "pruning_ratio": args.pruning_ratio,
        "importance": args.importance,
        "importance_kwargs": args.importance_kwargs,
        "structures": args.structures,
        "num_calibration_samples": args.num_calibration_samples,
        "calibration_seq_len": args.calibration_seq_len,
        "round_to": args.round_to,
        "seed": args.seed,
    }
    if args.config:  # a config file wins over the parser's defaults, not over options given explicitly
        explicit = {k: v for k, v in explicit.items() if v != DEFAULTS.get(k)}
    explicit.update({k: getattr(args, k) for k in ALLOCATION_ARGS if getattr(args, k, None) is not None})
    if getattr(args, "compute_dtype", None) is not None:
        explicit["compute_dtype"] = args.compute_dtype
    if getattr(args, "streaming", False) and not getattr(args, "plan", None):  # a given plan: any criterion made it
        explicit["streaming"] = True
    return PrunerConfig.from_dict({**base, **explicit})
