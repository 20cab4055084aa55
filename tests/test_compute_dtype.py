"""`compute_dtype`: a bfloat16 checkpoint calibrated in float32, one layer at a time, gives the plan of its float32
copy (streaming and in memory); `"bfloat16"` computes as before; the output keeps the checkpoint's dtype."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from testing_utils import VOCAB, sharded_checkpoint, tiny_llama

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune import compute_dtype as compute
from optimum_prune.calibration import prepare_calibration
from optimum_prune.streaming import format_dry_run, prune_streaming, sequential_plan


SAMPLES, SEQ_LEN = 6, 16
DATA = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(3))
# One pass (sequential statistics) and two passes (FLAP allocation, whose plan carries float64 bias means: any
# arithmetic in bfloat16 shows in them).
# Without reconstruction: these compare plans and the bias means (the refit has its own dtype tests).
CONFIGS = {
    "wanda_sp": dict(importance="wanda_sp", reconstruction=False),
    "flap": dict(importance="flap", allocation="flap", reconstruction=False),
}


def _config(name, **kwargs):
    return PrunerConfig(
        num_calibration_samples=SAMPLES, calibration_seq_len=SEQ_LEN, pruning_ratio=0.3, **CONFIGS[name], **kwargs
    )


def _bf16_model():
    return tiny_llama(num_hidden_layers=4).to(torch.bfloat16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A bfloat16 checkpoint and its float32 copy (the same values)."""
    root = tmp_path_factory.mktemp("compute_dtype")
    model = _bf16_model()
    return sharded_checkpoint(model, root / "bf16"), sharded_checkpoint(copy.deepcopy(model).float(), root / "fp32")


def _stored_dtypes(path) -> set[str]:
    dtypes = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return dtypes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streaming_float32_compute_of_bf16_checkpoint_gives_the_float32_plan(checkpoints, tmp_path, name):
    bf16, fp32 = checkpoints
    reference = prune_streaming(fp32, _config(name), DATA, tmp_path / "fp32")["plan"]
    report = prune_streaming(bf16, _config(name, compute_dtype="float32"), DATA, tmp_path / "out")
    assert report["plan"].kept == reference.kept
    assert report["plan"].bias_means == reference.bias_means  # float64 means, equal to the last bit
    assert _stored_dtypes(tmp_path / "out") == {"BF16"}
    if name == "wanda_sp":  # the in-memory reference of one-pass streaming computes as streaming does
        config = _config(name, compute_dtype="float32")
        batches = prepare_calibration(DATA, None, SAMPLES, SEQ_LEN, config.seed)
        assert sequential_plan(_bf16_model(), config, batches).kept == reference.kept
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_streaming_bfloat16_compute_keeps_computing_in_bfloat16(checkpoints, tmp_path):
    """Today's behaviour: the layers run in the checkpoint's bfloat16, so the means differ from float32 arithmetic."""
    bf16, fp32 = checkpoints
    reference = prune_streaming(fp32, _config("flap"), DATA, tmp_path / "fp32")["plan"]
    report = prune_streaming(bf16, _config("flap", compute_dtype="bfloat16"), DATA, tmp_path / "out")
    assert report["plan"].bias_means.keys() == reference.bias_means.keys()
    assert report["plan"].bias_means != reference.bias_means
    assert _stored_dtypes(tmp_path / "out") == {"BF16"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_in_memory_float32_compute_of_bf16_model_gives_the_float32_plan(name):
    model = _bf16_model()
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    reference = AutoPruner.from_model(copy.deepcopy(model).float(), _config(name)).compute_plan(DATA)
    pruner = AutoPruner.from_model(model, _config(name, compute_dtype="float32"))
    plan = pruner.compute_plan(DATA)
    assert plan.kept == reference.kept and plan.bias_means == reference.bias_means
    # The weights were cast a layer at a time and put back: the model is the bfloat16 model it was, bit for bit.
    assert all(torch.equal(p, weights[n]) and p.dtype == torch.bfloat16 for n, p in model.state_dict().items())
    pruner.apply_plan(plan)
    assert {p.dtype for p in pruner.model.parameters()} == {torch.bfloat16}


def test_in_memory_bfloat16_compute_keeps_computing_in_bfloat16():
    model = _bf16_model()
    reference = AutoPruner.from_model(copy.deepcopy(model).float(), _config("flap")).compute_plan(DATA)
    plan = AutoPruner.from_model(model, _config("flap", compute_dtype="bfloat16")).compute_plan(DATA)
    assert plan.bias_means.keys() == reference.bias_means.keys() and plan.bias_means != reference.bias_means


def test_float32_compute_of_gradients_keeps_no_float32_weight_copies():
    """Taylor's backward pass gets each layer's float32 copy again from the bfloat16 weight instead of keeping every
    copy alive; the forward is exactly the float32 copy's and the gradients reach the bfloat16 weights."""
    model = _bf16_model()
    reference = copy.deepcopy(model).float()
    ids = DATA[:32].reshape(2, 16)
    context = compute.compute_in(model, model.model.layers, torch.float32)
    packed = []
    pack = context._pack
    context._pack = lambda t: packed.append(pack(t)) or packed[-1]
    with context:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert loss.item() == reference(input_ids=ids, labels=ids).loss.item()
    linears = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert sum(isinstance(p, compute._RecastView) for p in packed) >= linears
    assert model.model.layers[0].mlp.up_proj.weight.grad.dtype == torch.bfloat16


def test_auto_resolves_by_device_and_native_support(monkeypatch):
    monkeypatch.setattr(compute, "cpu_has_native", lambda dtype: dtype not in (torch.bfloat16, torch.float16))
    assert compute.resolve_compute_dtype("auto", torch.bfloat16, "cpu") == torch.float32
    assert compute.resolve_compute_dtype("auto", torch.float16, "cpu") == torch.float32
    assert compute.resolve_compute_dtype("auto", torch.float32, "cpu") == torch.float32
    assert compute.resolve_compute_dtype("auto", torch.bfloat16, "cuda") == torch.bfloat16
    assert compute.resolve_compute_dtype("bfloat16", torch.bfloat16, "cpu") == torch.bfloat16
    monkeypatch.setattr(compute, "cpu_has_native", lambda dtype: True)  # AVX512-BF16 / AMX
    assert compute.resolve_compute_dtype("auto", torch.bfloat16, "cpu") == torch.bfloat16


def test_a_dtype_that_would_round_the_weights_is_not_used(caplog):
    assert compute.resolve_compute_dtype("bfloat16", torch.float32, "cpu") == torch.float32
    assert "would round" in caplog.text
    assert compute.resolve_compute_dtype("float16", torch.bfloat16, "cpu") == torch.bfloat16


def test_dry_run_counts_the_float32_copy_of_one_layer(checkpoints, tmp_path):
    bf16, _ = checkpoints
    up = prune_streaming(bf16, _config("wanda_sp", compute_dtype="float32"), None, tmp_path / "d", dry_run=True)
    same = prune_streaming(bf16, _config("wanda_sp", compute_dtype="bfloat16"), None, tmp_path / "d", dry_run=True)
    peak, peak_bf16 = up["estimated_peak_bytes"], same["estimated_peak_bytes"]
    layer_params = sum(p.numel() for p in tiny_llama().model.layers[0].parameters())
    assert peak["layer_bytes"] == peak_bf16["layer_bytes"] == 2 * layer_params
    assert peak["layer_compute_bytes"] == 4 * layer_params and peak_bf16["layer_compute_bytes"] == 0
    assert peak["peak"] > peak_bf16["peak"] + 4 * layer_params  # the copy and the float32 hidden states
    assert (up["compute_dtype"], same["compute_dtype"], up["checkpoint_dtype"]) == ("float32", "bfloat16", "bfloat16")
    assert "Computing in float32, one layer at a time; written in bfloat16" in format_dry_run(up)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["fp32", "float64", torch.float32, None])
