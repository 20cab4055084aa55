"""optimum-prune: structured pruning for Hugging Face causal language models, with ordinary checkpoints as output."""

from . import architectures, importance, modeling
from .architectures.chatglm import convert_chatglm_checkpoint
from .auto import AutoPruner
from .configuration import PrunerConfig
from .engines import choose_engine, prune_checkpoint
from .errors import PruneInputError
from .evaluation import count_parameters, perplexity
from .importance import Importance, register_importance
from .plan import PruningPlan
from .pruner import Pruner
from .streaming import prune_streaming
from .utils.onnx import install_onnx_integration


__version__ = "0.1.0"

# With optimum-onnx installed, its ONNX export and ORT models then handle every checkpoint this package writes.
install_onnx_integration()

__all__ = [
    "AutoPruner",
    "Importance",
    "PruneInputError",
    "Pruner",
    "PrunerConfig",
    "PruningPlan",
    "__version__",
    "architectures",
    "choose_engine",
    "convert_chatglm_checkpoint",
    "count_parameters",
    "importance",
    "modeling",
    "perplexity",
    "prune_checkpoint",
    "prune_streaming",
    "register_importance",
]
