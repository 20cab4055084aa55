"""Model cards (metadata a Hub would accept, body, chart) and uploads through the fake Hub in `hub_server.py`."""

import json
import os
import sys

import pytest
import torch
import yaml
from hub_server import HUB_TOKEN, run_with_hub_env
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from testing_utils import tiny_llama, word_tokenizer

from optimum_prune import AutoPruner, PrunerConfig, PruningPlan
from optimum_prune.hub import (
    CHART_NAME,
    build_model_card,
    count_macs_per_token,
    hub_base_model,
    plan_is_uniform,
    plot_layer_widths,
)


REQUIRED_METADATA = {"library_name": "transformers", "pipeline_tag": "text-generation"}
TAGS = {"pruned", "structured-pruning", "optimum-prune"}


def _tokenizer():
    return word_tokenizer()


def _base_dir(tmp_path, license="apache-2.0"):
    """A local base checkpoint whose card declares a licence, the way a downloaded snapshot has one.

    Hidden size 64 with 8 heads: keeping 6 heads leaves a width the stock config refuses (the registered type)."""
    base = tmp_path / "base"
    tiny_llama(hidden_size=64).save_pretrained(base)
    _tokenizer().save_pretrained(base)
    (base / "README.md").write_text(f"---\nlicense: {license}\nlibrary_name: transformers\n---\n\n# base\n")
    return base


def _check_card_metadata(text: str) -> dict:
    """What the Hub's YAML validation checks, done locally: one front-matter block, required keys, a model-index
    that parses back into results."""
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    for key, value in REQUIRED_METADATA.items():
        assert meta[key] == value
    assert TAGS <= set(meta["tags"])
    card = ModelCard(text)
    assert card.data.to_dict() == meta  # huggingface_hub parses the same metadata
    if "model-index" in meta:
        name, results = model_index_to_eval_results(meta["model-index"])
        assert name and results and all(r.metric_type == "perplexity" for r in results)
    return meta


def test_card_from_local_base_carries_licence_and_measured_results(tmp_path):
    base = _base_dir(tmp_path)
    pruner = AutoPruner.from_pretrained(base, PrunerConfig(pruning_ratio=0.3, importance="magnitude"))
    ids = torch.randint(0, 97, (2048,), generator=torch.Generator().manual_seed(0))
    before = pruner.evaluate(ids, seq_len=32, max_windows=8)
    pruner.prune()
    after = pruner.evaluate(ids, seq_len=32, max_windows=8)
    out = tmp_path / "out"
    pruner.save_pretrained(out)
    text = (out / "README.md").read_text()
    meta = _check_card_metadata(text)

    assert meta["license"] == "apache-2.0"
    assert "base_model" not in meta, "a local path is not a Hub id"
    assert "magnitude" in meta["tags"]
    _, results = model_index_to_eval_results(meta["model-index"])
    assert results[0].metric_value == pytest.approx(after, abs=1e-4)

    assert pruner.model.config.model_type == "pruned_llama"
    assert f"{pruner.params_before:,}" in text and f"{pruner.params_after:,}" in text
    assert f"{pruner.macs_before:,}" in text and f"{count_macs_per_token(pruner.model):,}" in text
    assert f"{before:.2f}" in text and f"{after:.2f}" in text
    assert "trust_remote_code=True" in text and "`trust_remote_code=True` is needed" in text
    assert "optimum-prune prune --model" in text and "--importance magnitude" in text
    assert "LLM-Pruner: On the Structural Pruning" in text
    assert CHART_NAME not in text and not (out / CHART_NAME).exists(), "uniform plans get no chart"

    saved = json.loads((out / "pruning_results.json").read_text())
    assert saved["params_before"] == pruner.params_before and saved["evaluation"]["perplexity_pruned"] == after


def test_card_for_hub_base_and_stock_type():
    pruner = AutoPruner.from_model(tiny_llama(), PrunerConfig(pruning_ratio=0.1, importance="magnitude"))
    pruner.prune()
    assert pruner.model.config.model_type == "llama"
    card = build_model_card(
        base_model="meta-llama/Llama-3.2-1B",
        pruner_config=pruner.config,
        plan=pruner.plan,
        model_config=pruner.model.config,
        params_before=pruner.params_before,
        params_after=pruner.params_after,
        repo_or_path="me/pruned",
    )
    meta = _check_card_metadata(str(card))
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "license" not in meta and "model-index" not in meta, "nothing is invented"
    assert "https://huggingface.co/meta-llama/Llama-3.2-1B" in card.text
    assert "trust_remote_code" in card.text and "without\n`trust_remote_code`" in card.text
    assert 'from_pretrained("me/pruned")' in card.text and "hf download me/pruned" in card.text


