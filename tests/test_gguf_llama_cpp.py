"""llama.cpp runs the GGUF exports (`make test-gguf`): its logits equal Transformers' on the same token ids and its
greedy continuation is the same, for the shared tiny-llama dense and pruned every way the export supports.

llama.cpp runs in .venv-gguf (llama-cpp-python compiled from source, `LLAMA_CPP_PYTHON`) through
`fixtures/llama_cpp_run.py`; Transformers runs here.

Measured on tiny-llama (23 prompt tokens, logits up to |22|): f32 GGUF with an f32 KV cache differs from Transformers
by at most 1e-5 (float32 summation order), f16 by 3.3e-3, q8_0 by 0.16.

The other families (Qwen3 as `qwen3`, Phi-3 as `phi3`, GLM as `chatglm`, GLM-4 as `glm4`, Mistral as `llama`) are tiny
random models built here (`testing_utils`), saved with tiny-llama's tokenizer, dense and pruned to stock shapes
(uniform heads and MLP, hidden channels, a removed layer) the way their llama.cpp graph allows.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess

import gguf
import pytest
import torch
from test_experts import tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe
from testing_utils import tiny_bloom, tiny_gemma, tiny_glm, tiny_mistral, tiny_phi3, tiny_qwen3
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.export import export_gguf
from optimum_prune.export.gguf import FAMILIES


pytestmark = pytest.mark.gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LLAMA = os.path.join(ROOT, "examples", "tiny-llama")
TINY_BLOOM = os.path.join(os.path.dirname(ROOT), "shared", "models", "tiny-bloom")  # as the benchmarks find it
CALIBRATION = os.path.join(ROOT, "examples", "data", "calibration.txt")
RUNNER = os.path.join(ROOT, "tests", "fixtures", "llama_cpp_run.py")
PROMPT = "Once upon a time, there was a little girl who loved to play outside in the sun."
NEW_TOKENS = 16
F32_ATOL = 1e-4
QUANTIZED_ATOL = {"f16": 0.05, "q8_0": 0.5}
VARIANTS = {
    "uniform": dict(structures=["attention_heads", "mlp_channels"], pruning_ratio=0.2),
    "per_layer": dict(structures=["attention_heads", "mlp_channels"], pruning_ratio=0.3, global_ranking=True),
    "layers_removed": dict(structures=["layers", "mlp_channels"], pruning_ratio=0.3),
    "hidden_channels": dict(structures=["hidden_channels"], pruning_ratio=0.2),
}
EXPECTED_ARCH = {
    "dense": "llama",
    "uniform": "llama",
    "per_layer": "deci",
    "layers_removed": "llama",
    "hidden_channels": "llama",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The dense tiny-llama and one magnitude-pruned checkpoint per variant."""
    root = tmp_path_factory.mktemp("gguf")
    paths = {"dense": TINY_LLAMA}
    for name, options in VARIANTS.items():
        config = PrunerConfig(importance="magnitude", **options)
        pruner = AutoPruner.from_pretrained(TINY_LLAMA, pruner_config=config, dtype=torch.float32)
        pruner.prune(calibration_data=CALIBRATION)
        pruner.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


