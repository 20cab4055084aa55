"""Bad input gets a clear error that says what is allowed."""

import pytest
import torch
from testing_utils import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.calibration import prepare_calibration


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.2])
def test_ratio_outside_range(ratio):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        PrunerConfig(pruning_ratio=ratio)


def test_unknown_importance_lists_known():
    with pytest.raises(ValueError, match="magnitude.*random.*taylor"):
        PrunerConfig(importance="nope")


def test_unknown_structure():
    with pytest.raises(ValueError, match="subset of"):
        PrunerConfig(structures=["heads"])


def test_bad_importance_kwargs():
    with pytest.raises(ValueError, match="`p` must be 1 or 2"):
        PrunerConfig(importance="magnitude", importance_kwargs={"p": 3})
    with pytest.raises(ValueError, match="Invalid arguments"):
        PrunerConfig(importance="magnitude", importance_kwargs={"q": 3})


def test_bad_integers():
    with pytest.raises(ValueError, match="round_to"):
        PrunerConfig(round_to=0)
    with pytest.raises(ValueError, match="calibration_seq_len"):
        PrunerConfig(calibration_seq_len=-1)


def test_unknown_architecture():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20))
    with pytest.raises(ValueError, match=r"no architecture spec for model_type 'gpt2'.*Supported: \[.*'llama'"):
        AutoPruner.from_model(model, PrunerConfig(importance="magnitude"))


def test_ratio_that_removes_every_head():
    pruner = AutoPruner.from_model(
        tiny_llama(), PrunerConfig(pruning_ratio=0.35, importance="magnitude", structures=["attention_heads"])
    )
    with pytest.raises(ValueError, match="every attention head"):
        pruner.prune()


def test_calibration_shorter_than_seq_len():
    with pytest.raises(ValueError, match="shorter than `calibration_seq_len`"):
        prepare_calibration(torch.arange(10), None, num_samples=2, seq_len=64)


def test_taylor_without_data():
    pruner = AutoPruner.from_model(tiny_llama(), PrunerConfig(importance="taylor"))
    with pytest.raises(ValueError, match="needs calibration data"):
        pruner.prune()


def test_prune_twice():
    pruner = AutoPruner.from_model(tiny_llama(), PrunerConfig(importance="magnitude"))
    pruner.prune()
    with pytest.raises(RuntimeError, match="already pruned"):
        pruner.prune()


def test_layers_ratio_unreachable_lists_options():
    pruner = AutoPruner.from_model(
        tiny_llama(), PrunerConfig(pruning_ratio=0.1, importance="magnitude", structures=["layers"])
    )
    with pytest.raises(ValueError, match="1 layers ="):
        pruner.prune()
