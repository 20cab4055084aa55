"""Registered model types for pruned shapes the stock configs cannot express.

Each family's config and model live in one self-contained file (torch and transformers only) that `save_pretrained`
copies beside the weights through `register_for_auto_class`, so a checkpoint loads with `trust_remote_code=True`
without optimum-prune, and with plain `AutoModelForCausalLM.from_pretrained` once `optimum_prune` is imported.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling_pruned_bloom import PrunedBloomConfig, PrunedBloomForCausalLM
from .modeling_pruned_gemma2 import PrunedGemma2Config, PrunedGemma2ForCausalLM
from .modeling_pruned_gemma3_text import PrunedGemma3TextConfig, PrunedGemma3TextForCausalLM
from .modeling_pruned_glm import PrunedGlm4Config, PrunedGlm4ForCausalLM, PrunedGlmConfig, PrunedGlmForCausalLM
from .modeling_pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM
from .modeling_pruned_moe import (
    PrunedMixtralConfig,
    PrunedMixtralForCausalLM,
    PrunedQwen2MoeConfig,
    PrunedQwen2MoeForCausalLM,
    PrunedQwen3MoeConfig,
    PrunedQwen3MoeForCausalLM,
)
from .modeling_pruned_opt import PrunedOPTConfig, PrunedOPTForCausalLM
from .modeling_pruned_phi3 import PrunedPhi3Config, PrunedPhi3ForCausalLM
from .modeling_pruned_qwen3 import PrunedQwen3Config, PrunedQwen3ForCausalLM


PRUNED_MODEL_CLASSES = {
    PrunedBloomConfig.model_type: (PrunedBloomConfig, PrunedBloomForCausalLM),
    PrunedGemma2Config.model_type: (PrunedGemma2Config, PrunedGemma2ForCausalLM),
    PrunedGemma3TextConfig.model_type: (PrunedGemma3TextConfig, PrunedGemma3TextForCausalLM),
    PrunedGlmConfig.model_type: (PrunedGlmConfig, PrunedGlmForCausalLM),
    PrunedGlm4Config.model_type: (PrunedGlm4Config, PrunedGlm4ForCausalLM),
    PrunedLlamaConfig.model_type: (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    PrunedOPTConfig.model_type: (PrunedOPTConfig, PrunedOPTForCausalLM),
    PrunedMixtralConfig.model_type: (PrunedMixtralConfig, PrunedMixtralForCausalLM),
    PrunedQwen2MoeConfig.model_type: (PrunedQwen2MoeConfig, PrunedQwen2MoeForCausalLM),
    PrunedQwen3MoeConfig.model_type: (PrunedQwen3MoeConfig, PrunedQwen3MoeForCausalLM),
    PrunedPhi3Config.model_type: (PrunedPhi3Config, PrunedPhi3ForCausalLM),
    PrunedQwen3Config.model_type: (PrunedQwen3Config, PrunedQwen3ForCausalLM),
}

for _config_class, _model_class in PRUNED_MODEL_CLASSES.values():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModelForCausalLM")


__all__ = [
    "PRUNED_MODEL_CLASSES",
    "PrunedBloomConfig",
    "PrunedBloomForCausalLM",
    "PrunedGemma2Config",
    "PrunedGemma2ForCausalLM",
    "PrunedGemma3TextConfig",
    "PrunedGemma3TextForCausalLM",
    "PrunedGlm4Config",
    "PrunedGlm4ForCausalLM",
    "PrunedGlmConfig",
    "PrunedGlmForCausalLM",
    "PrunedLlamaConfig",
    "PrunedLlamaForCausalLM",
    "PrunedMixtralConfig",
    "PrunedMixtralForCausalLM",
    "PrunedOPTConfig",
    "PrunedOPTForCausalLM",
    "PrunedPhi3Config",
    "PrunedPhi3ForCausalLM",
    "PrunedQwen2MoeConfig",
    "PrunedQwen2MoeForCausalLM",
    "PrunedQwen3Config",
    "PrunedQwen3ForCausalLM",
    "PrunedQwen3MoeConfig",
    "PrunedQwen3MoeForCausalLM",
]