# Stock-shaped checkpoints of other families: (builder, or the path of a trained checkpoint; pruning options or None
# for dense; llama.cpp architecture).
# Ratios are of all parameters, most of which are the 4096-token embeddings and head: 5% takes 2 of 8 query heads,
# 1 of 4 KV groups and 37 of 80 MLP channels from every Qwen3 / Mistral layer (2 of 6 heads, 1 of 3 KV groups and
# 36 channels from GLM-4's), 3% takes about 30 of 80 MLP channels from Phi-3's and GLM's (their llama.cpp graphs need
# all heads); 10% of hidden channels leaves 43 of 48; 4.6% is one of Qwen3's three layers. BLOOM runs as the shared
# trained tiny-bloom (6 layers, hidden 256, 8 heads; 20% leaves 648 of 1024 MLP channels, 13.6% is one layer) and as a
# random one with 6 heads (ALiBi's non-power-of-two slopes).
#
# Gemma 2 / 3 (tiny_gemma: query_pre_attn_scalar 16 on head_dim 8, a sliding window of 4 on the middle layer, final
# soft-capping, Gemma 2's attention soft-capping; Gemma 3 without it, which llama.cpp's graph lacks): 5% takes 2 of 8
# heads, 1 of 4 KV groups and 14 of 80 MLP channels; 10% of hidden channels leaves 43 of 48; 8% is one layer (a full
# one for Gemma 3; magnitude picks Gemma 2's only sliding layer, which llama.cpp's gemma2 graph cannot lose).
# MoE families (8 experts, top-2): `experts` at 5% removes 2 experts from every layer, with heads at 9% 3 experts and
# 2 of 8 heads; Qwen2-MoE (whose llama.cpp graph needs all heads) 2 experts and 8 of 32 expert channels at 10%.
# Qwen3-MoE renormalises its top-k weights here (`norm_topk_prob`), as llama.cpp's `qwen3moe` always does.
HEADS_AND_MLP = dict(structures=["attention_heads", "mlp_channels"], pruning_ratio=0.05, uniform=True)
MLP = dict(structures=["mlp_channels"], pruning_ratio=0.03, uniform=True)
HIDDEN = dict(structures=["hidden_channels"], pruning_ratio=0.1)
EXPERTS = dict(structures=["experts"], pruning_ratio=0.05, uniform=True)
HEADS_AND_EXPERTS = dict(structures=["attention_heads", "experts"], pruning_ratio=0.09, uniform=True)
tiny_glm4 = functools.partial(tiny_glm, glm4=True)
tiny_gemma3 = functools.partial(tiny_gemma, gemma3=True, attn_logit_softcapping=None)
tiny_qwen3_moe_normalized = functools.partial(tiny_qwen3_moe, norm_topk_prob=True)
FAMILY_VARIANTS = {
    "qwen3-dense": (tiny_qwen3, None, "qwen3"),
    "qwen3-uniform": (tiny_qwen3, HEADS_AND_MLP, "qwen3"),
    "qwen3-hidden": (tiny_qwen3, dict(structures=["hidden_channels"], pruning_ratio=0.1), "qwen3"),
    "qwen3-layers": (tiny_qwen3, dict(structures=["layers"], pruning_ratio=0.046), "qwen3"),
    "phi3-dense": (tiny_phi3, None, "phi3"),
    "phi3-mlp": (tiny_phi3, MLP, "phi3"),
    "glm-dense": (tiny_glm, None, "chatglm"),
    "glm-mlp": (tiny_glm, MLP, "chatglm"),
    "glm4-dense": (tiny_glm4, None, "glm4"),
    "glm4-uniform": (tiny_glm4, HEADS_AND_MLP, "glm4"),
    "glm4-hidden": (tiny_glm4, dict(structures=["hidden_channels"], pruning_ratio=0.1), "glm4"),
    "mistral-uniform": (tiny_mistral, HEADS_AND_MLP, "llama"),
    "bloom-dense": (tiny_bloom, None, "bloom"),
    "tiny-bloom": (TINY_BLOOM, None, "bloom"),
    "tiny-bloom-mlp": (TINY_BLOOM, dict(structures=["mlp_channels"], pruning_ratio=0.2, uniform=True), "bloom"),
    "tiny-bloom-layers": (TINY_BLOOM, dict(structures=["layers"], pruning_ratio=0.136), "bloom"),
    "gemma2-dense": (tiny_gemma, None, "gemma2"),
    "gemma2-uniform": (tiny_gemma, HEADS_AND_MLP, "gemma2"),
    "gemma2-hidden": (tiny_gemma, HIDDEN, "gemma2"),
    "gemma3-dense": (tiny_gemma3, None, "gemma3"),
    "gemma3-uniform": (tiny_gemma3, HEADS_AND_MLP, "gemma3"),
    "gemma3-hidden": (tiny_gemma3, HIDDEN, "gemma3"),
    "gemma3-layers": (tiny_gemma3, dict(structures=["layers"], pruning_ratio=0.08), "gemma3"),
    "mixtral-dense": (tiny_mixtral, None, "llama"),
    "mixtral-experts": (tiny_mixtral, EXPERTS, "llama"),
    "mixtral-heads-experts": (tiny_mixtral, HEADS_AND_EXPERTS, "llama"),
    "qwen2-moe-dense": (tiny_qwen2_moe, None, "qwen2moe"),
    "qwen2-moe-experts-mlp": (
        tiny_qwen2_moe,
        dict(structures=["experts", "mlp_channels"], pruning_ratio=0.1, uniform=True),
        "qwen2moe",
    ),
    "qwen3-moe-dense": (tiny_qwen3_moe_normalized, None, "qwen3moe"),
    "qwen3-moe-experts": (tiny_qwen3_moe_normalized, EXPERTS, "qwen3moe"),
    "qwen3-moe-heads-experts": (tiny_qwen3_moe_normalized, HEADS_AND_EXPERTS, "qwen3moe"),
}
# llama.cpp's CPU GELU (`bloom`, `gemma2`, `gemma3`) looks its output up in an f16 table indexed by the f16-rounded
# input: on the trained tiny-bloom (logits up to |18|) its logits differ from Transformers' by up to 1.8e-3 (1.1e-5 on
# the random one, logits up to |1.1|), on the random Gemmas (logits up to |1.2|) by up to 8.4e-4. Rounding the GELU's
# input and output to f16 on the Transformers side as well brings Gemma 2's difference from 4.9e-4 to 3.0e-4 (2.0e-5
# without attention soft-capping) and to 4.8e-7 with 8 MLP channels: what is left is inputs that round to another f16
# value in llama.cpp than in Transformers.
GELU_ATOL = 5e-3
GELU_ARCHS = ("bloom", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    """Each random family model saved with tiny-llama's tokenizer (4096 tokens), or a trained checkpoint, and pruned to
    a stock shape."""
    root = tmp_path_factory.mktemp("gguf-families")
    paths = {}
    for name, (source, options, _) in FAMILY_VARIANTS.items():
        dense = source
        if not callable(source) and not os.path.isdir(source):
            paths[name] = None
            continue
        if callable(source):
            dense = root / f"{name}-dense"
            source(vocab_size=4096).save_pretrained(dense)
            for file in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(TINY_LLAMA, file), dense / file)
        paths[name] = str(dense)
        if options is not None:
            config = PrunerConfig(importance="magnitude", **options)
            pruner = AutoPruner.from_pretrained(str(dense), pruner_config=config, dtype=torch.float32)
            pruner.prune(calibration_data=CALIBRATION)
            pruner.save_pretrained(root / name)
            paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def prompt_ids():
    return AutoTokenizer.from_pretrained(TINY_LLAMA)(PROMPT)["input_ids"]


