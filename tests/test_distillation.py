"""Distillation recovery: the loss is the temperature-scaled KL to the teacher, training lowers it, the result keeps
the pruned shape and type, and bad teachers or methods are refused in one line."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import WORDS, logits, tiny_llama, word_tokenizer
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner, Pruner, PrunerConfig
from optimum_prune.architectures.llama import LLAMA_SPEC
from optimum_prune.recovery import DistillationConfig, distillation_loss, hidden_state_loss


REPO_ROOT = Path(__file__).resolve().parent.parent
FAST = {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1}


def _hand_kl(student, teacher, temperature, mask=None):
    """KL(p_teacher || p_student) x T^2 per token with explicit sums, averaged over the kept positions."""
    values = []
    for b in range(student.shape[0]):
        for s in range(student.shape[1]):
            if mask is not None and not mask[b, s]:
                continue
            zs = [math.exp(x / temperature) for x in student[b, s].tolist()]
            zt = [math.exp(x / temperature) for x in teacher[b, s].tolist()]
            ps = [z / sum(zs) for z in zs]
            pt = [z / sum(zt) for z in zt]
            values.append(sum(t * math.log(t / q) for t, q in zip(pt, ps)))
    return sum(values) / len(values) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_distillation_loss_is_the_scaled_kl(temperature):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen) * 2
    expected = _hand_kl(student, teacher, temperature)
    assert distillation_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    masked = distillation_loss(student, teacher, temperature, attention_mask=mask).item()
    assert masked == pytest.approx(_hand_kl(student, teacher, temperature, mask), rel=1e-5)
    assert distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)
    bf16 = distillation_loss(student, teacher.bfloat16(), temperature)
    assert bf16.dtype == torch.float32  # a bf16 teacher's logits are compared in float32


def test_hidden_state_loss_is_relative_per_layer():
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 4, 6, generator=gen) for _ in range(3)]
    student = [t + 0.1 * torch.randn(t.shape, generator=gen) for t in teacher]
    expected = sum(((s - t) ** 2).mean() / (t**2).mean() for s, t in zip(student[1:], teacher[1:])) / 2
    assert hidden_state_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    scaled = hidden_state_loss([10 * s for s in student], [10 * t for t in teacher])
    assert scaled.item() == pytest.approx(expected.item(), rel=1e-4)  # each layer weighs alike whatever its scale


def _learnable_ids(n=4096):
    """A stream a tiny model can learn, so a few steps measurably move it."""
    return (torch.arange(n) * 3 % 7 + 5).long()


def _sharp_teacher():
    """tiny_llama with a scaled-up head: confident, far-from-uniform distributions to distil."""
    teacher = tiny_llama()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(5)
    return teacher


def _training_ids():
    """Four blocks of the training stream, where the KL to the teacher is measured."""
    return _learnable_ids()[:128].view(4, 32)


def _kl_to(teacher, model, ids):
    with torch.no_grad():
        return distillation_loss(model(ids).logits, teacher(ids).logits).item()


def _pruned_copy(teacher, **config):
    pruner = AutoPruner.from_model(
        copy.deepcopy(teacher), PrunerConfig(pruning_ratio=0.3, importance="magnitude", **config)
    )
    pruner.prune()
    return pruner


def test_distill_lowers_kl_to_the_teacher_and_keeps_the_pruned_model(tmp_path):
    teacher = _sharp_teacher()
    teacher_weights = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    pruner = _pruned_copy(teacher)
    cls, shapes = type(pruner.model), {n: p.shape for n, p in pruner.model.named_parameters()}
    ids = _training_ids()
    before = _kl_to(teacher, pruner.model, ids)

    report = pruner.recover(
        _learnable_ids(), training_args={**FAST, "output_dir": str(tmp_path / "t")}, block_size=32,
        method="distill", teacher=teacher,
    )  # fmt: skip

    assert _kl_to(teacher, pruner.model, ids) < 0.7 * before
    assert report["last_logged_loss"] < report["first_logged_loss"]
    assert type(pruner.model) is cls and {n: p.shape for n, p in pruner.model.named_parameters()} == shapes
    assert not [n for n, _ in pruner.model.named_modules() if "lora" in n.lower()], "adapters must be merged away"
    assert all(torch.equal(p, teacher_weights[n]) for n, p in teacher.named_parameters()), "the teacher is frozen"
    assert pruner.recovery["method"] == "distill" and pruner.recovery["temperature"] == 1.0

    pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, ids), logits(pruner.model, ids), atol=0, rtol=0)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "distillation from the unpruned model (KL divergence of logits at T=1.0), LoRA r=8" in card
    assert "--method distill --temperature 1.0" in card


def test_distill_full_finetune_with_hidden_term(tmp_path):
    """Every weight trains (norms and embeddings too, which LoRA leaves alone); the hidden term needs the hidden
    width and depth kept, which pruning heads and MLP channels does."""
    teacher = _sharp_teacher()
    pruner = _pruned_copy(teacher)
    before = {n: p.detach().clone() for n, p in pruner.model.named_parameters()}
    ids = _training_ids()
    kl_before = _kl_to(teacher, pruner.model, ids)
    pruner.recover(
        _learnable_ids(), training_args={**FAST, "learning_rate": 1e-3, "output_dir": str(tmp_path / "t")},
        block_size=32, method="distill", teacher=teacher, full_finetune=True,
        distillation={"temperature": 1.0, "hidden_weight": 1.0},
    )  # fmt: skip
    changed = {n for n, p in pruner.model.named_parameters() if not torch.equal(before[n], p)}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert _kl_to(teacher, pruner.model, ids) < kl_before
    assert pruner.recovery["finetune"] == "full" and "r" not in pruner.recovery
    assert (pruner.recovery["lm_weight"], pruner.recovery["hidden_weight"]) == (0.0, 1.0)


def test_default_teacher_is_the_recorded_base_model(tmp_path):
    """A pruner made from a checkpoint (and one reloaded with `from_pruned`) distils from that checkpoint."""
    base = tmp_path / "base"
    _sharp_teacher().save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    pruner = AutoPruner.from_pretrained(str(base), PrunerConfig(pruning_ratio=0.3, importance="magnitude"))
    pruner.prune()
    pruner.save_pretrained(tmp_path / "pruned")
    reloaded = Pruner.from_pruned(tmp_path / "pruned")
    ids = _training_ids()
    teacher = AutoModelForCausalLM.from_pretrained(base)
    before = _kl_to(teacher, reloaded.model, ids)
    reloaded.recover(_learnable_ids(), training_args={**FAST, "output_dir": str(tmp_path / "t")}, block_size=32,
                     method="distill")  # fmt: skip
    assert reloaded.recovery["teacher"] == str(base)
    assert _kl_to(teacher, reloaded.model, ids) < 0.7 * before


def test_bad_teachers_and_methods_are_refused_in_one_line(tmp_path):
    teacher = tiny_llama()
    pruner = _pruned_copy(teacher)
    data = _learnable_ids()
    cases = [
        ({"method": "kd"}, "Unknown recovery method 'kd'; use 'lm'"),
        ({"teacher": teacher}, "A teacher is only used by `method='distill'`"),
        ({"method": "distill"}, "does not know where its base model came from; pass the unpruned model"),
        ({"method": "distill", "teacher": tiny_llama(vocab_size=64)}, "The teacher's vocabulary (64 logits)"),
        ({"method": "distill", "teacher": pruner.model}, "The teacher is the pruned model itself"),
        ({"method": "distill", "teacher": str(tmp_path / "missing")}, "missing"),
        (
            {"method": "distill", "teacher": teacher, "distillation": {"temperature": 0}},
            "temperature must be positive",
        ),
        ({"method": "distill", "teacher": teacher, "distillation": {"lm_weight": -1}}, "`lm_weight` must be zero or"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, OSError)) as err:
            pruner.recover(data, block_size=32, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), kwargs
    assert pruner.recovery is None, "nothing trained"


def test_hidden_matching_refuses_pruned_hidden_channels():
    teacher = tiny_llama()
    pruner = _pruned_copy(teacher, structures=["hidden_channels"])
    with pytest.raises(ValueError, match="hidden states of the same shape: the teacher has 3 layers of width 48"):
        pruner.recover(_learnable_ids(), block_size=32, method="distill", teacher=teacher,
                       distillation=DistillationConfig(hidden_weight=1.0))  # fmt: skip
    assert LLAMA_SPEC.lora_target_modules  # the LoRA path is the default, unchanged


# ---------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A base checkpoint, its pruned checkpoint (recording the base) and training text."""
    root = tmp_path_factory.mktemp("distill")
    base = root / "base"
    _sharp_teacher().save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    pruner = AutoPruner.from_pretrained(str(base), PrunerConfig(pruning_ratio=0.3, importance="magnitude"))
    pruner.prune()
    pruner.save_pretrained(root / "pruned")
    (root / "train.txt").write_text(" ".join(WORDS[(i * 3) % 7] for i in range(3000)))
    return root


