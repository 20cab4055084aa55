"""Transformers 4.57 and Optimum: pruning under 4.57, 5.x checkpoints under 4.57, ONNX export and ONNX Runtime.

optimum-onnx 0.1.0 requires `transformers<4.58`, so the tests marked `compat` run in a second environment
(`make test-compat` builds `.venv-compat`: transformers 4.57.6, optimum-onnx[onnxruntime] 0.1.0) and skip elsewhere.
The cross-version tests write checkpoints with the default 5.x interpreter (`OPTIMUM_PRUNE_MAIN_PYTHON`, defaulting to
`.venv/bin/python`) in a subprocess. The unmarked tests check, in any environment, what the package writes so that
4.57 can read it.
"""

import copy
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from family_table import FAMILIES
from testing_utils import (
    VOCAB,
    input_ids,
    logits,
    tiny_bloom,
    tiny_glm,
    tiny_llama,
    tiny_opt,
    word_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.utils import IS_TRANSFORMERS_V5, TRANSFORMERS_VERSION, legacy_rope_fields


REPO = Path(__file__).resolve().parent.parent
MAIN_PYTHON = Path(os.environ.get("OPTIMUM_PRUNE_MAIN_PYTHON", REPO / ".venv" / "bin" / "python"))
IN_COMPAT_ENV = not IS_TRANSFORMERS_V5 and importlib.util.find_spec("optimum.onnxruntime") is not None
NEEDS_COMPAT_ENV = pytest.mark.skipif(
    not IN_COMPAT_ENV, reason="needs Transformers 4.57 with optimum-onnx[onnxruntime]: run `make test-compat`"
)
NEEDS_MAIN_PYTHON = pytest.mark.skipif(
    not MAIN_PYTHON.exists(), reason=f"no Transformers 5.x interpreter at {MAIN_PYTHON} (OPTIMUM_PRUNE_MAIN_PYTHON)"
)
ROPE_THETA = 50000.0  # not the default 10000, so a base frequency lost between versions changes the logits
PROMPT = "w1 w5 w9 w2"


def _rope_kwargs() -> dict:
    if IS_TRANSFORMERS_V5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}}
    return {"rope_theta": ROPE_THETA}


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary (no downloads)."""
    return word_tokenizer(eos_token="[UNK]")


def _pruned(structures, ratio, importance="magnitude", calibration=None, **model_kwargs):
    pruner = AutoPruner.from_model(
        tiny_llama(**model_kwargs),
        PrunerConfig(pruning_ratio=ratio, importance=importance, structures=list(structures)),
        tokenizer=_tokenizer(),
    )
    pruner.prune(calibration_data=calibration)
    return pruner


def _run(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **kwargs.pop("env", {})}
    result = subprocess.run(args, capture_output=True, text=True, env=env, **kwargs)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


# ---------------------------------------------------------------- what the package writes (any environment)


def test_legacy_rope_fields():
    default = {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert legacy_rope_fields(default) == {"rope_theta": 5e5, "rope_scaling": None}
    llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0}}
    assert legacy_rope_fields(llama3) == {
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
    }
    assert legacy_rope_fields({**default, "rope_theta": 5e5}) == {}  # written by 4.x: nothing to add
    per_layer_type = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    assert legacy_rope_fields(per_layer_type) == {}
    assert legacy_rope_fields({"hidden_size": 8}) == {}


def test_saved_checkpoint_carries_the_4x_spelling(tmp_path):
    """`save_pretrained` writes `rope_theta` and a tokenizer class both majors know, and still reloads identically
    in the environment that wrote it."""
    pruner = _pruned(["mlp_channels"], 0.2, **_rope_kwargs())
    pruner.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_theta"] == ROPE_THETA
    tokenizer_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = input_ids()
    torch.testing.assert_close(logits(reloaded, ids), logits(pruner.model, ids), atol=0, rtol=0)
    if IS_TRANSFORMERS_V5:
        assert reloaded.config.rope_parameters == {"rope_type": "default", "rope_theta": ROPE_THETA}
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(PROMPT)["input_ids"] == _tokenizer()(PROMPT)["input_ids"]


# ---------------------------------------------------------------- 1. pruning under Transformers 4.57


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize(
    ("structures", "ratio", "model_kwargs"),
    [
        (["attention_heads", "mlp_channels"], 0.3, {}),
        (["hidden_channels"], 0.2, {"bias": True}),
        (["layers"], 0.31, {"num_hidden_layers": 6}),  # 2 of 6 layers
    ],
    ids=["heads+mlp", "hidden", "layers"],
)
@pytest.mark.compat
@NEEDS_COMPAT_ENV
def test_prunes_exactly_under_transformers_4_57(importance, structures, ratio, model_kwargs):
    assert TRANSFORMERS_VERSION.major == 4 and TRANSFORMERS_VERSION.minor == 57
    model = tiny_llama(**model_kwargs)
    reference = copy.deepcopy(model)
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    pruner = AutoPruner.from_model(
        model,
        PrunerConfig(
            pruning_ratio=ratio,
            importance=importance,
            structures=structures,
            num_calibration_samples=4,
            calibration_seq_len=16,
            reconstruction=False,  # compared with the zeroed original
        ),
    )
    pruned = pruner.prune(calibration_data=calibration if importance == "taylor" else None)
    assert pruner.plan.kept or pruner.plan.removed_layers, "nothing was pruned"
    assert pruner.params_after < pruner.params_before
    ids = input_ids()
    torch.testing.assert_close(
        logits(pruned, ids),
        logits(FAMILIES["llama"].zeroed_reference(reference, pruner.plan)[0], ids),
        atol=1e-5,
        rtol=0,
    )
    out = pruned.generate(ids[:1, :5], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


# ---------------------------------------------------------------- 2. checkpoints cross the major versions

WRITE = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_compat import PROMPT, _pruned, _rope_kwargs
from testing_utils import input_ids
out = {out!r}
for name, structures in (("stock", ["mlp_channels"]), ("registered", ["hidden_channels", "mlp_channels"])):
    pruner = _pruned(structures, 0.2, **_rope_kwargs())
    pruner.save_pretrained(f"{{out}}/{{name}}")
    with torch.no_grad():
        torch.save(pruner.model(input_ids=input_ids()).logits, f"{{out}}/{{name}}.logits.pt")
    print(name, pruner.model.config.model_type, pruner.tokenizer(PROMPT)["input_ids"])
"""