def _llama_cpp(gguf_path, ids):
    """llama.cpp's logits on `ids` and greedy continuation, from .venv-gguf's Python."""
    python = os.environ.get("LLAMA_CPP_PYTHON")
    if not python:
        pytest.fail("LLAMA_CPP_PYTHON is not set: run these tests with `make test-gguf`.")
    out = f"{gguf_path}.json"
    result = subprocess.run(
        [python, RUNNER, str(gguf_path), json.dumps(ids), str(NEW_TOKENS), out], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        data = json.load(f)
    return torch.tensor(data["logits"]), data["generated"], data["architecture"]


def _transformers(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
        )[0, len(ids) :]
    return logits, generated.tolist()


@pytest.mark.parametrize("variant", ["dense", *VARIANTS])
def test_f32_logits_and_greedy_tokens_equal_transformers(checkpoints, prompt_ids, tmp_path, variant):
    gguf_path = export_gguf(checkpoints[variant], tmp_path / f"{variant}.gguf")
    logits, generated, arch = _llama_cpp(gguf_path, prompt_ids)
    ref_logits, ref_generated = _transformers(checkpoints[variant], prompt_ids)
    assert arch == EXPECTED_ARCH[variant]
    torch.testing.assert_close(logits, ref_logits, atol=F32_ATOL, rtol=0)
    assert generated == ref_generated


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("variant", ["dense", "per_layer"])
def test_f16_and_q8_0_load_and_generate(checkpoints, prompt_ids, tmp_path, variant, outtype):
    gguf_path = export_gguf(checkpoints[variant], tmp_path / f"{variant}-{outtype}.gguf", outtype=outtype)
    logits, generated, _ = _llama_cpp(gguf_path, prompt_ids)
    ref_logits, _ = _transformers(checkpoints[variant], prompt_ids)
    assert len(generated) == NEW_TOKENS
    torch.testing.assert_close(logits, ref_logits, atol=QUANTIZED_ATOL[outtype], rtol=0)


@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
def test_family_f32_logits_and_greedy_tokens_equal_transformers(family_checkpoints, prompt_ids, tmp_path, variant):
    if family_checkpoints[variant] is None:
        pytest.skip(f"{FAMILY_VARIANTS[variant][0]} is not there")
    gguf_path = export_gguf(family_checkpoints[variant], tmp_path / f"{variant}.gguf")
    logits, generated, arch = _llama_cpp(gguf_path, prompt_ids)
    ref_logits, ref_generated = _transformers(family_checkpoints[variant], prompt_ids)
    assert arch == FAMILY_VARIANTS[variant][2]
    print(f"{variant}: max |llama.cpp - Transformers| = {(logits - ref_logits).abs().max().item():.3g}")
    torch.testing.assert_close(logits, ref_logits, atol=GELU_ATOL if arch in GELU_ARCHS else F32_ATOL, rtol=0)
    assert generated == ref_generated


# One dense model per family for f16 and q8_0, widened so that most matrices' rows split into q8_0's blocks of 32
# (hidden 64, MLP 96; rows of 48 or 80 would fall back to f16): (builder, llama.cpp architecture).
WIDE = dict(hidden_size=64, intermediate_size=96)
QUANTIZED_FAMILIES = {
    "mistral": (functools.partial(tiny_mistral, **WIDE), "llama"),
    "qwen3": (functools.partial(tiny_qwen3, **WIDE), "qwen3"),
    "phi3": (functools.partial(tiny_phi3, **WIDE, num_attention_heads=8, num_key_value_heads=4, head_dim=8), "phi3"),
    "glm": (functools.partial(tiny_glm, **WIDE, num_attention_heads=8, num_key_value_heads=4), "chatglm"),
    "glm4": (functools.partial(tiny_glm4, **WIDE), "glm4"),
    "bloom": (functools.partial(tiny_bloom, hidden_size=64, n_head=8), "bloom"),
    "gemma2": (functools.partial(tiny_gemma, **WIDE), "gemma2"),
    "gemma3_text": (functools.partial(tiny_gemma3, **WIDE), "gemma3"),
    "mixtral": (functools.partial(tiny_mixtral, hidden_size=64), "llama"),
    "qwen2_moe": (
        functools.partial(tiny_qwen2_moe, hidden_size=64, num_attention_heads=8, num_key_value_heads=4),
        "qwen2moe",
    ),
    "qwen3_moe": (functools.partial(tiny_qwen3_moe_normalized, hidden_size=64), "qwen3moe"),
}


def test_quantized_check_covers_every_family():
    assert set(QUANTIZED_FAMILIES) | {"llama", "qwen2"} == set(FAMILIES)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("family", list(QUANTIZED_FAMILIES))
def test_family_f16_and_q8_0_load_and_generate(prompt_ids, tmp_path, family, outtype):
    """Each family's dense model in f16 and q8_0 loads in llama.cpp, generates, and stays near Transformers' logits;
    the q8_0 file holds Q8_0 matrices."""
    builder, arch = QUANTIZED_FAMILIES[family]
    model_dir = tmp_path / family
    builder(vocab_size=4096).save_pretrained(model_dir)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TINY_LLAMA, file), model_dir / file)
    gguf_path = export_gguf(model_dir, tmp_path / f"{family}-{outtype}.gguf", outtype=outtype)
    types = {tensor.tensor_type.name for tensor in gguf.GGUFReader(gguf_path).tensors}
    assert "Q8_0" in types if outtype == "q8_0" else "F16" in types and "Q8_0" not in types
    logits, generated, found_arch = _llama_cpp(gguf_path, prompt_ids)
    ref_logits, _ = _transformers(model_dir, prompt_ids)
    assert found_arch == arch and len(generated) == NEW_TOKENS
    print(f"{family} {outtype}: max |llama.cpp - Transformers| = {(logits - ref_logits).abs().max().item():.3g}")
    torch.testing.assert_close(logits, ref_logits, atol=QUANTIZED_ATOL[outtype], rtol=0)
