"""Registers `optimum-cli export gguf` under Optimum's own `export` command (one subcommand per module)."""

from optimum.commands.export.base import ExportCommand

from optimum_prune.commands.optimum_command import GGUFExportCommand


REGISTER_COMMANDS = [(GGUFExportCommand, ExportCommand)]
