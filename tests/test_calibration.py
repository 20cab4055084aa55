import json

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from optimum_prune.calibration import prepare_calibration


@pytest.fixture
def tokenizer():
    words = [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


TEXT = " ".join(f"w{i % 50}" for i in range(400))


def test_every_input_kind_gives_the_same_shape(tokenizer, tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i : i + 200]}) for i in range(0, 1600, 200)))
    sources = [
        TEXT.split(". "),
        str(tmp_path / "c.txt"),
        str(tmp_path / "c.jsonl"),
        Dataset.from_dict({"text": [TEXT]}),
        Dataset.from_dict({"input_ids": [list(range(1, 40))] * 5}),
        torch.arange(1, 300),
        torch.randint(1, 50, (6, 40)),
    ]
    for source in sources:
        batch = prepare_calibration(source, tokenizer, num_samples=3, seq_len=16, seed=0)
        assert batch.shape == (3, 16) and batch.dtype == torch.long


def test_seeded(tokenizer):
    a = prepare_calibration([TEXT], tokenizer, 4, 16, seed=1)
    assert torch.equal(a, prepare_calibration([TEXT], tokenizer, 4, 16, seed=1))
    assert not torch.equal(a, prepare_calibration([TEXT], tokenizer, 4, 16, seed=2))


def test_bad_inputs(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.txt or \.jsonl"):
        prepare_calibration(str(tmp_path / "missing.txt"), tokenizer, 2, 8)
    with pytest.raises(TypeError, match="token ids"):
        prepare_calibration(torch.zeros(10), tokenizer, 2, 8)
    with pytest.raises(ValueError, match="'text' or 'input_ids'"):
        prepare_calibration(Dataset.from_dict({"x": ["a"]}), tokenizer, 2, 8)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        prepare_calibration(["w1 w2"], None, 2, 1)
