import json

from optimum_prune import PrunerConfig


def test_round_trip(tmp_path):
    config = PrunerConfig(pruning_ratio=0.3, importance="magnitude", importance_kwargs={"p": 1}, round_to=8, seed=3)
    config.save_pretrained(tmp_path)
    loaded = PrunerConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert loaded.to_dict() == json.loads(config.to_json_string())
    assert "pruning_ratio=0.3" in repr(loaded)


def test_unknown_keys_warn(tmp_path, caplog):
    (tmp_path / "pruner_config.json").write_text(json.dumps({"pruning_ratio": 0.1, "from_the_future": 1}))
    with caplog.at_level("WARNING"):
        config = PrunerConfig.from_pretrained(tmp_path)
    assert config.pruning_ratio == 0.1 and "from_the_future" in caplog.text


def test_json_sorted():
    text = PrunerConfig().to_json_string()
    keys = list(json.loads(text))
    assert keys == sorted(keys)
