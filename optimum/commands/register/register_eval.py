"""Registers `optimum-cli eval` (a module of its own so that each subcommand's registration stays one file)."""

from optimum_prune.commands.optimum_command import EvalCommand


REGISTER_COMMANDS = [EvalCommand]
