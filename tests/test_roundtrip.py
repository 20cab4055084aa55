"""Save, reload (in a fresh process too), and re-apply plans."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from testing_utils import input_ids, logits, tiny_llama
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner, PrunerConfig, PruningPlan


def _pruned(structures=("attention_heads", "mlp_channels"), ratio=0.3, **kwargs):
    model = tiny_llama(**kwargs)
    pruner = AutoPruner.from_model(
        model, PrunerConfig(pruning_ratio=ratio, importance="magnitude", structures=list(structures))
    )
    pruner.prune()
    return pruner


def _fresh_process_logits(path, ids, *, trust_remote_code, import_package):
    code = textwrap.dedent(f"""
        import sys, torch
        {"import optimum_prune" if import_package else "sys.modules['optimum_prune'] = None  # the package is absent"}
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code={trust_remote_code}).eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(path / "logits.pt")!r})
        print(type(model).__name__)
    """)
    root = str(Path(__file__).resolve().parents[1])  # this checkout, whatever the working directory
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(path.parent / "modules"), "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=path.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(path / "logits.pt"), result.stdout.strip()


def test_save_writes_every_file(tmp_path):
    pruner = _pruned()
    pruner.save_pretrained(tmp_path / "out")
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "model.safetensors", "pruning_plan.json", "pruner_config.json", "README.md"} <= files
    card = (tmp_path / "out" / "README.md").read_text()
    assert "optimum-prune" in card and f"{pruner.params_after:,}" in card
    assert json.loads((tmp_path / "out" / "pruner_config.json").read_text())["importance"] == "magnitude"


@pytest.mark.slow  # tests/test_families.py reloads every LLaMA structure in the same two kinds of interpreter
@pytest.mark.parametrize("ratio", [0.3, 0.1])
def test_reload_in_fresh_process_identical(tmp_path, ratio):
    """6 of 8 heads (registered type, trust_remote_code without the package) and a stock-expressible shape."""
    pruner = _pruned(ratio=ratio)
    out = tmp_path / "out"
    pruner.save_pretrained(out)
    ids = input_ids()
    expected = logits(pruner.model, ids)
    config = json.loads((out / "config.json").read_text())
    loaded, cls = _fresh_process_logits(out, ids, trust_remote_code=False, import_package=True)
    torch.testing.assert_close(loaded, expected, atol=0, rtol=0)
    if config["model_type"] == "pruned_llama":
        assert cls == "PrunedLlamaForCausalLM"
        assert "auto_map" in config and (out / "modeling_pruned_llama.py").exists()
        remote, _ = _fresh_process_logits(out, ids, trust_remote_code=True, import_package=False)
        torch.testing.assert_close(remote, expected, atol=0, rtol=0)
    else:
        assert config["model_type"] == "llama" and cls == "LlamaForCausalLM"
        plain, _ = _fresh_process_logits(out, ids, trust_remote_code=False, import_package=False)
        torch.testing.assert_close(plain, expected, atol=0, rtol=0)


def test_registered_type_loads_in_process(tmp_path):
    pruner = _pruned(ratio=0.3)
    pruner.save_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = input_ids()
    torch.testing.assert_close(logits(model, ids), logits(pruner.model, ids), atol=0, rtol=0)


def test_plan_reapplies_to_a_copy(tmp_path):
    pruner = _pruned(structures=("attention_heads", "mlp_channels", "hidden_channels"), ratio=0.4)
    pruner.plan.save_pretrained(tmp_path)
    plan = PruningPlan.from_pretrained(tmp_path)
    assert plan == pruner.plan
    other = plan.apply(tiny_llama())
    first = dict(pruner.model.named_parameters())
    for name, p in other.named_parameters():
        torch.testing.assert_close(p, first[name], atol=0, rtol=0)
    assert other.config.to_dict() == pruner.model.config.to_dict()


def test_plan_refuses_other_shapes():
    pruner = _pruned()
    with pytest.raises(ValueError, match="same shape"):
        pruner.plan.apply(tiny_llama(intermediate_size=64))


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    pruner = _pruned()
    target = tmp_path / "out"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pruner.plan, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pruner.save_pretrained(target)
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_previous_contents(tmp_path, monkeypatch):
    pruner = _pruned()
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    monkeypatch.setattr(
        pruner.tokenizer.__class__ if pruner.tokenizer else type(pruner),
        "save_pretrained",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")),
        raising=False,
    )
    monkeypatch.setattr(pruner.config, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        pruner.save_pretrained(target)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == ["keep.txt"]
