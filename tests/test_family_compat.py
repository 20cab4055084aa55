"""Checkpoints of the newer families written under Transformers 5.x load under 4.57 with the same logits: the stock
types (head pruning; Qwen3's and Phi-3's hidden channels) and the registered ones (per-layer widths; Gemma's hidden
channels), with the package and through the copied modeling files without it.

Marked `compat`: run in `.venv-compat` (`make install-compat`) with `OPTIMUM_PRUNE_MAIN_PYTHON` naming the 5.x
interpreter that writes the checkpoints.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimum_prune.utils import IS_TRANSFORMERS_V5


REPO = Path(__file__).resolve().parent.parent
MAIN_PYTHON = Path(os.environ.get("OPTIMUM_PRUNE_MAIN_PYTHON", REPO / ".venv" / "bin" / "python"))
FAMILIES = ("qwen3", "phi3", "gemma2", "gemma3_text")
KINDS = {
    "heads": {"structures": ["attention_heads", "mlp_channels"], "pruning_ratio": 0.2},
    "per-layer": {
        "structures": ["attention_heads", "mlp_channels"],
        "pruning_ratio": 0.25,
        "layer_ratios": [0.1, 0.5, 0.3],
    },
    "hidden": {"structures": ["hidden_channels"], "pruning_ratio": 0.2},
}
# Gemma 2's own code differs between 4.57 and 5.x by about 4e-5 on the unpruned tiny model (the embedding
# normaliser and soft-capping are computed differently); the others are bit-identical.
ATOL = {"gemma2": 1e-4}

WRITE = """
import sys, torch
sys.path.insert(0, {tests!r})
from family_table import FAMILIES
from testing_utils import input_ids, logits
from optimum_prune import AutoPruner, PrunerConfig
for family in {families!r}:
    for kind, kwargs in {kinds!r}.items():
        pruner = AutoPruner.from_model(FAMILIES[family].build(), PrunerConfig(importance="magnitude", **kwargs))
        model = pruner.prune()
        pruner.save_pretrained({out!r} + f"/{{family}}-{{kind}}")
        torch.save(logits(model, input_ids()), {out!r} + f"/{{family}}-{{kind}}.pt")
"""

LOAD = """
import sys, torch
sys.path.insert(0, {tests!r})
{package}
from transformers import AutoModelForCausalLM
from testing_utils import input_ids, logits
for path in {paths!r}:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code={trust}).eval()
    torch.save(logits(model, input_ids()), path + ".loaded.pt")
    print(type(model).__name__)
"""


def _run(args, cwd, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def v5_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("families_v5")
    code = WRITE.format(tests=str(REPO / "tests"), families=FAMILIES, kinds=KINDS, out=str(out))
    _run([str(MAIN_PYTHON), "-c", code], cwd=out)
    return out


@pytest.mark.compat
@pytest.mark.skipif(IS_TRANSFORMERS_V5, reason="loads 5.x checkpoints under Transformers 4.57: run in .venv-compat")
@pytest.mark.skipif(not MAIN_PYTHON.exists(), reason=f"no Transformers 5.x interpreter at {MAIN_PYTHON}")
@pytest.mark.parametrize("package", [True, False], ids=["with-package", "remote-code-without-package"])
@pytest.mark.parametrize("family", FAMILIES)
def test_5x_checkpoints_load_under_4_57(v5_checkpoints, family, package):
    paths = [str(v5_checkpoints / f"{family}-{kind}") for kind in KINDS]
    package_line = "import optimum_prune" if package else "sys.modules['optimum_prune'] = None  # not installed"
    code = LOAD.format(tests=str(REPO / "tests"), package=package_line, paths=paths, trust=not package)
    env = {"HF_MODULES_CACHE": str(v5_checkpoints / f"modules-{family}-{package}")}
    classes = _run([sys.executable, "-c", code], cwd=v5_checkpoints, env=env).split()
    assert any(name.startswith("Pruned") for name in classes), classes  # per-layer widths need the registered type
    for path in paths:
        want = torch.load(path + ".pt")
        torch.testing.assert_close(torch.load(path + ".loaded.pt"), want, atol=ATOL.get(family, 0), rtol=0)


# optimum-onnx 0.1.0 has ONNX configs for these families (and for gemma2 and qwen3_moe; none for mixtral, qwen2_moe).
ONNX_FAMILIES = ("qwen3", "phi3", "gemma3_text")


@pytest.mark.compat
@pytest.mark.skipif(IS_TRANSFORMERS_V5, reason="optimum-onnx needs Transformers 4.57: run in .venv-compat")
@pytest.mark.skipif(not MAIN_PYTHON.exists(), reason=f"no Transformers 5.x interpreter at {MAIN_PYTHON}")
@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_5x_checkpoints_run_in_onnx_runtime(v5_checkpoints, family):
    """Each kind's 5.x checkpoint exports to ONNX under 4.57 (`ORTModelForCausalLM(export=True)`, stock and registered
    types) and ONNX Runtime matches PyTorch's logits with and without the KV cache, and its greedy tokens."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from test_compat import _check_ort_generates_like_pytorch, _check_ort_logits
    from transformers import AutoModelForCausalLM

    import optimum_prune  # noqa: F401  (registers the pruned types and their ONNX configs)

    for kind in KINDS:
        path = v5_checkpoints / f"{family}-{kind}"
        pytorch_model = AutoModelForCausalLM.from_pretrained(path).eval()
        ort_model = ORTModelForCausalLM.from_pretrained(path, export=True)
        _check_ort_logits(ort_model, pytorch_model)
        _check_ort_generates_like_pytorch(ort_model, pytorch_model)
