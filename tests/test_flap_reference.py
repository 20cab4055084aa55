"""Our `flap` criterion against plans made by FLAP's own code (github.com/CASIA-IVA-Lab/FLAP, `prune_flap`).

`tests/fixtures/flap_reference_plans.json` was written by `python benchmarks/peers/flap_peer.py <FLAP checkout>
tests/fixtures/flap_reference_plans.json`: FLAP's code (the edits `benchmarks/peers/flap_peer.py` lists) on the test
suite's tiny LLaMA with one KV head per head, 16 seeded random windows of 32 tokens, WIFV, bias compensation; UL-UM at
FLAP's ratio 0.5, AL-AM at 0.3. With FLAP's online fluctuation estimator and the same removed fraction, our plan
keeps the same heads and channels and folds the same means into the biases (UL-UM with FLAP's per-layer ratio as
`layer_ratios`: our uniform allocation rounds head counts to the nearest, FLAP truncates the removed count).
"""

import json
from pathlib import Path

import pytest
import torch
from testing_utils import VOCAB, tiny_llama

from optimum_prune import AutoPruner, PrunerConfig


REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "flap_reference_plans.json").read_text())


def our_plan(tmp_path, structure: str, fluctuation: str):
    model_dir = tmp_path / "mha"
    tiny_llama(num_key_value_heads=8).save_pretrained(model_dir)
    ids = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    config = PrunerConfig(
        pruning_ratio=REFERENCE[structure]["removed"],
        importance="flap",
        importance_kwargs={"fluctuation": fluctuation},
        # UL-UM: FLAP's per-layer ratio given as is (it removes int(0.5 * units) of every layer: 4 heads, 40 channels).
        allocation="flap" if structure == "AL-AM" else None,
        layer_ratios=None if structure == "AL-AM" else [REFERENCE[structure]["flap_ratio"]] * 3,
        bias_compensation=True,
        num_calibration_samples=16,
        calibration_seq_len=32,
    )
    pruner = AutoPruner.from_pretrained(str(model_dir), pruner_config=config, dtype=torch.float32)
    return pruner.compute_plan(calibration_data=ids)


@pytest.mark.parametrize("structure", ["UL-UM", "AL-AM"])
def test_flap_online_fluctuation_matches_flap_code(tmp_path, structure):
    reference = REFERENCE[structure]["plan"]
    plan = our_plan(tmp_path, structure, "online")
    if structure == "UL-UM":
        assert plan.kept == reference["kept"]
    else:
        # The same heads; after the heads, our allocation re-thresholds the MLP channels alone on the exact parameter
        # target, FLAP keeps what its single threshold left: the same ranking, a channel more or less per layer.
        assert {k: v for k, v in plan.kept.items() if k.startswith("attention")} == {
            k: v for k, v in reference["kept"].items() if k.startswith("attention")
        }
        for layer in range(3):
            ours, theirs = set(plan.kept[f"mlp_channels.{layer}"]), set(reference["kept"][f"mlp_channels.{layer}"])
            assert ours <= theirs or theirs <= ours
            assert len(ours ^ theirs) <= 2
    assert set(plan.bias_means) == set(reference["bias_means"])
    for key, means in reference["bias_means"].items():
        if plan.kept[key] != reference["kept"][key]:
            continue
        for name, values in means.items():
            # FLAP rounds its means to float16 before folding them in.
            torch.testing.assert_close(
                torch.tensor(plan.bias_means[key][name], dtype=torch.float64),
                torch.tensor(values, dtype=torch.float64),
                rtol=1e-3,
                atol=1e-4,
            )
