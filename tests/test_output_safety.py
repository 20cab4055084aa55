"""Output directories: nothing optimum-prune did not write is ever deleted, replacement is atomic, one writer a target.

Every case here lost data or misbehaved before `optimum_prune/output_dir.py` (the reliability issue, class 1).
"""

import errno
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from testing_utils import tiny_llama, word_tokenizer
from transformers import AutoModelForCausalLM

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune import output_dir as output_module
from optimum_prune.commands.cli import main
from optimum_prune.output_dir import OutputDirectoryError, exchange_directories, output_lock
from optimum_prune.streaming import prune_streaming


MAGNITUDE = {"pruning_ratio": 0.2, "importance": "magnitude", "structures": ["mlp_channels"]}


def _pruned(ratio: float = 0.2):
    pruner = AutoPruner.from_model(tiny_llama(), PrunerConfig(**{**MAGNITUDE, "pruning_ratio": ratio}))
    pruner.prune()
    return pruner


@pytest.fixture
def pruner():
    return _pruned()


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "models" / "tiny"
    tiny_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def _snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_foreign_directory_is_refused_and_kept(pruner, tmp_path):
    target = tmp_path / "thesis"
    target.mkdir()
    (target / "chapter1.tex").write_text("years of work")
    with pytest.raises(OutputDirectoryError, match="not empty and is not an optimum-prune checkpoint.*--overwrite"):
        pruner.save_pretrained(target)
    assert _snapshot(target) == {"chapter1.tex": b"years of work"}
    assert _siblings(target) == []


