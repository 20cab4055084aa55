"""`optimum-cli prune`: the same arguments and code as `optimum-prune prune`."""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .evaluate import add_eval_args, run_eval
from .export import add_gguf_args, run_export_gguf
from .prune import add_prune_args, run_prune
from .recover import add_recover_args, run_recover


class PruneCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="prune", help="Structured pruning of causal LMs (optimum-prune).")

    @staticmethod
    def parse_args(parser):
        return add_prune_args(parser)

    def run(self):
        raise SystemExit(run_prune(self.args))


class RecoverCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="recover",
        help="Recovery training of a pruned checkpoint: LoRA or full, LM loss or distillation (optimum-prune).",
    )

    @staticmethod
    def parse_args(parser):
        return add_recover_args(parser)

    def run(self):
        raise SystemExit(run_recover(self.args))


class EvalCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="eval", help="lm-eval tasks and perplexity of a checkpoint (optimum-prune).")

    @staticmethod
    def parse_args(parser):
        return add_eval_args(parser)

    def run(self):
        raise SystemExit(run_eval(self.args))


class GGUFExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="gguf", help="One GGUF file for llama.cpp, per-layer widths included (optimum-prune).")

    @staticmethod
    def parse_args(parser):
        return add_gguf_args(parser)

    def run(self):
        raise SystemExit(run_export_gguf(self.args))