@pytest.mark.slow  # a CLI process with teacher and student; the Python API tests below cover the distillation itself
def test_recover_command_distills_from_teacher(checkpoints, tmp_path):
    out = tmp_path / "out"
    root = checkpoints
    args = ["recover", "--model", str(root / "pruned"), "--train", str(root / "train.txt"), "--output", str(out)]
    args += ["--method", "distill", "--teacher", str(root / "base"), "--temperature", "2", "--lm-weight", "0.5"]
    args += ["--max-steps", "4", "--batch-size", "2", "--block-size", "16", "--eval", str(root / "train.txt")]
    args += ["--eval-seq-len", "32", "--eval-windows", "4", "--logging-steps", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "optimum_prune.commands.cli", *args], capture_output=True,
                            text=True, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity_recovered" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    pruned = AutoModelForCausalLM.from_pretrained(root / "pruned")
    assert type(model) is type(pruned)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in pruned.named_parameters()}
    assert not [n for n, _ in model.named_modules() if "lora" in n.lower()]
    recovery = json.loads((out / "pruning_results.json").read_text())["recovery"]
    assert recovery["method"] == "distill" and recovery["teacher"] == str(root / "base")
    assert (recovery["temperature"], recovery["lm_weight"], recovery["max_steps"]) == (2.0, 0.5, 4)
    teacher = AutoModelForCausalLM.from_pretrained(root / "base")
    ids = _training_ids()
    assert _kl_to(teacher, model, ids) < _kl_to(teacher, pruned, ids)


