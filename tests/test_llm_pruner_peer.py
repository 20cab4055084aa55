"""The LLM-Pruner benchmark peer: rows that say why it is missing, and (only where a checkout and its venv are given
through LLM_PRUNER_CHECKOUT / LLM_PRUNER_PYTHON) a real run whose rebuilt model matches the peer's own evaluation."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY_LLAMA = Path("/work/shared/models/tiny-llama")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_rows_say_why_llm_pruner_is_missing(tmp_path):
    quality = _load(BENCHMARKS / "quality.py", "quality_benchmark")
    row = quality.run_llm_pruner("tiny-llama", "llm-pruner", 0.2, 10, None, None)
    assert row["status"] == "unavailable" and "--llm-pruner-checkout" in row["reason"]

    row = quality.run_llm_pruner("tiny-llama", "llm-pruner-layers1-4", 0.2, 10, str(tmp_path), sys.executable)
    assert row["status"] == "unavailable" and "not an LLM-Pruner checkout" in row["reason"]
    assert quality.LLM_PRUNER_PEERS["llm-pruner-layers1-4"] == (1, 5)


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.environ.get("LLM_PRUNER_CHECKOUT") and os.environ.get("LLM_PRUNER_PYTHON") and TINY_LLAMA.is_dir()),
    reason="needs an LLM-Pruner checkout, its venv (LLM_PRUNER_CHECKOUT, LLM_PRUNER_PYTHON) and the shared tiny-llama",
)
def test_llm_pruner_peer_hits_the_target_and_rebuilds_exactly(tmp_path):
    from optimum_prune import perplexity

    sys.path.insert(0, str(BENCHMARKS / "peers"))
    import llm_pruner_peer

    corpus = Path("/work/shared/data/corpus")
    result = llm_pruner_peer.prune_with_llm_pruner(
        TINY_LLAMA,
        0.4,
        checkout=os.environ["LLM_PRUNER_CHECKOUT"],
        python=os.environ["LLM_PRUNER_PYTHON"],
        layers=(1, 5),
        calibration=corpus / "calibration.txt",
        eval_text=corpus / "eval.txt",
        timeout_s=300,
        output_dir=tmp_path / "pruned",
    )
    assert result["status"] == "ok", result["reason"]
    assert abs(result["removed_fraction"] - 0.4) <= 0.005
    model, tokenizer = llm_pruner_peer.load_pruned_model(result["output_dir"])
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert widths[0] == widths[-1] == 704 and all(w < 704 for w in widths[1:5])  # layers 0 and 5 spared
    ours = perplexity(model, corpus / "eval.txt", tokenizer)
    assert ours == pytest.approx(result["ppl_peer_env"], rel=1e-4)
