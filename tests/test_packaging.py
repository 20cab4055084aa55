"""A wheel built from the checkout works on its own: installed into a fresh virtualenv, it prunes and writes a model card.

Catches data files the package reads from outside itself (the card template once lived in `model_cards/` beside the
package, which no wheel contains). The new environment sees the test environment's third-party packages through a
`.pth` line, but not its editable install of optimum-prune, so only the wheel's files can be imported.
"""

import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import optimum_prune
    from optimum_prune import AutoPruner, PrunerConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    assert Path(optimum_prune.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), optimum_prune.__file__
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    pruner = AutoPruner.from_model(LlamaForCausalLM(config), PrunerConfig(pruning_ratio=0.2, importance="magnitude"))
    pruner.prune()
    pruner.save_pretrained(sys.argv[1])
    print("saved")
    """
)


def _build_wheel(dist: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("optimum_prune-*.whl")
    return wheel


def _fresh_venv(path: Path) -> Path:
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Third-party packages from the test environment (torch, transformers, ...), not its optimum-prune.
    (Path(site) / "test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX virtualenv layout")
def test_wheel_in_a_fresh_virtualenv_prunes_and_writes_a_card(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    names = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)], check=True, capture_output=True, text=True
    ).stdout
    assert "optimum_prune/templates/pruned_model.md" in names
    python = _fresh_venv(tmp_path / "venv")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "pruned"
    result = subprocess.run(
        [str(python), "-c", SCRIPT, str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: `import optimum_prune` must find the wheel's copy
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("saved")
    card = (out / "README.md").read_text()
    assert "optimum-prune" in card and "magnitude" in card
    assert (out / "pruning_plan.json").is_file() and (out / "model.safetensors").is_file()
