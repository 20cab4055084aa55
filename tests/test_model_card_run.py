"""The model card describes the run: its "Reproduce" command makes the same plan again, its "allocation" row names the
allocation, and its loading snippet runs as written in a fresh interpreter, with and without optimum_prune."""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import fields

import pytest
import torch
from testing_utils import input_ids, logits, tiny_bloom, tiny_glm, tiny_llama, tiny_opt, word_text, word_tokenizer

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.commands.cli import build_parser, main
from optimum_prune.commands.prune import build_pruner_config


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout
PROMPT = "Do you wish to run the custom code"


def _prune_parser():
    """The `prune` subparser, as `optimum-prune prune` reads its arguments."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices["prune"]


def _base(tmp_path, model) -> str:
    """`model` saved with the word tokenizer, and `calib.txt` beside it."""
    base = tmp_path / "base"
    model.save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    (tmp_path / "calib.txt").write_text(word_text())
    return str(base)


def _card_section(readme: str, title: str, language: str) -> str:
    """The first fenced `language` block under the `## title` heading of a card."""
    match = re.search(rf"^## {re.escape(title)}\n.*?```{language}\n(.*?)```", readme, re.S | re.M)
    assert match, f"no {language} block under '## {title}'"
    return match.group(1)


def _allocation_row(readme: str) -> str:
    return re.search(r"^\| allocation \| (.*) \|$", readme, re.M).group(1)


# Every PrunerConfig field that the CLI can set, in configs the parser must read back exactly.
ROUND_TRIP_CONFIGS = [
    dict(),
    dict(pruning_ratio=0.35, importance="magnitude", importance_kwargs={"p": 1}, global_ranking=True),
    dict(importance="taylor", global_ranking=True, global_normalization="none", min_heads=4, min_channels=8),
    dict(importance="magnitude", attention_layers=(1, 3), mlp_layers=[0, 2], round_to=4, seed=3),
    dict(importance="magnitude", attention_layers=[2], structures=["attention_heads"]),
    dict(importance="magnitude", head_rounding="up", attention_layers=[1, 2], mlp_layers=[1, 2]),
    dict(importance="magnitude", layer_ratios={0: 0.1, 2: 0.4}),
    dict(importance="magnitude", layer_ratios=[0.1, 0.2, 0.3], num_calibration_samples=4, calibration_seq_len=16),
    dict(importance="flap", allocation="flap", bias_compensation=True),
    dict(importance="flap", allocation="flap", bias_compensation=False),
    dict(importance="magnitude", bias_compensation=True, structures=["mlp_channels"]),
    dict(importance="magnitude", uniform=True, structures=["query_heads", "mlp_channels"]),
    dict(
        importance="magnitude",
        structures=["layers", "mlp_channels"],
        layer_importance="block_influence",
        num_layers_to_remove=1,
    ),
    dict(importance="taylor", iterative_steps=3),
    dict(importance="wanda_sp", streaming=True),
    dict(importance="magnitude", compute_dtype="bfloat16"),
    dict(
        importance="wanda_sp",
        reconstruction=True,
        reconstruction_damping=0.05,
        reconstruction_selection="criterion",
        reconstruction_target="output",
    ),
]


def test_every_pruner_config_field_is_a_prune_option_or_listed_as_none():
    """A new PrunerConfig field needs a `prune` option (same `dest`), or a place in NOT_CLI_FIELDS: either way the
    card's command cannot silently drop it."""
    from optimum_prune.commands.prune import NOT_CLI_FIELDS

    options = {action.dest for action in _prune_parser()._actions}
    config_fields = {f.name for f in fields(PrunerConfig)}
    assert config_fields - set(NOT_CLI_FIELDS) <= options, "fields with no `prune` option and not in NOT_CLI_FIELDS"
    assert not set(NOT_CLI_FIELDS) & options, "a field listed in NOT_CLI_FIELDS has an option now: remove it there"
    assert set(NOT_CLI_FIELDS) <= config_fields


@pytest.mark.parametrize("kwargs", ROUND_TRIP_CONFIGS)
def test_config_to_args_reads_back_as_the_same_config(kwargs):
    from optimum_prune.commands.prune import config_to_args

    config = PrunerConfig(**kwargs)
    args = _prune_parser().parse_args(["--model", "m", "--output", "o", *config_to_args(config)])
    assert build_pruner_config(args).to_dict() == config.to_dict()


def test_round_trip_configs_set_every_cli_field():
    """The round-trip cases above leave no PrunerConfig field at its default everywhere."""
    from optimum_prune.commands.prune import NOT_CLI_FIELDS

    default = PrunerConfig().to_dict()
    varied = {name for kwargs in ROUND_TRIP_CONFIGS for name, v in PrunerConfig(**kwargs).to_dict().items()}
    varied = {n for n in varied if any(PrunerConfig(**k).to_dict()[n] != default[n] for k in ROUND_TRIP_CONFIGS)}
    assert {f.name for f in fields(PrunerConfig)} - set(NOT_CLI_FIELDS) == varied