LOAD = """
import sys, torch
{package}
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, {tests!r})
from testing_utils import input_ids
model = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code={trust}).eval()
rope = getattr(model.config, "rope_parameters", None) or {{"rope_theta": model.config.rope_theta}}  # 5.x or 4.x
assert rope["rope_theta"] == {theta!r}, rope
with torch.no_grad():
    torch.save(model(input_ids=input_ids()).logits, {path!r} + ".loaded.pt")
tokenizer = AutoTokenizer.from_pretrained({path!r}, trust_remote_code={trust})
print(type(model).__name__, tokenizer({prompt!r})["input_ids"])
"""

CROSS_LOADS = pytest.mark.parametrize(
    ("name", "package", "trust", "expected_class"),
    [
        ("stock", False, False, "LlamaForCausalLM"),
        ("registered", True, False, "PrunedLlamaForCausalLM"),
        ("registered", False, True, "PrunedLlamaForCausalLM"),
    ],
    ids=["stock-without-package", "registered-with-package", "registered-remote-code-without-package"],
)


def _write_checkpoints(python: Path, out: Path, major: str):
    """A stock-config and a registered-type (`pruned_llama`: hidden 48 -> 41) checkpoint written by the package."""
    result = _run(
        [str(python), "-c", WRITE.format(tests=str(REPO / "tests"), out=str(out))],
        cwd=out,
        env={"PYTHONPATH": str(REPO)},
    )
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines()[-2:])
    assert lines["stock"].startswith("llama ") and lines["registered"].startswith("pruned_llama ")
    assert json.loads((out / "stock" / "config.json").read_text())["transformers_version"].startswith(major)
    return out, {name: json.loads(line.split(" ", 1)[1]) for name, line in lines.items()}


