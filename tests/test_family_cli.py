"""The issue's "done when" for the newer families: `optimum-prune prune --structures attention_heads mlp_channels` on
a saved tiny checkpoint of each (a subprocess, as a user runs it), and the result equals the original with the plan's
removed units zeroed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from family_table import FAMILIES
from testing_utils import input_ids, load_eval, logits

from optimum_prune.plan import PruningPlan


# The command is family-agnostic past loading: one family runs by default, the others (a CLI process each) when slow.
CLI_FAMILIES = [
    "qwen3",
    pytest.param("phi3", marks=pytest.mark.slow),
    pytest.param("gemma3_text", marks=pytest.mark.slow),
]


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "optimum-prune"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "optimum_prune.commands.cli"]


@pytest.mark.parametrize("family", CLI_FAMILIES)
def test_prune_command_equals_zeroed_reference(tmp_path, family):
    FAMILIES[family].build().save_pretrained(tmp_path / "model")
    args = ["prune", "--model", str(tmp_path / "model"), "--pruning-ratio", "0.2", "--importance", "magnitude"]
    args += ["--structures", "attention_heads", "mlp_channels", "--output", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([*_cli(), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = PruningPlan.from_dict(json.loads((tmp_path / "out" / "pruning_plan.json").read_text()))
    assert {key.split(".")[0] for key in plan.kept} == {"attention_heads", "mlp_channels"}
    reference, _ = FAMILIES[family].zeroed_reference(FAMILIES[family].build(), plan)
    ids = input_ids()
    torch.testing.assert_close(logits(load_eval(tmp_path / "out"), ids), logits(reference, ids), atol=1e-5, rtol=0)
