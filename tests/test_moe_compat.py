"""MoE checkpoints across Transformers 4.57 (experts as module lists: `experts.N.w1/w2/w3`, `experts.N.gate_proj/...`)
and 5.x (fused 3-D `gate_up_proj` / `down_proj`).

- A tiny Mixtral, Qwen2-MoE and Qwen3-MoE written under 4.57 load and prune under 5.x (Transformers 5 fuses their
  experts on load), exactly against the masked-router / zeroed reference.
- The pruned checkpoints, stock types and the registered `pruned_*` types, load back under 4.57 with the 5.x logits,
  with the package and through the copied modeling file without it.

Marked `compat`: run in `.venv-compat` with `OPTIMUM_PRUNE_MAIN_PYTHON` naming the 5.x interpreter that prunes. The
unmarked tests check, under 5.x, the layout the package writes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_experts import BUILDERS, CALIBRATION, _config, experts_ratio
from testing_utils import input_ids, logits, word_tokenizer
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner
from optimum_prune.checkpoint_conversion import StoredNames, saved_tensors
from optimum_prune.utils import IS_TRANSFORMERS_V5, legacy_field_names


REPO = Path(__file__).resolve().parent.parent
MAIN_PYTHON = Path(os.environ.get("OPTIMUM_PRUNE_MAIN_PYTHON", REPO / ".venv" / "bin" / "python"))
ROPE_THETA = 50000.0  # not a default, so a base frequency lost between versions changes the logits
ATOL = 1e-5
PER_LAYER = {"mixtral": True, "qwen2_moe": True, "qwen3_moe": True}
# name -> (PrunerConfig arguments, which families' outputs are `pruned_*` types).
KINDS = {
    "experts": (dict(structures=["experts"], importance="frequency", ratio_experts=2), {}),
    "per-layer-experts": (
        dict(structures=["experts"], importance="reap", ratio_experts=3, layer_ratios=[0.125, 0.375, 0.625]),
        PER_LAYER,
    ),
    "channels": (dict(structures=["mlp_channels"], ratio=0.371), {}),
    "per-layer-channels": (dict(structures=["mlp_channels"], ratio=0.3, layer_ratios=[0.25, 0.5, 0.25]), PER_LAYER),
    "heads": (dict(structures=["attention_heads"], ratio=0.05), {}),
    "per-layer-heads": (dict(structures=["attention_heads"], ratio=0.05, layer_ratios=[0.0, 0.25, 0.5]), PER_LAYER),
    "hidden": (dict(structures=["hidden_channels"], ratio=0.167), {"qwen3_moe": True}),
}
# Transformers 4.x's Qwen2-MoE attention is `hidden_size` wide: pruned heads or hidden channels need 5.x. The stock
# type fails with 4.57's own line, the registered type with ours.
REFUSED_UNDER_4X = {
    "qwen2_moe-heads": "hidden_size must be divisible by num_heads",
    "qwen2_moe-hidden": "hidden_size must be divisible by num_heads",
    "qwen2_moe-per-layer-heads": "Transformers 4.x's Qwen2-MoE attention needs them equal: load it with Transformers 5",
}

PRUNE = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_experts import BUILDERS, CALIBRATION, zeroed_reference
from test_moe_compat import pruner_config
from testing_utils import input_ids, logits
from transformers import AutoModelForCausalLM
from optimum_prune import AutoPruner
out, classes = {out!r}, {{}}
for family in BUILDERS:
    original = AutoModelForCausalLM.from_pretrained(f"{{out}}/{{family}}").eval()
    assert torch.allclose(logits(original, input_ids()), torch.load(f"{{out}}/{{family}}.pt"), atol={atol}), family
    for kind in {kinds!r}:
        pruner = AutoPruner.from_pretrained(f"{{out}}/{{family}}", pruner_config=pruner_config(family, kind))
        model = pruner.prune(calibration_data=CALIBRATION)
        want = logits(model, input_ids())
        assert torch.allclose(want, logits(zeroed_reference(original, pruner.plan), input_ids()), atol={atol})
        pruner.save_pretrained(f"{{out}}/{{family}}-{{kind}}")
        reloaded = AutoModelForCausalLM.from_pretrained(f"{{out}}/{{family}}-{{kind}}").eval()
        assert torch.allclose(logits(reloaded, input_ids()), want, atol={atol}), (family, kind)
        torch.save(want, f"{{out}}/{{family}}-{{kind}}.pt")
        classes[f"{{family}}-{{kind}}"] = type(model).__name__
print(json.dumps(classes))
"""