def _load(python: Path, path: Path, *, package: bool, trust: bool):
    package_line = "import optimum_prune" if package else "sys.modules['optimum_prune'] = None  # not installed"
    code = LOAD.format(
        package=package_line, tests=str(REPO / "tests"), path=str(path), trust=trust, theta=ROPE_THETA, prompt=PROMPT
    )
    env = {"HF_MODULES_CACHE": str(path.parent / f"modules-{package}-{trust}"), "PYTHONPATH": str(REPO)}
    result = _run([str(python), "-c", code], cwd=path.parent, env=env)
    cls, token_ids = result.stdout.strip().splitlines()[-1].split(" ", 1)
    return torch.load(f"{path}.loaded.pt"), cls, json.loads(token_ids)


@pytest.fixture(scope="module")
def v5_checkpoints(tmp_path_factory):
    return _write_checkpoints(MAIN_PYTHON, tmp_path_factory.mktemp("v5"), "5.")


@pytest.fixture(scope="module")
def v4_checkpoints(tmp_path_factory):
    return _write_checkpoints(Path(sys.executable), tmp_path_factory.mktemp("v4"), "4.57")


@NEEDS_MAIN_PYTHON
@CROSS_LOADS
@pytest.mark.compat
@NEEDS_COMPAT_ENV
def test_5x_checkpoint_loads_under_4_57_identically(v5_checkpoints, name, package, trust, expected_class):
    out, token_ids = v5_checkpoints
    loaded, cls, tokens = _load(Path(sys.executable), out / name, package=package, trust=trust)
    assert cls == expected_class
    torch.testing.assert_close(loaded, torch.load(out / f"{name}.logits.pt"), atol=0, rtol=0)
    assert tokens == token_ids[name]


@NEEDS_MAIN_PYTHON
@CROSS_LOADS
@pytest.mark.compat
@NEEDS_COMPAT_ENV
def test_4_57_checkpoint_loads_under_5x_identically(v4_checkpoints, name, package, trust, expected_class):
    """4.57 accepts `hidden_size % num_attention_heads != 0` in `LlamaConfig`, 5.x does not: surgery must still
    switch to `pruned_llama` under 4.57 (`fails_transformers_5_validation`) for the checkpoint to load under 5.x."""
    out, token_ids = v4_checkpoints
    loaded, cls, tokens = _load(MAIN_PYTHON, out / name, package=package, trust=trust)
    assert cls == expected_class
    torch.testing.assert_close(loaded, torch.load(out / f"{name}.logits.pt"), atol=0, rtol=0)
    assert tokens == token_ids[name]


# ---------------------------------------------------------------- 3. ONNX export and ONNX Runtime


def _export_onnx(model_dir: Path, output: Path, *extra: str) -> Path:
    cli = Path(sys.executable).parent / "optimum-cli"
    _run(
        [
            str(cli),
            "export",
            "onnx",
            "--model",
            str(model_dir),
            "--task",
            "text-generation-with-past",
            *extra,
            str(output),
        ],
        cwd=model_dir.parent,
    )
    assert (output / "model.onnx").exists()
    return output


def _check_ort_logits(ort_model, pytorch_model):
    """ORT logits within 1e-4 of PyTorch's without the KV cache (one call over the sequence) and with it (a prefix,
    then the rest of the sequence fed on top of the prefix's returned cache)."""
    ids = input_ids()
    expected = logits(pytorch_model, ids)
    uncached = ort_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    torch.testing.assert_close(uncached, expected, atol=1e-4, rtol=0)
    split = 7
    prefix = ort_model(input_ids=ids[:, :split], attention_mask=torch.ones_like(ids[:, :split]), use_cache=True)
    rest = ort_model(
        input_ids=ids[:, split:],
        attention_mask=torch.ones_like(ids),
        past_key_values=prefix.past_key_values,
        use_cache=True,
    )
    torch.testing.assert_close(torch.cat([prefix.logits, rest.logits], dim=1), expected, atol=1e-4, rtol=0)


def _check_ort_matches_pytorch(onnx_dir: Path, pytorch_model):
    """`ORTModelForCausalLM` logits within 1e-4 of PyTorch's with and without the KV cache, and the same greedy
    continuation."""
    from optimum.onnxruntime import ORTModelForCausalLM

    ort_model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    _check_ort_logits(ort_model, pytorch_model)
    _check_ort_generates_like_pytorch(ort_model, pytorch_model)