def test_recover_command_bad_inputs(checkpoints, tmp_path, capsys):
    from optimum_prune.commands.cli import main

    root = checkpoints
    args = ["recover", "--model", str(root / "pruned"), "--train", str(root / "train.txt")]
    args += ["--output", str(tmp_path / "o"), "--max-steps", "1", "--block-size", "16"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--method", "kd"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --method: invalid choice: 'kd'" in err
    assert main([*args, "--method", "distill", "--teacher", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("optimum-prune: error:") and "nowhere" in err and err.count("\n") == 1
    assert main([*args, "--method", "distill", "--teacher", str(root / "base"), "--temperature", "-1"]) == 2
    assert "temperature must be positive" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pickled_teacher_needs_the_opt_in(tmp_path):
    """The teacher loads through the same no-pickle-without-opt-in check as every other checkpoint."""
    teacher = _sharp_teacher()
    teacher.config.save_pretrained(tmp_path / "teacher")
    torch.save(teacher.state_dict(), tmp_path / "teacher" / "pytorch_model.bin")
    pruner = _pruned_copy(teacher)
    with pytest.raises(ValueError, match="has only pickled weights .pytorch_model.bin.* `allow_pickle=True`"):
        pruner.recover(_learnable_ids(), block_size=32, method="distill", teacher=str(tmp_path / "teacher"))
    assert pruner.recovery is None
    pruner.recover(_learnable_ids(), training_args={**FAST, "max_steps": 1, "output_dir": str(tmp_path / "t")},
                   block_size=32, method="distill", teacher=str(tmp_path / "teacher"), allow_pickle=True)  # fmt: skip
    assert pruner.recovery["teacher"] == str(tmp_path / "teacher")