def pruner_config(family: str, kind: str):
    """The [`PrunerConfig`] of `kind` for `family`'s tiny model (`ratio_experts`: that many experts per layer)."""
    kwargs = dict(KINDS[kind][0])
    experts = kwargs.pop("ratio_experts", None)
    ratio = kwargs.pop("ratio", None) if experts is None else experts_ratio(BUILDERS[family](), experts)
    structures, importance = kwargs.pop("structures"), kwargs.pop("importance", "magnitude")
    return _config(structures, ratio, importance, **kwargs)


@pytest.fixture(scope="module")
def v4_pruned(tmp_path_factory):
    """Tiny MoE models written by 4.57, pruned by 5.x (which checks them against the reference): the directory and
    the model class of each output."""
    out = tmp_path_factory.mktemp("moe_v4")
    for family, build in BUILDERS.items():
        model = build(rope_theta=ROPE_THETA)
        model.save_pretrained(out / family)
        word_tokenizer().save_pretrained(out / family)
        torch.save(logits(model, input_ids()), out / f"{family}.pt")
    code = PRUNE.format(tests=str(REPO / "tests"), out=str(out), kinds=list(KINDS), atol=ATOL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(MAIN_PYTHON), "-c", code], capture_output=True, text=True, env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads(result.stdout.strip().splitlines()[-1])


LOAD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
{package}
from transformers import AutoModelForCausalLM
from testing_utils import input_ids, logits
results = {{}}
for path in {paths!r}:
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    except Exception as error:
        results[path] = ["refused", str(error)]
        continue
    difference = (logits(model, input_ids()) - torch.load(path + ".pt")).abs().max().item()
    results[path] = [type(model).__name__, difference]
print(json.dumps(results))
"""


def _load_under_4x(paths: list[str], package: bool, modules: str) -> dict:
    """Load `paths` in a fresh 4.57 interpreter: path -> [class name, largest difference to the 5.x logits], or
    ["refused", the error message]."""
    package_line = "import optimum_prune" if package else "sys.modules['optimum_prune'] = None  # not installed"
    code = LOAD.format(tests=str(REPO / "tests"), package=package_line, paths=paths)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "HF_MODULES_CACHE": modules}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.compat
@pytest.mark.skipif(IS_TRANSFORMERS_V5, reason="writes and reloads under Transformers 4.57: run in .venv-compat")
@pytest.mark.skipif(not MAIN_PYTHON.exists(), reason=f"no Transformers 5.x interpreter at {MAIN_PYTHON}")
@pytest.mark.parametrize("package", [True, False], ids=["with-package", "remote-code-without-package"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_4_57_moe_prunes_under_5x_and_loads_back_under_4_57(v4_pruned, family, package):
    """Every kind of pruning of a 4.57 checkpoint loads back under 4.57 with the 5.x logits (to 1e-5), as the stock
    type or the registered one; what 4.57 cannot run fails to load with one line naming the cause."""
    out, classes = v4_pruned
    paths = {kind: str(out / f"{family}-{kind}") for kind in KINDS}
    loaded = _load_under_4x(list(paths.values()), package, str(out / f"modules-{family}-{package}"))
    for kind, (_, registered) in KINDS.items():
        name = f"{family}-{kind}"
        class_name, outcome = loaded[paths[kind]]
        if name in REFUSED_UNDER_4X:
            assert class_name == "refused" and REFUSED_UNDER_4X[name] in outcome and "\n" not in outcome, outcome
            continue
        assert class_name == classes[name] and class_name.startswith("Pruned") is registered.get(family, False), name
        assert outcome <= ATOL, (name, outcome)


@pytest.mark.compat
@pytest.mark.skipif(IS_TRANSFORMERS_V5, reason="optimum-onnx needs Transformers 4.57: run in .venv-compat")
@pytest.mark.skipif(not MAIN_PYTHON.exists(), reason=f"no Transformers 5.x interpreter at {MAIN_PYTHON}")
def test_qwen3_moe_outputs_run_in_onnx_runtime(v4_pruned):
    """optimum-onnx 0.1.0 exports Qwen3-MoE (it has no config for Mixtral or Qwen2-MoE): the stock and registered
    outputs run in ONNX Runtime as in PyTorch under 4.57, with and without the KV cache."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from test_compat import _check_ort_generates_like_pytorch, _check_ort_logits

    import optimum_prune  # noqa: F401  (registers the pruned types and their ONNX configs)

    out, _ = v4_pruned
    for kind in ("experts", "per-layer-experts", "hidden"):
        pytorch_model = AutoModelForCausalLM.from_pretrained(out / f"qwen3_moe-{kind}").eval()
        ort_model = ORTModelForCausalLM.from_pretrained(out / f"qwen3_moe-{kind}", export=True)
        _check_ort_logits(ort_model, pytorch_model)
        _check_ort_generates_like_pytorch(ort_model, pytorch_model)