def test_bad_compute_dtype_is_refused_in_one_line(value):
    with pytest.raises(
        ValueError, match=r"^`compute_dtype` must be one of \['auto', 'float32', 'bfloat16', 'float16'\]"
    ):
        PrunerConfig(importance="magnitude", compute_dtype=value)


def test_cli_compute_dtype(checkpoints, tmp_path, capsys):
    from optimum_prune.commands.cli import main

    bf16, _ = checkpoints
    args = ["prune", "--model", str(bf16), "--importance", "magnitude", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--compute-dtype", "fp32"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("optimum-prune: error: argument --compute-dtype: invalid choice: 'fp32'")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert main([*args, "--compute-dtype", "float32", "--streaming"]) == 0
    assert json.loads((tmp_path / "out" / "pruner_config.json").read_text())["compute_dtype"] == "float32"
    assert "--compute-dtype float32" in (tmp_path / "out" / "README.md").read_text()


def _dispatched(path, config, dtype):
    """Layers 0 and 2, the final norm and the LM head on disk; the embedding and layer 1 in memory."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu"}
    device_map |= {"model.layers.2": "disk", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "disk"}
    offload = str(path.parent / f"offload-{path.name}")
    return AutoPruner.from_pretrained(
        path, pruner_config=config, dtype=dtype, device_map=device_map, offload_folder=offload
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dispatched_float32_compute_of_bf16_model_gives_the_float32_plan(tmp_path, name):
    """Under `device_map` with layers on disk, each layer is cast once accelerate has loaded its weights; the plan is
    that of the float32 copy dispatched the same way."""
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    copy.deepcopy(model).float().save_pretrained(tmp_path / "fp32")
    reference = _dispatched(tmp_path / "fp32", _config(name), torch.float32).compute_plan(DATA)
    pruner = _dispatched(tmp_path / "bf16", _config(name, compute_dtype="float32"), torch.bfloat16)
    plan = pruner.compute_plan(DATA)
    assert plan.kept == reference.kept and plan.bias_means == reference.bias_means
    assert {p.dtype for p in pruner.model.parameters()} == {torch.bfloat16}
