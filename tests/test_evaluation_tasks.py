"""`evaluate_tasks` and `optimum-prune eval`: lm-eval on a local ten-question task (tests/fixtures/lm_eval_tasks),
checked against the accuracy computed here from the model's own logits, on a tiny LLaMA and a non-uniformly pruned
one (`pruned_llama`), plus perplexity, the results JSON and the errors. No downloads."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from optimum_prune import AutoPruner, PrunerConfig, perplexity
from optimum_prune.commands import cli
from optimum_prune.evaluation import evaluate_tasks


pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "fixtures" / "lm_eval_tasks"
DOCS = [json.loads(line) for line in (TASKS / "tiny_facts.jsonl").read_text().splitlines()]


def _tokenizer():
    """Word-level over the task's words, with BOS/EOS (lm-eval conditions empty contexts on one of them)."""
    words = sorted({w for d in DOCS for w in " ".join([d["question"], *d["choices"]]).split()})
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny LLaMA and its non-uniformly pruned version (registered type `pruned_llama`), each with a tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = _tokenizer()
    model = tiny_llama(seed=1, vocab_size=len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = PrunerConfig(
        importance="magnitude",
        pruning_ratio=0.3,
        layer_ratios=[0.1, 0.6, 0.3],
        structures=["attention_heads", "mlp_channels"],
    )
    pruner = AutoPruner.from_model(tiny_llama(seed=1, vocab_size=len(tokenizer)), config, tokenizer=tokenizer)
    pruner.prune()
    assert pruner.model.config.model_type == "pruned_llama"
    pruner.save_pretrained(root / "pruned")
    text = " ".join(" ".join([d["question"], *d["choices"]]) for d in DOCS * 4)
    (root / "eval.txt").write_text(text)
    return {"root": root, "base": (root / "base", model), "pruned": (root / "pruned", pruner.model), "tok": tokenizer}


_EXPECTED = {}


def _expected(model, tokenizer):
    if id(model) not in _EXPECTED:
        _EXPECTED[id(model)] = _logit_accuracy(model, tokenizer)
    return _EXPECTED[id(model)]


@torch.no_grad()
def _logit_accuracy(model, tokenizer):
    """acc and acc_norm by hand: log-likelihood of " choice" after the question, summed over the choice's tokens,
    argmax vs gold; acc_norm divides by the choice's length in characters (lm-eval's definition)."""
    acc, acc_norm = [], []
    for doc in DOCS:
        context = tokenizer(doc["question"])["input_ids"]
        lls = []
        for choice in doc["choices"]:
            ids = tokenizer(doc["question"] + " " + choice)["input_ids"]
            assert ids[: len(context)] == context
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # [T, vocab]
            lls.append(sum(logprobs[j - 1, ids[j]].item() for j in range(len(context), len(ids))))
        lens = [len(c) for c in doc["choices"]]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
        acc_norm.append(float(max(range(len(lls)), key=lambda i: lls[i] / lens[i]) == doc["label"]))
    return acc, acc_norm


def _check(results, model, tokenizer):
    acc, acc_norm = _expected(model, tokenizer)
    assert set(results) == {"tiny_facts"} and set(results["tiny_facts"]) == {"acc", "acc_norm"}
    for name, values in (("acc", acc), ("acc_norm", acc_norm)):
        mean = sum(values) / len(values)
        stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
        assert results["tiny_facts"][name]["value"] == pytest.approx(mean, abs=1e-9), name
        assert results["tiny_facts"][name]["stderr"] == pytest.approx(stderr, abs=1e-9), name
    return sum(acc) / len(acc)


@pytest.mark.parametrize("which", ["base", "pruned"])
def test_accuracy_equals_logit_computation(checkpoints, monkeypatch, which):
    path, model = checkpoints[which]
    monkeypatch.chdir(TASKS)  # lm-eval resolves the task's relative data_files from the working directory
    results = evaluate_tasks(str(path), "tiny_facts", include_path=TASKS, device="cpu", dtype="float32", batch_size=4)
    acc = _check(results, model, checkpoints["tok"])
    assert 0 < acc < 1, "the fixture should not be trivially all right or all wrong for this model"
    # The model object itself (and lm-eval's `limit`) gives the same numbers as the reloaded checkpoint.
    first = evaluate_tasks(model, ["tiny_facts"], tokenizer=checkpoints["tok"], include_path=[TASKS], limit=4)
    expected, _ = _expected(model, checkpoints["tok"])
    assert first["tiny_facts"]["acc"]["value"] == pytest.approx(sum(expected[:4]) / 4)


def test_cli_prints_table_perplexity_and_json(checkpoints, tmp_path, monkeypatch, capsys):
    """`optimum-prune eval` in process (the console script is `cli.main`; test_cli.py runs it through subprocess)."""
    path, model = checkpoints["pruned"]
    ppl_file = checkpoints["root"] / "eval.txt"
    out = tmp_path / "results" / "eval.json"
    monkeypatch.chdir(TASKS)
    args = ["eval", "--model", str(path), "--tasks", "tiny_facts", "--include-path", str(TASKS)]
    args += ["--ppl-data", str(ppl_file), "--seq-len", "16", "--max-windows", "0"]
    args += ["--output", str(out), "--device", "cpu", "--dtype", "float32"]
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out
    saved = json.loads(out.read_text())
    acc = _check(saved["tasks"], model, checkpoints["tok"])
    assert "| task       | metric   | value  | stderr |" in stdout
    assert f"| tiny_facts | acc      | {acc:.4f}" in stdout
    expected_ppl = perplexity(model, str(ppl_file), checkpoints["tok"], seq_len=16, max_windows=None)
    assert saved["perplexity"][str(ppl_file)] == pytest.approx(expected_ppl, rel=1e-5)
    assert f"perplexity {ppl_file}: {expected_ppl:.4f}" in stdout
    assert saved["model"] == str(path) and saved["config"] == {"num_fewshot": 0, "limit": None}


def test_unknown_task_names_the_fix(checkpoints, monkeypatch):
    path, _ = checkpoints["base"]
    monkeypatch.chdir(TASKS)
    with pytest.raises(ValueError, match=r"Unknown lm-eval task\(s\): tiny_fact\b.*--include-path.*tiny_facts"):
        evaluate_tasks(str(path), "tiny_fact", include_path=TASKS)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        evaluate_tasks(str(path), "tiny_facts", include_path=TASKS / "missing")


def test_missing_extra(checkpoints, monkeypatch, capsys):
    """Without lm-eval, tasks fail with the install line; perplexity alone still works."""
    path, model = checkpoints["base"]
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"pip install optimum-prune\[eval\]"):
        evaluate_tasks(str(path), "tiny_facts")
    assert cli.main(["eval", "--model", str(path), "--tasks", "tiny_facts"]) == 2
    assert "pip install optimum-prune[eval]" in capsys.readouterr().err
    ppl_file = checkpoints["root"] / "eval.txt"
    args = ["eval", "--model", str(path), "--ppl-data", str(ppl_file), "--seq-len", "16", "--device", "cpu"]
    assert cli.main(args) == 0
    expected = perplexity(model, str(ppl_file), checkpoints["tok"], seq_len=16)
    assert f"perplexity {ppl_file}: {expected:.4f}" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(path)]) == 2
    assert "Nothing to evaluate" in capsys.readouterr().err