# (PrunerConfig kwargs, words the card's allocation row must hold). Every case prunes tiny_llama in Python, then runs
# the card's command through the CLI: both plans must be equal.
REPRODUCE_CASES = {
    "global_ranking": (
        dict(importance="magnitude", importance_kwargs={"p": 1}, global_ranking=True, pruning_ratio=0.3),
        ["global ranking", "divided by their mean"],
    ),
    "global_ranking_raw_taylor": (
        dict(importance="taylor", global_ranking=True, global_normalization="none", num_calibration_samples=4),
        ["global ranking", "raw scores"],
    ),
    "layer_ranges": (
        dict(importance="taylor", attention_layers=(1, 3), mlp_layers=[0, 2], num_calibration_samples=4),
        ["attention heads pruned only in layers 1-2", "MLP channels pruned only in layers 0, 2"],
    ),
    "layer_ratios": (
        dict(importance="magnitude", layer_ratios={0: 0.1, 2: 0.5}, round_to=4, head_rounding="up"),
        ["per-layer ratios", "multiples of 4", "head counts rounded up"],
    ),
    "flap": (
        dict(importance="flap", allocation="flap", num_calibration_samples=4, calibration_seq_len=32),
        ["FLAP", "bias compensation"],
    ),
    "layer_removal": (
        dict(
            importance="magnitude",
            structures=["layers", "mlp_channels"],
            layer_importance="block_influence",
            num_layers_to_remove=1,
            num_calibration_samples=4,
            pruning_ratio=0.4,
        ),
        ["1 whole layer removed, scored by `block_influence`"],
    ),
    "iterative_min_heads": (
        dict(importance="magnitude", iterative_steps=2, min_heads=4, pruning_ratio=0.3),
        ["2 steps", "at least 4 query heads"],
    ),
}


SLOW_REPRODUCE_CASES = {"global_ranking_raw_taylor", "iterative_min_heads"}  # options the fast cases do not add


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_REPRODUCE_CASES else []) for c in REPRODUCE_CASES]
)
def test_card_command_reproduces_the_plan(tmp_path, case, capsys):
    kwargs, allocation_words = REPRODUCE_CASES[case]
    base = _base(tmp_path, tiny_llama(hidden_size=64))
    calib = str(tmp_path / "calib.txt")
    pruner = AutoPruner.from_pretrained(base, PrunerConfig(**kwargs))
    pruner.prune(calibration_data=calib)
    pruner.save_pretrained(tmp_path / "python")
    readme = (tmp_path / "python" / "README.md").read_text()
    row = _allocation_row(readme)
    assert all(word in row for word in allocation_words), row

    command = shlex.split(_card_section(readme, "Reproduce", "bash").splitlines()[0])
    assert command[:2] == ["optimum-prune", "prune"]
    argv = command[1:]
    assert argv[argv.index("--model") + 1] == base
    argv[argv.index("--output") + 1] = str(tmp_path / "cli")
    if "--calibration" in argv:
        assert argv[argv.index("--calibration") + 1] == calib
    assert main(argv) == 0, capsys.readouterr().err

    plans = [json.loads((tmp_path / run / "pruning_plan.json").read_text()) for run in ("python", "cli")]
    assert plans[0] == plans[1]
    configs = [json.loads((tmp_path / run / "pruner_config.json").read_text()) for run in ("python", "cli")]
    assert configs[0] == configs[1]


@pytest.mark.slow
def test_card_command_of_a_streaming_run_reproduces_it(tmp_path, capsys):
    from optimum_prune.streaming import prune_streaming

    base = _base(tmp_path, tiny_llama(hidden_size=64))
    config = PrunerConfig(importance="magnitude", global_ranking=True, streaming=True)
    prune_streaming(base, config, None, tmp_path / "python")
    readme = (tmp_path / "python" / "README.md").read_text()
    assert "streaming" in _allocation_row(readme) and "global ranking" in _allocation_row(readme)
    argv = shlex.split(_card_section(readme, "Reproduce", "bash").splitlines()[0])[1:]
    argv[argv.index("--output") + 1] = str(tmp_path / "cli")
    assert main(argv) == 0, capsys.readouterr().err
    plans = [json.loads((tmp_path / run / "pruning_plan.json").read_text()) for run in ("python", "cli")]
    assert plans[0] == plans[1]