def test_overwrite_replaces_only_checkpoint_files(pruner, tmp_path):
    target = tmp_path / "mixed"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    (target / "model-00001-of-00009.safetensors").write_bytes(b"stale shard")
    pruner.save_pretrained(target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"
    assert not (target / "model-00001-of-00009.safetensors").exists()  # an old checkpoint's file, not the user's
    assert (
        AutoModelForCausalLM.from_pretrained(target).config.intermediate_size == pruner.model.config.intermediate_size
    )


def test_previous_output_is_replaced_whole(tmp_path):
    target = tmp_path / "out"
    _pruned(0.2).save_pretrained(target)
    second = _pruned(0.4)
    second.save_pretrained(target)  # a previous optimum-prune output: no flag needed
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert reloaded.config.intermediate_size == second.model.config.intermediate_size
    assert _siblings(target) == []


@pytest.mark.parametrize("where", ["input", "parent", "grandparent"])
def test_input_directory_and_its_ancestors_are_refused(model_dir, where):
    target = {"input": model_dir, "parent": model_dir.parent, "grandparent": model_dir.parent.parent}[where]
    before = _snapshot(model_dir)
    pruner = AutoPruner.from_pretrained(model_dir, pruner_config=PrunerConfig(**MAGNITUDE))
    pruner.prune()
    with pytest.raises(OutputDirectoryError, match="would replace the input"):
        pruner.save_pretrained(target, overwrite=True)  # not even with overwrite
    assert _snapshot(model_dir) == before


@pytest.mark.parametrize("path", ["", "  ", ".", "./", "sub/..", None])
def test_empty_and_working_directory_are_refused(pruner, tmp_path, monkeypatch, path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "precious.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputDirectoryError, match="empty|working directory"):
        pruner.save_pretrained(path, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "x"


def test_killed_between_renames_is_restored_by_the_next_run(pruner, tmp_path, monkeypatch):
    """Without an atomic exchange, a kill after "old aside" must not lose the old checkpoint."""
    target = tmp_path / "out"
    _pruned(0.4).save_pretrained(target)
    old = _snapshot(target)
    monkeypatch.setattr(output_module, "exchange_directories", lambda a, b: False)
    real_replace = os.replace

    def killed_after_first_rename(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(f".old-{os.getpid()}"):
            raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(output_module.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        pruner.save_pretrained(target)
    monkeypatch.setattr(output_module.os, "replace", real_replace)
    assert not target.exists() and any(name.startswith(".out.old-") for name in _siblings(target))

    with pytest.raises(RuntimeError):  # the next run fails too, after it started writing
        with output_module.atomic_directory(target):
            raise RuntimeError("boom")
    assert _snapshot(target) == old and _siblings(target) == []


def test_replacement_swaps_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert exchange_directories(a, b)  # Linux renameat2(RENAME_EXCHANGE): the target never goes missing
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_stale_leftovers_of_killed_runs_are_cleaned(pruner, tmp_path, caplog):
    target = tmp_path / "out"
    for name in (".out.tmp-123-abc", ".out.tmp-q1w2e3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"0" * 4096)
    pruner.save_pretrained(target)
    assert _siblings(target) == []
    assert "left by an earlier run" in caplog.text


def test_second_writer_fails_clearly(pruner, tmp_path):
    target = tmp_path / "out"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from optimum_prune.output_dir import output_lock
        with output_lock({str(target)!r}):
            print("locked", flush=True)
            time.sleep(30)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirectoryError, match=rf"Another optimum-prune run \(pid {process.pid}\) is writing"):
            pruner.save_pretrained(target)
        assert not target.exists()
    finally:
        process.kill()
        process.wait()
    pruner.save_pretrained(target)  # the lock dies with its process
    assert (target / "pruning_plan.json").is_file()


def test_lock_is_reentrant_and_removed(tmp_path):
    target = tmp_path / "out"
    with output_lock(target):
        with output_lock(target):
            assert (tmp_path / ".out.lock").is_file()
    assert not (tmp_path / ".out.lock").exists()


def test_output_has_normal_permissions(pruner, tmp_path):
    pruner.save_pretrained(tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


def test_unwritable_location_is_refused_before_writing(pruner):
    with pytest.raises(OutputDirectoryError, match="Cannot (write to|create)"):
        pruner.save_pretrained("/proc/self/pruned")


def test_too_little_free_space_is_refused_before_writing(pruner, tmp_path, monkeypatch):
    monkeypatch.setattr(output_module.shutil, "disk_usage", lambda path: _Usage())
    with pytest.raises(OutputDirectoryError, match="Not enough free space.*GiB needed"):
        pruner.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []


class _Usage:
    total, used, free = 10**9, 10**9, 1024


def test_disk_full_while_writing_leaves_nothing(pruner, tmp_path, monkeypatch):
    target = tmp_path / "out"
    _pruned(0.4).save_pretrained(target)
    old = _snapshot(target)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pruner.model, "save_pretrained", full)
    with pytest.raises(OutputDirectoryError, match="No space left on device.*nothing was changed"):
        pruner.save_pretrained(target)
    assert _snapshot(target) == old and _siblings(target) == []


def test_streaming_refuses_its_input_before_reading_layers(model_dir):
    before = _snapshot(model_dir)
    with pytest.raises(OutputDirectoryError, match="would replace the input"):
        prune_streaming(model_dir, PrunerConfig(**MAGNITUDE), None, model_dir.parent, overwrite=True)
    assert _snapshot(model_dir) == before


def test_streaming_refuses_a_foreign_directory(model_dir, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "data.csv").write_text("1,2")
    with pytest.raises(OutputDirectoryError, match="not empty"):
        prune_streaming(model_dir, PrunerConfig(**MAGNITUDE), None, target)
    assert _snapshot(target) == {"data.csv": b"1,2"}


@pytest.mark.parametrize("output", ["{model}", "{parent}", ".", ""])
def test_cli_refuses_before_any_work(model_dir, tmp_path, monkeypatch, capsys, output):
    monkeypatch.chdir(model_dir.parent)
    before = _snapshot(model_dir.parent)
    target = output.format(model=model_dir, parent=model_dir.parent)
    started = time.perf_counter()
    code = main(["prune", "--model", str(model_dir), "--importance", "magnitude", "--output", target, "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("optimum-prune: error: ")
    assert _snapshot(model_dir.parent) == before
    assert time.perf_counter() - started < 5  # refused up front, not after loading and pruning


def test_cli_overwrite_flag(model_dir, tmp_path, capsys):
    target = tmp_path / "results"
    target.mkdir()
    (target / "keep.txt").write_text("k")
    args = ["prune", "--model", str(model_dir), "--importance", "magnitude", "--structures", "mlp_channels"]
    assert main([*args, "--output", str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--output", str(target), "--overwrite"]) == 0
    assert (target / "keep.txt").read_text() == "k" and (target / "pruning_plan.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert reloaded(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