@pytest.mark.parametrize(
    ("name", "expected"),
    [("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B"), ("/abs/path", None), ("./rel", None), (None, None)],
)
def test_hub_base_model(name, expected):
    assert hub_base_model(name) == expected


@pytest.mark.parametrize(("importance", "title"), [("taylor", "LLM-Pruner"), ("random", "LLM-Pruner")])
def test_citations_keyed_by_criterion(importance, title):
    pruner = AutoPruner.from_model(tiny_llama(), PrunerConfig(pruning_ratio=0.1, importance=importance))
    pruner.plan = PruningPlan("llama", 3)
    pruner.params_after = pruner.params_before
    text = pruner.model_card().text
    assert title in text and "@inproceedings{ma2023llmpruner" in text


def test_macs_per_token_from_linear_shapes():
    model = tiny_llama()
    # q: 48 -> 64, k/v: 48 -> 32, o: 64 -> 48, gate/up: 48 -> 80, down: 80 -> 48; LM head 48 -> 97
    per_layer = 48 * 64 + 2 * 48 * 32 + 64 * 48 + 3 * 48 * 80
    assert count_macs_per_token(model) == 3 * per_layer + 48 * 97


def _non_uniform_plan():
    counts = {f"mlp_channels.{i}": 80 for i in range(3)} | {f"attention_heads.{i}": 4 for i in range(3)}
    kept = {"mlp_channels.0": list(range(20)), "mlp_channels.1": list(range(60)), "attention_heads.1": [0, 2]}
    return PruningPlan("llama", 3, unit_counts=counts, kept=kept)


