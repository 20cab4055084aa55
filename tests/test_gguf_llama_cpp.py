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

import pytest
import torch
from testing_utils import tiny_bloom, tiny_glm, tiny_mistral, tiny_phi3, tiny_qwen3
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.export import export_gguf


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
HEADS_AND_MLP = dict(structures=["attention_heads", "mlp_channels"], pruning_ratio=0.05, uniform=True)
MLP = dict(structures=["mlp_channels"], pruning_ratio=0.03, uniform=True)
tiny_glm4 = functools.partial(tiny_glm, glm4=True)
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
}
# llama.cpp's CPU GELU (`bloom`) rounds its input to f16 for a table lookup: on the trained tiny-bloom (logits up to
# |18|) its logits differ from Transformers' by up to 1.8e-3 (1.1e-5 on the random one, logits up to |1.1|).
GELU_ATOL = 5e-3


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
    torch.testing.assert_close(logits, ref_logits, atol=GELU_ATOL if arch == "bloom" else F32_ATOL, rtol=0)
    assert generated == ref_generated