def _check_ort_generates_like_pytorch(ort_model, pytorch_model):
    prompt = input_ids()[:1, :6]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(ort_model.generate(prompt, **kwargs), pytorch_model.generate(prompt, **kwargs))


def _check_pipeline_matches_pytorch(generator, pytorch_model):
    """The Optimum ORT pipeline generates what the Transformers pipeline over the PyTorch model generates."""
    from transformers import pipeline

    assert type(generator.model).__name__ == "ORTModelForCausalLM"
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    text = generator(PROMPT, **kwargs)[0]["generated_text"]
    reference = pipeline("text-generation", model=pytorch_model, tokenizer=generator.tokenizer)
    assert text == reference(PROMPT, **kwargs)[0]["generated_text"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


@pytest.mark.compat
@NEEDS_COMPAT_ENV
def test_stock_config_output_exports_to_onnx_and_runs_in_ort(tmp_path):
    """MLP-only pruning keeps the stock `llama` type and `hidden_size = heads * head_dim`: the case optimum-onnx
    handles on its own (`test_every_pruned_checkpoint_runs_in_ort` has the others)."""
    from optimum.pipelines import pipeline

    pruner = _pruned(["mlp_channels"], 0.2, hidden_size=64)
    model_dir = tmp_path / "pruned"
    pruner.save_pretrained(model_dir)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    onnx_dir = _export_onnx(model_dir, tmp_path / "onnx")
    assert (onnx_dir / "tokenizer.json").exists()
    _check_ort_matches_pytorch(onnx_dir, pruner.model)

    generator = pipeline("text-generation", model=str(model_dir), accelerator="ort")
    _check_pipeline_matches_pytorch(generator, pruner.model)


@pytest.mark.compat
@NEEDS_COMPAT_ENV
def test_register_onnx_configs_adds_pruned_types():
    from optimum.exporters.tasks import TasksManager

    from optimum_prune.utils.onnx import register_onnx_configs

    registered = register_onnx_configs()
    assert "pruned_llama" in registered
    assert register_onnx_configs() == registered  # idempotent
    tasks = TasksManager._SUPPORTED_MODEL_TYPE["pruned_llama"]["onnx"]
    assert tasks.keys() == TasksManager._SUPPORTED_MODEL_TYPE["llama"]["onnx"].keys()
    registered_class = tasks["text-generation-with-past"].func  # LLaMA's, with per-layer dummy caches
    assert issubclass(
        registered_class, TasksManager._SUPPORTED_MODEL_TYPE["llama"]["onnx"]["text-generation-with-past"].func
    )
    assert registered_class.__name__ == "PerLayerLlamaOnnxConfig"


@NEEDS_MAIN_PYTHON
@pytest.mark.compat
@NEEDS_COMPAT_ENV
def test_registered_type_exports_to_onnx_and_runs_in_ort(v5_checkpoints, tmp_path):
    """A `pruned_llama` checkpoint (hidden channels 48 -> 41, not a multiple of 8 heads) written under 5.x.

    `optimum-cli` registers the ONNX config through `optimum.commands.register.register_prune`; with the package
    imported neither the export nor the pipeline needs `trust_remote_code` or any call of ours.
    """
    from optimum.pipelines import pipeline

    out, _ = v5_checkpoints
    model_dir = out / "registered"
    onnx_dir = _export_onnx(model_dir, tmp_path / "onnx")
    pytorch_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert type(pytorch_model).__name__ == "PrunedLlamaForCausalLM"
    torch.testing.assert_close(logits(pytorch_model, input_ids()), torch.load(out / "registered.logits.pt"))
    _check_ort_matches_pytorch(onnx_dir, pytorch_model)

    generator = pipeline("text-generation", model=str(model_dir), accelerator="ort")
    _check_pipeline_matches_pytorch(generator, pytorch_model)


@pytest.mark.compat
@NEEDS_COMPAT_ENV
@pytest.mark.parametrize(
    ("build", "structures"),
    [
        (tiny_opt, ["mlp_channels"]),  # per-layer MLP widths only: every cache has the global head count
        (tiny_opt, ["attention_heads", "mlp_channels"]),
        (tiny_llama, ["attention_heads", "mlp_channels"]),  # per-layer KV-head counts (GQA)
        (tiny_bloom, ["attention_heads", "mlp_channels"]),
    ],
    ids=["opt-mlp", "opt-heads", "llama-heads", "bloom-heads"],
)
def test_per_layer_widths_export_with_the_kv_cache(tmp_path, build, structures):
    """Per-layer widths export with the KV cache and run in ONNX Runtime as in PyTorch: the registered ONNX config
    draws each layer's dummy cache with its own head count, and `ORTModelForCausalLM` gets per-layer empty caches
    (`align_ort_cache_shapes`, applied by `import optimum_prune`)."""
    from optimum_prune.utils.onnx import cache_heads_per_layer

    config = PrunerConfig(importance="random", pruning_ratio=0.2, structures=structures, layer_ratios=[0.1, 0.5, 0.3])
    pruner = AutoPruner.from_model(build(), config)
    pruner.prune()
    assert pruner.model.config.per_layer_overrides
    heads = cache_heads_per_layer(pruner.model.config)
    assert (len(set(heads)) > 1) == ("attention_heads" in structures)
    pruner.save_pretrained(tmp_path / "out")
    onnx_dir = _export_onnx(tmp_path / "out", tmp_path / "onnx")
    _check_ort_matches_pytorch(onnx_dir, pruner.model.eval())


# kind: (model builder, structures, ratio, other PrunerConfig fields, the model type written). Each has a cache head
# size other than `hidden_size // num_attention_heads` or per-layer head counts, and the registered types a model
# class outside `transformers`: optimum-onnx 0.1.0 alone fails on every one.
ORT_KINDS = {
    "llama-heads": (tiny_llama, ["attention_heads", "mlp_channels"], 0.5, {}, "llama"),  # 8 -> 4 heads of 8
    "pruned-llama-per-layer": (
        tiny_llama,
        ["attention_heads", "mlp_channels"],
        0.2,
        {"layer_ratios": [0.1, 0.5, 0.3]},
        "pruned_llama",
    ),
    "llama-hidden": (tiny_llama, ["hidden_channels"], 0.17, {"round_to": 8}, "llama"),  # hidden 48 -> 40
    "pruned-llama-hidden": (tiny_llama, ["hidden_channels"], 0.15, {}, "pruned_llama"),  # hidden 48 -> 41
    "llama-layers": (functools.partial(tiny_llama, num_hidden_layers=6), ["layers"], 0.31, {}, "llama"),  # 6 -> 4
    "opt-heads": (tiny_opt, ["attention_heads", "mlp_channels"], 0.3, {}, "pruned_opt"),
    "bloom-heads": (tiny_bloom, ["attention_heads", "mlp_channels"], 0.3, {}, "pruned_bloom"),
    "glm-heads": (tiny_glm, ["attention_heads", "mlp_channels"], 0.3, {}, "glm"),
}


def _prune_for_ort(kind: str):
    build, structures, ratio, extra, model_type = ORT_KINDS[kind]
    config = PrunerConfig(importance="magnitude", pruning_ratio=ratio, structures=structures, **extra)
    pruner = AutoPruner.from_model(build(), config, tokenizer=_tokenizer())
    pruner.prune()
    assert pruner.model.config.model_type == model_type
    assert _optimum_onnx_sizes_the_cache_wrongly(pruner.model.config)
    return pruner


def _optimum_onnx_sizes_the_cache_wrongly(config) -> bool:
    """Whether optimum-onnx 0.1.0 alone would size this model's empty KV cache wrongly (`hidden_size //
    num_attention_heads` as the head size, one head count for every layer)."""
    from optimum_prune.utils.onnx import cache_heads_per_layer

    heads = cache_heads_per_layer(config) or []
    head_dim = getattr(config, "head_dim", None)
    return len(set(heads)) > 1 or (
        head_dim is not None and head_dim != config.hidden_size // config.num_attention_heads
    )


@pytest.mark.compat
@NEEDS_COMPAT_ENV
@pytest.mark.parametrize("kind", ORT_KINDS)
def test_every_pruned_checkpoint_runs_in_the_ort_pipeline(tmp_path, kind):
    """`optimum.pipelines.pipeline(..., accelerator="ort")` on the saved checkpoint, with nothing but
    `import optimum_prune`: ORT (exported by `ORTModelForCausalLM.from_pretrained(..., export=True)` inside the
    pipeline) matches PyTorch's logits with and without the KV cache, and the pipeline's greedy text the
    Transformers pipeline's."""
    from optimum.pipelines import pipeline

    pruner = _prune_for_ort(kind)
    pruner.save_pretrained(tmp_path / "out")
    pytorch_model = pruner.model.eval()

    generator = pipeline("text-generation", model=str(tmp_path / "out"), accelerator="ort")
    _check_ort_logits(generator.model, pytorch_model)
    _check_pipeline_matches_pytorch(generator, pytorch_model)


@pytest.mark.compat
@NEEDS_COMPAT_ENV
def test_head_pruned_stock_checkpoint_exports_with_optimum_cli(tmp_path):
    """`optimum-cli export onnx`, then `ORTModelForCausalLM.from_pretrained(onnx_dir)`, for a stock `llama` whose
    `head_dim` (8) is not `hidden_size // num_attention_heads` (12)."""
    pruner = _prune_for_ort("llama-heads")
    assert (pruner.model.config.hidden_size, pruner.model.config.num_attention_heads) == (48, 4)
    pruner.save_pretrained(tmp_path / "out")
    onnx_dir = _export_onnx(tmp_path / "out", tmp_path / "onnx")
    _check_ort_matches_pytorch(onnx_dir, pruner.model.eval())


@pytest.mark.compat
@NEEDS_COMPAT_ENV
def test_per_layer_checkpoint_exports_from_pretrained_with_io_binding(tmp_path):
    """`ORTModelForCausalLM.from_pretrained(..., export=True, use_io_binding=True)` (IO binding is the default on
    CUDA) on per-layer head counts: each layer's returned cache is allocated with its own head count."""
    from optimum.onnxruntime import ORTModelForCausalLM

    pruner = _prune_for_ort("pruned-llama-per-layer")
    pruner.save_pretrained(tmp_path / "out")
    ort_model = ORTModelForCausalLM.from_pretrained(tmp_path / "out", export=True, use_io_binding=True)
    assert ort_model.use_io_binding
    pytorch_model = pruner.model.eval()
    _check_ort_logits(ort_model, pytorch_model)
    _check_ort_generates_like_pytorch(ort_model, pytorch_model)


IMPORT_ORDER = """
import sys
{before}
import optimum_prune
adapted = ("onnxruntime", "optimum.onnxruntime.modeling_decoder", "optimum.exporters.onnx.model_configs")
loaded = sorted(m for m in adapted if m in sys.modules)
print("loaded", loaded)
from optimum.pipelines import pipeline
generator = pipeline("text-generation", model={model_dir!r}, accelerator="ort")
print("text", generator({prompt!r}, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0]["generated_text"])
"""


@pytest.mark.compat
@NEEDS_COMPAT_ENV
@pytest.mark.parametrize("optimum_first", [False, True], ids=["package-first", "optimum-first"])
def test_ort_integration_whatever_is_imported_first(tmp_path, optimum_first):
    """`import optimum_prune` loads neither ONNX Runtime nor the exporters (they are adapted when Optimum imports
    them), and adapts them as well when Optimum was imported first: a fresh process gets the Transformers text."""
    from transformers import pipeline

    pruner = _prune_for_ort("llama-heads")
    pruner.save_pretrained(tmp_path / "out")
    before = (
        "import optimum.exporters.onnx.model_configs, optimum.onnxruntime.modeling_decoder" if optimum_first else ""
    )
    code = IMPORT_ORDER.format(before=before, model_dir=str(tmp_path / "out"), prompt=PROMPT)
    result = _run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("loaded ", "text ")))
    expected_loaded = ["onnxruntime", "optimum.exporters.onnx.model_configs", "optimum.onnxruntime.modeling_decoder"]
    assert lines["loaded"] == str(expected_loaded if optimum_first else [])
    reference = pipeline("text-generation", model=pruner.model.eval(), tokenizer=_tokenizer())
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert lines["text"] == reference(PROMPT, **kwargs)[0]["generated_text"]