def test_chart_only_for_non_uniform_plans(tmp_path):
    plan = _non_uniform_plan()
    assert not plan_is_uniform(plan)
    assert plan_is_uniform(PruningPlan("llama", 3, unit_counts={"mlp_channels.0": 8}, kept={"mlp_channels.0": [1]}))
    path = tmp_path / CHART_NAME
    assert plot_layer_widths(plan, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_layer_widths(_non_uniform_plan(), tmp_path / CHART_NAME) is False
    assert not (tmp_path / CHART_NAME).exists()


def test_saved_chart_is_referenced_from_card(tmp_path, monkeypatch):
    import optimum_prune.writer as writer_module

    pruner = AutoPruner.from_model(tiny_llama(), PrunerConfig(pruning_ratio=0.3, importance="magnitude"))
    pruner.prune()
    # Surgery only produces uniform widths so far; pretend the plan is not, to check the save path end to end.
    monkeypatch.setattr(writer_module, "plan_is_uniform", lambda plan: False)
    pruner.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / CHART_NAME).read_bytes()[:4] == b"\x89PNG"
    assert f"]({CHART_NAME})" in (tmp_path / "out" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------- uploads

_PUSH_CODE = """
import json, logging, os, torch
logging.basicConfig(level=logging.DEBUG)
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
import optimum_prune.writer as writer_module
from optimum_prune import AutoPruner, PrunerConfig

writer_module.plan_is_uniform = lambda plan: False  # so the chart is part of the upload
model = AutoModelForCausalLM.from_pretrained({base!r})
tokenizer = PreTrainedTokenizerFast.from_pretrained({base!r})
pruner = AutoPruner.from_model(model, PrunerConfig(pruning_ratio=0.3, importance="magnitude"), tokenizer, {base!r})
pruner.prune()
pruner.save_pretrained("local")
main = pruner.push_to_hub("user/pruned", token={token!r}, private=True)
pruner.evaluate(torch.arange(256) % 97, seq_len=32, max_windows=4)  # changes the card: dev and the PR differ
dev = pruner.push_to_hub("user/pruned", token={token!r}, revision="dev", commit_message="to dev")
pr = pruner.push_to_hub("user/pruned", token={token!r}, create_pr=True)
try:
    pruner.push_to_hub("user/other", token="hf_wrong_token_value")
    failure = None
except Exception as err:
    failure = f"{{type(err).__name__}}: {{err}}"
json.dump({{
    "local": sorted(os.listdir("local")), "main": main.oid, "dev": dev.oid, "pr": pr.pr_revision, "failure": failure,
}}, open("result.json", "w"))
"""


def test_push_to_hub_one_commit_exact_files_no_token_leak(hub_server, tmp_path):
    base = _base_dir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    proc = run_with_hub_env(hub_server, _PUSH_CODE.format(base=str(base), token=HUB_TOKEN), work, timeout=300)
    log = "\n".join(hub_server.request_log())
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n{log}"
    assert hub_server.unhandled == []
    assert hub_server.errors and all("user/other" in e or "/api/repos/create" in e for e in hub_server.errors), (
        "only the push with the wrong token is refused"
    )
    result = json.loads((work / "result.json").read_text())

    expected = {
        "README.md",
        CHART_NAME,
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "modeling_pruned_llama.py",
        "per_layer_config.py",  # imported by the modeling file
        "pruner_config.json",
        "pruning_plan.json",
        "pruning_results.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    files = hub_server.files("user/pruned")
    assert set(files) == set(result["local"]) == expected
    assert hub_server.lfs_paths("user/pruned") == {"model.safetensors"}
    assert [(c.repo_id, c.revision, c.pr_num) for c in hub_server.commits] == [
        ("user/pruned", "main", None),
        ("user/pruned", "dev", None),
        ("user/pruned", "refs/pr/1", 1),
    ], "one commit per push"
    assert set(hub_server.commits[0].added) == expected
    assert result["main"] == hub_server.head("user/pruned") and result["dev"] == hub_server.head("user/pruned", "dev")
    assert hub_server.commits[1].summary == "to dev" and "pruned 30%" in hub_server.commits[0].summary
    assert hub_server.revisions("user/pruned") == ["dev", "main", "refs/pr/1"]
    assert result["pr"] == "refs/pr/1"
    assert hub_server.commits[2].added.keys() >= {"README.md", "pruning_results.json"}
    assert b"model-index" not in files["README.md"], "nothing was measured before the first push"
    assert b"model-index" in hub_server.files("user/pruned", "dev")["README.md"]
    assert sorted(hub_server.commits[1].added) == ["README.md", "pruning_results.json"], "unchanged files skipped"
    assert b"model-index" in hub_server.files("user/pruned", "refs/pr/1")["README.md"]

    card = files["README.md"].decode()
    _check_card_metadata(card)
    assert 'from_pretrained("user/pruned", trust_remote_code=True)' in card
    assert f"]({CHART_NAME})" in card and files[CHART_NAME][:4] == b"\x89PNG"
    local = work / "local"
    for name in expected - {"README.md", "pruning_results.json"}:
        assert files[name] == (local / name).read_bytes(), name

    # The token: only ever in the Authorization header; never in files, logs, errors or anything written to disk.
    assert result["failure"] and "401" in result["failure"]
    assert hub_server.token_leaks(HUB_TOKEN) == []
    assert hub_server.token_leaks("hf_wrong_token_value") == []
    for secret in (HUB_TOKEN, "hf_wrong_token_value"):
        assert secret not in proc.stdout + proc.stderr + result["failure"]
        for root, _, names in os.walk(tmp_path):
            for name in names:
                assert secret.encode() not in (open(os.path.join(root, name), "rb").read()), name


def test_pruner_config_push_to_hub(hub_server, tmp_path):
    code = f"""
        import json
        from optimum_prune import PrunerConfig
        config = PrunerConfig(pruning_ratio=0.25, importance="magnitude", structures=["mlp_channels"])
        info = config.push_to_hub("user/cfg", token={HUB_TOKEN!r})
        loaded = PrunerConfig.from_pretrained("user/cfg", token={HUB_TOKEN!r})
        json.dump({{"oid": info.oid, "loaded": loaded.to_dict()}}, open("result.json", "w"))
        """
    proc = run_with_hub_env(hub_server, code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["oid"] == hub_server.head("user/cfg")
    files = hub_server.files("user/cfg")
    assert "pruner_config.json" in files and len(hub_server.commits) == 1
    assert json.loads(files["pruner_config.json"])["pruning_ratio"] == 0.25
    assert result["loaded"] == PrunerConfig(0.25, "magnitude", structures=["mlp_channels"]).to_dict()
    assert hub_server.token_leaks(HUB_TOKEN) == []


def test_prune_command_card_carries_measured_perplexity(tmp_path, capsys):
    from optimum_prune.commands.cli import main

    base = _base_dir(tmp_path)
    (tmp_path / "eval.txt").write_text(" ".join(f"w{(i * 7) % 96}" for i in range(2000)))
    args = ["prune", "--model", str(base), "--importance", "magnitude", "--pruning-ratio", "0.3", "--output"]
    args += [
        str(tmp_path / "out"),
        "--eval",
        str(tmp_path / "eval.txt"),
        "--eval-seq-len",
        "32",
        "--eval-windows",
        "4",
    ]
    assert main(args) == 0
    assert "| perplexity" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "pruning_results.json").read_text())["evaluation"]
    meta = _check_card_metadata((tmp_path / "out" / "README.md").read_text())
    _, evals = model_index_to_eval_results(meta["model-index"])
    assert evals[0].metric_value == pytest.approx(results["perplexity_pruned"], abs=1e-4)
    assert evals[0].dataset_name == "eval.txt" and results["perplexity_base"] > 0
