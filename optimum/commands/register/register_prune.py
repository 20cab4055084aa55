"""Registers `optimum-cli prune` (Optimum loads every module of this PEP 420 namespace; no __init__.py here)."""

from optimum_prune.commands.optimum_command import PruneCommand
from optimum_prune.utils.onnx import register_onnx_configs


# With optimum-onnx installed, `optimum-cli export onnx` then also knows the registered pruned model types.
register_onnx_configs()

REGISTER_COMMANDS = [PruneCommand]
