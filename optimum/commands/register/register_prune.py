"""Registers `optimum-cli prune` (Optimum loads every module of this PEP 420 namespace; no __init__.py here)."""

from optimum_prune.commands.optimum_command import PruneCommand


REGISTER_COMMANDS = [PruneCommand]