def test_card_command_quotes_what_the_shell_would_split(tmp_path):
    """JSON options and paths with spaces come back from the shell as one argument each."""
    from optimum_prune.hub import prune_command

    config = PrunerConfig(importance="magnitude", importance_kwargs={"p": 1}, layer_ratios={0: 0.1, 2: 0.5})
    calib = tmp_path / "my data.txt"
    calib.write_text("w1")
    argv = shlex.split(prune_command("/models/my base", config, str(calib)))
    assert argv[argv.index("--model") + 1] == "/models/my base"
    assert argv[argv.index("--calibration") + 1] == str(calib)
    assert json.loads(argv[argv.index("--importance-kwargs") + 1]) == {"p": 1}
    assert json.loads(argv[argv.index("--layer-ratios") + 1]) == {"0": 0.1, "2": 0.5}
    # Data passed in Python has no path: the command says where to put a file, not the data's description.
    argv = shlex.split(prune_command("m", config, "a string of 120 characters"))
    assert argv[argv.index("--calibration") + 1] == "CALIBRATION_FILE"


# One pruned checkpoint per loading path the card can describe: (builder, PrunerConfig kwargs, expected model type).
SNIPPET_CASES = {
    "llama": (tiny_llama, dict(structures=["attention_heads"], pruning_ratio=0.1), "llama"),
    "pruned_llama": (lambda: tiny_llama(hidden_size=64), dict(pruning_ratio=0.3), "pruned_llama"),
    "pruned_opt": (tiny_opt, dict(pruning_ratio=0.3), "pruned_opt"),
    "pruned_bloom": (tiny_bloom, dict(pruning_ratio=0.3), "pruned_bloom"),
    "pruned_glm": (tiny_glm, dict(pruning_ratio=0.3, global_ranking=True), "pruned_glm"),
}


def _run_snippets(checkpoints: dict[str, str], ids: torch.Tensor, import_package: bool) -> dict[str, tuple]:
    """Run the python block of every checkpoint's card in one new interpreter with stdin closed (a "run custom
    code?" prompt gets no answer) and return `{case: (logits of ids or the error, what the case printed)}`.

    With `import_package=False` optimum_prune cannot be imported (the venv's editable install included), so only what
    the checkpoint carries can load it; with `True` it is imported first, registering its types. One interpreter for
    all cases, each snippet in its own namespace, because starting torch and transformers is most of the time.
    """
    cases = []
    for case, checkpoint in checkpoints.items():
        readme = open(os.path.join(checkpoint, "README.md"), encoding="utf-8").read()
        cases.append((case, _card_section(readme, "How to load it", "python")))
    work = os.path.dirname(next(iter(checkpoints.values())))
    out = os.path.join(work, f"snippet-logits-{int(import_package)}.pt")
    prelude = "import optimum_prune" if import_package else "sys.modules['optimum_prune'] = None"
    code = textwrap.dedent(f"""
        import sys, traceback, torch
        {prelude}
        results = {{}}
        for case, snippet in {cases!r}:
            print("@@", case, flush=True)
            namespace = {{}}
            try:
                exec(snippet, namespace)
                assert namespace["tokenizer"]("w1 w2")["input_ids"] == [2, 3], "not the checkpoint's tokenizer"
                with torch.no_grad():
                    results[case] = namespace["model"].eval()(input_ids=torch.tensor({ids.tolist()})).logits
            except BaseException:
                results[case] = traceback.format_exc()
        torch.save(results, {out!r})
    """)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": os.path.join(work, f"modules-{int(import_package)}"),
        "PYTHONPATH": ROOT if import_package else "",
    }
    result = subprocess.run(
        [sys.executable, "-u", "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=work,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    printed = dict(re.findall(r"^@@ (\S+)\n(.*?)(?=^@@ |\Z)", result.stdout, re.S | re.M))
    return {case: (value, printed.get(case, "")) for case, value in torch.load(out).items()}


@pytest.fixture(scope="module")
def snippet_checkpoints(tmp_path_factory) -> dict[str, tuple[str, torch.Tensor]]:
    """Every SNIPPET_CASES checkpoint saved with its card, and the pruned model's logits of `input_ids()`."""
    checkpoints = {}
    for case, (build, kwargs, model_type) in SNIPPET_CASES.items():
        tmp_path = tmp_path_factory.mktemp(case)
        pruner = AutoPruner.from_pretrained(_base(tmp_path, build()), PrunerConfig(importance="magnitude", **kwargs))
        pruner.prune()
        assert pruner.model.config.model_type == model_type
        pruner.save_pretrained(tmp_path / "pruned")
        checkpoints[case] = (str(tmp_path / "pruned"), logits(pruner.model, input_ids()))
    return checkpoints


@pytest.mark.parametrize("import_package", [True, False], ids=["with_package", "without_package"])
def test_card_snippet_loads_every_type_in_a_fresh_interpreter(snippet_checkpoints, import_package):
    paths = {case: path for case, (path, _) in snippet_checkpoints.items()}
    results = _run_snippets(paths, input_ids(), import_package)
    assert sorted(results) == sorted(SNIPPET_CASES)
    for case, (_, expected) in snippet_checkpoints.items():
        value, printed = results[case]
        assert PROMPT not in printed, f"{case}: the snippet asks whether to run custom code:\n{printed[-2000:]}"
        assert isinstance(value, torch.Tensor), f"{case}: the card's snippet failed:\n{value}"
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=f"{case}: other logits")