# The module holding a layer's router and experts in 4.x names.
EXPERT_BLOCKS = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}
NEEDS_V5 = pytest.mark.skipif(not IS_TRANSFORMERS_V5, reason="5.x fuses the experts this checks")


def _saved_tensors(path: Path) -> dict:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@NEEDS_V5
@pytest.mark.parametrize("pruned", [False, True], ids=["stock", "pruned-per-layer"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_checkpoint_conversion_matches_transformers(family, pruned, tmp_path):
    """Streaming converts as Transformers 5 does, stock and registered `pruned_*` types alike: reverting the model's
    fused tensors gives the file `save_pretrained` writes, and building from that file gives the model's state dict."""
    model = BUILDERS[family]()
    if pruned:
        model = AutoPruner.from_model(model, pruner_config(family, "per-layer-experts")).prune(CALIBRATION)
    model.save_pretrained(tmp_path)
    on_disk = _saved_tensors(tmp_path)
    assert any(".experts.0." in name for name in on_disk)
    _assert_same_tensors(saved_tensors(model, model.state_dict()), on_disk)
    names, remaining = StoredNames(model, on_disk), dict(on_disk)
    _assert_same_tensors({name: names.build(name, remaining) for name in model.state_dict()}, model.state_dict())
    assert not remaining


@NEEDS_V5
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_pruned_checkpoints_store_4x_expert_names(family, tmp_path):
    """The registered per-layer type stores its experts as the stock type does (4.x names, which 4.57 reads), its
    per-layer expert counts in the split names, and the config Qwen3-MoE's expert count in both spellings."""
    config = pruner_config(family, "per-layer-experts")
    pruner = AutoPruner.from_model(BUILDERS[family](), config)
    model = pruner.prune(calibration_data=CALIBRATION)
    pruner.save_pretrained(tmp_path / "out")
    names = _saved_tensors(tmp_path / "out")
    assert not any(name.endswith(("gate_up_proj", "experts.down_proj")) for name in names)
    block = EXPERT_BLOCKS[family]
    counts = [len({n for n in names if n.startswith(f"model.layers.{i}.{block}.experts.")}) // 3 for i in range(3)]
    assert counts == [layer.mlp.gate.weight.shape[0] for layer in model.model.layers] == [7, 5, 3]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == f"pruned_{family}"
    assert legacy_field_names(saved) == {}  # every 4.x spelling is there
    if family == "qwen3_moe":
        assert saved["num_experts"] == saved["num_local_experts"] == 7


@NEEDS_V5
def test_fused_checkpoint_of_a_registered_type_still_loads(tmp_path):
    """Checkpoints written before the registered types stored 4.x names (fused tensors) load as they did."""
    pruner = AutoPruner.from_model(BUILDERS["mixtral"](), pruner_config("mixtral", "per-layer-experts"))
    model = pruner.prune(calibration_data=CALIBRATION)
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in _saved_tensors(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # Not bitwise: with several threads the stored layout changes the expert kernels' summation order.
    torch.testing.assert_close(logits(reloaded, input_ids()), logits(model, input_ids()), rtol=0, atol=1e-6)


def test_legacy_field_names():
    """Qwen3-MoE's expert count gets 4.57's name; nothing is added where it is present or for other types."""
    assert legacy_field_names({"model_type": "qwen3_moe", "num_local_experts": 6}) == {"num_experts": 6}
    assert legacy_field_names({"model_type": "pruned_qwen3_moe", "num_local_experts": 6}) == {"num_experts": 6}
    assert legacy_field_names({"model_type": "qwen3_moe", "num_local_experts": 6, "num_experts": 6}) == {}
    assert legacy_field_names({"model_type": "mixtral", "num_local_experts": 6}) == {}
