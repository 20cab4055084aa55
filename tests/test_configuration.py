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


def test_default_is_the_configuration_benchmarks_defaults_chose():
    """`benchmarks/defaults.py` picked Taylor scores ranked across layers on their raw values, then reconstruction with
    units chosen by refit error, fit to the residual stream, on 128 calibration windows (README, "Defaults"): the
    unset fields resolve to exactly that, and step back where another option decides."""
    default = PrunerConfig(pruning_ratio=0.3)
    assert default.reconstruction_selection == "error" and default.reconstruction_target == "residual"
    assert (default.importance, default.global_ranking, default.global_normalization) == ("taylor", True, "none")
    assert default.structures == ["attention_heads", "mlp_channels"] and default.num_calibration_samples == 128
    assert default.reconstruction is None  # on, once the planner has seen the family (tests/test_reconstruction.py)
    assert PrunerConfig(uniform=True).global_ranking is False
    assert PrunerConfig(importance="wanda_sp").global_ranking is False
    assert PrunerConfig(importance="bip").global_normalization == "none"
    assert PrunerConfig(importance="magnitude", global_ranking=True).global_normalization == "mean"
    assert PrunerConfig(importance="magnitude").reconstruction is False  # it reads no calibration data
    assert PrunerConfig(structures=["attention_heads", "layers"]).reconstruction is False
    assert PrunerConfig(importance="wanda_sp", streaming=True).reconstruction is False  # one pass
    assert PrunerConfig(importance="wanda_sp", streaming=True, allocation="flap").reconstruction is None  # two passes
