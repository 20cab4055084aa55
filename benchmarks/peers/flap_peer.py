"""FLAP's own code as a benchmark peer: `prune_flap` (WIFV metric, UL-UM or AL-AM structure, bias compensation) and
`prune_wanda_sp` from https://github.com/CASIA-IVA-Lab/FLAP (commit 3bb57db), run in this process on a multi-head
LLaMA (FLAP prunes q, k and v rows with one mask, so it cannot prune grouped-query models: use
`benchmarks/train_multihead.py`).

Nothing of FLAP is vendored: :func:`materialise` copies `lib/prune.py`, `lib/layerwrapper.py` and
`models/hf_llama/modeling_llama.py` from a checkout (or a bare git directory, e.g. the one `fetch` writes) into a
temporary folder and applies the edits listed in `EDITS`, each of which must match; `ADAPTATIONS` says the same in
every result. The pruning functions themselves run unchanged: the adapter replaces `main.get_llm` (loading) and
`lib.data.get_loaders` (WikiText-2 / C4 downloads), and records the masks `compress` receives, which become an
optimum-prune :class:`~optimum_prune.PruningPlan` (kept heads and channels, bias means). Applying that plan to the
original checkpoint with our surgery gives FLAP's pruned model in our checkpoint types (a registered
`pruned_llama` with per-layer widths and biases), which `load_flap_result` checks against FLAP's own model.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch


FLAP_COMMIT = "3bb57db"
FILES = ("lib/prune.py", "lib/layerwrapper.py", "models/hf_llama/modeling_llama.py")
HEAD_DIM_LITERAL = re.compile(r"(?<![\w.])128(?![\w.])")
# (file, old, new, why): literal replacements, each must occur at least once.
EDITS = (
    (
        "lib/prune.py",
        "from .data import get_loaders ",
        "get_loaders = None  # set by the peer adapter ",
        "calibration: our windows of calibration.txt instead of WikiText-2 (FLAP) / C4 (Wanda-SP) downloads",
    ),
    ("lib/prune.py", "W_metric.cuda()", "W_metric", "CPU: the thresholds are sorted where the metric is"),
    (
        "lib/prune.py",
        ".type(torch.half)",
        ".type(torch.half).float()",
        "float32 on CPU: the bias-compensation means keep FLAP's float16 rounding, the matmul runs in float32",
    ),
    (
        "lib/prune.py",
        "512.0 / 3",
        "4.0 * HEAD_DIM / 3",
        "AL-AM head cost in MLP channels: 4 * head_dim * hidden / (3 * hidden), 512/3 at LLaMA-7B's head_dim 128",
    ),
    (
        "models/hf_llama/modeling_llama.py",
        "self.head_dim = 128",
        "self.head_dim = config.head_dim",
        "head_dim literal of the modeling file: the config's (32 for the tiny models)",
    ),
)
ADAPTATIONS = (
    *(why for _, _, _, why in EDITS),
    "head_dim literal 128 of lib/prune.py (mask expansion, per-head reshapes, cal_remove_neuron): HEAD_DIM, set "
    "from config.head_dim",
    "loading: FLAP's LlamaForCausalLM (eager attention) built from the config, our float32 weights loaded, o_proj / "
    "down_proj biases zeroed for every layer (get_llm's `range(32)`), model.seqlen = calibration length, on CPU",
    "pruning_ratio: FLAP's is the fraction of each decoder layer's heads and channels; the adapter picks the one "
    "that comes closest to the target fraction of total parameters",
)


def _read_files(checkout: Path) -> dict[str, str]:
    """The three FLAP files from a work tree, or from a git directory at FLAP_COMMIT's descendant HEAD."""
    if (checkout / "lib" / "prune.py").is_file():
        return {name: (checkout / name).read_text(encoding="utf-8") for name in FILES}
    texts = {}
    for name in FILES:
        out = subprocess.run(
            ["git", "--git-dir", str(checkout), "show", f"HEAD:{name}"], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise FileNotFoundError(f"{checkout} is neither a FLAP work tree nor its git directory: {out.stderr}")
        texts[name] = out.stdout
    return texts


def materialise(checkout: str | Path, dest: str | Path | None = None) -> Path:
    """Write FLAP's files with `EDITS` applied into `dest` (a fresh temp folder by default); raises if one does not
    match, so that a changed upstream fails loudly instead of running unedited."""
    texts = _read_files(Path(checkout))
    for name, old, new, _ in EDITS:
        if old not in texts[name]:
            raise ValueError(f"FLAP edit does not apply: {old!r} not found in {name}")
        texts[name] = texts[name].replace(old, new)
    prune, count = HEAD_DIM_LITERAL.subn("HEAD_DIM", texts["lib/prune.py"])
    if not count:
        raise ValueError("FLAP edit does not apply: no head_dim literal 128 in lib/prune.py")
    texts["lib/prune.py"] = "HEAD_DIM = 128  # set by the peer adapter from config.head_dim\n" + prune
    root = Path(dest or tempfile.mkdtemp(prefix="flap_peer_"))
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "lib" / "__init__.py").write_text("", encoding="utf-8")
    return root


def _import(root: Path, module: str, relative: str):
    spec = importlib.util.spec_from_file_location(module, root / relative)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def load_flap_modules(root: Path):
    """FLAP's (edited) `lib.prune` and `models.hf_llama.modeling_llama`, imported under private package names."""
    _import(root, "flap_peer_lib", "lib/__init__.py")
    _import(root, "flap_peer_lib.layerwrapper", "lib/layerwrapper.py")
    sys.modules["flap_peer_lib"].__path__ = [str(root / "lib")]
    prune = _import(root, "flap_peer_lib.prune", "lib/prune.py")
    modeling = _import(root, "flap_peer_modeling", "models/hf_llama/modeling_llama.py")
    return prune, modeling


def load_flap_model(modeling, model_dir: str | Path, seq_len: int):
    """FLAP's `get_llm` on CPU in float32: its own LlamaForCausalLM with zeroed o_proj / down_proj biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError(
            f"FLAP's code prunes q, k and v with one mask and needs as many KV heads as heads; {model_dir} has "
            f"{config.num_key_value_heads} of {config.num_attention_heads} (train one: benchmarks/train_multihead.py)."
        )
    config._attn_implementation = "eager"
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = modeling.LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=False)
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
        torch.nn.init.zeros_(layer.mlp.down_proj.bias)
    model.seqlen = seq_len
    return model.float().eval()


def uniform_ratio(config, target: float, total: int) -> float:
    """FLAP's per-layer ratio whose UL-UM widths (int(r*H) heads, int(r*C) channels removed per layer) come closest
    to removing `target` of the `total` parameters (its added biases, one hidden vector per module, counted)."""
    hidden, heads, channels = config.hidden_size, config.num_attention_heads, config.intermediate_size
    head_cost, channel_cost = 4 * hidden * config.head_dim, 3 * hidden

    def removed(r: float) -> float:
        per_layer = int(r * heads) * head_cost + int(channels * r) * channel_cost - 2 * hidden
        return per_layer * config.num_hidden_layers / total

    grid = [i / 10000 for i in range(1, 9900)]
    return min(grid, key=lambda r: (abs(removed(r) - target), r))


def adaptive_ratio(config, target: float, total: int) -> float:
    """FLAP's AL-AM ratio (a fraction of the layers' weighted units) that removes `target` of the `total` parameters."""
    hidden = config.hidden_size
    per_layer = 4 * hidden * config.num_attention_heads * config.head_dim + 3 * hidden * config.intermediate_size
    return (target * total + 2 * hidden * config.num_hidden_layers) / (per_layer * config.num_hidden_layers)


def run_flap(
    checkout: str | Path,
    model_dir: str | Path,
    calibration_ids: torch.Tensor,
    *,
    method: str,
    pruning_ratio: float,
    structure: str = "UL-UM",
    metrics: str = "WIFV",
):
    """Prune with FLAP's `prune_flap` (`method="flap"`) or `prune_wanda_sp` at FLAP's own `pruning_ratio`.

    Returns `(model, records)`: FLAP's pruned model and, per layer, what its `compress` received (head mask, channel
    mask, the float16-rounded input means, whether it compensated biases)."""
    prune, modeling = load_flap_modules(materialise(checkout))
    model = load_flap_model(modeling, model_dir, calibration_ids.shape[1])
    prune.HEAD_DIM = model.config.head_dim
    windows = [(calibration_ids[i : i + 1], None) for i in range(calibration_ids.shape[0])]
    prune.get_loaders = lambda *args, **kwargs: (windows, None)
    layer_index = {id(layer): i for i, layer in enumerate(model.model.layers)}
    records: dict[int, dict] = {}
    original = prune.compress

    def recording(layer, attn_mask, mlp_mask, attn_mean_inp, mlp_mean_inp, device, bias=True, unstr=False):
        entry = records.setdefault(layer_index[id(layer)], {})
        if attn_mask is not None:
            entry.update(heads=attn_mask.clone(), head_means=attn_mean_inp, head_bias=bias)
        if mlp_mask is not None:
            entry.update(channels=mlp_mask.clone(), channel_means=mlp_mean_inp, channel_bias=bias)
        return original(layer, attn_mask, mlp_mask, attn_mean_inp, mlp_mean_inp, device, bias=bias, unstr=unstr)

    prune.compress = recording
    args = SimpleNamespace(
        nsamples=calibration_ids.shape[0],
        seed=0,
        pruning_ratio=pruning_ratio,
        remove_heads=-1,
        metrics=metrics,
        structure=structure,
        unstr=False,
    )
    with torch.no_grad():
        if method == "flap":
            prune.prune_flap(args, model, None, torch.device("cpu"))
        elif method == "wanda_sp":
            prune.prune_wanda_sp(args, model, None, torch.device("cpu"))
        else:
            raise ValueError(f"`method` must be 'flap' or 'wanda_sp', got {method!r}")
    return model, records


def records_to_plan(records: dict[int, dict], config):
    """FLAP's masks and means as an optimum-prune plan (indices of the original model)."""
    from optimum_prune import PruningPlan

    head_dim = config.head_dim
    kept, counts, bias_means = {}, {}, {}
    for i, entry in sorted(records.items()):
        heads, channels = entry["heads"].bool(), entry["channels"].bool()
        counts[f"attention_heads.{i}"], counts[f"mlp_channels.{i}"] = heads.numel(), channels.numel()
        kept[f"attention_heads.{i}"] = torch.nonzero(heads).flatten().tolist()
        kept[f"mlp_channels.{i}"] = torch.nonzero(channels).flatten().tolist()
        if entry.get("head_bias") and entry.get("head_means") is not None:
            removed = ~heads.repeat_interleave(head_dim)
            bias_means[f"attention_heads.{i}"] = {
                f"model.layers.{i}.self_attn.o_proj.weight": entry["head_means"][removed].double().tolist()
            }
        if entry.get("channel_bias") and entry.get("channel_means") is not None:
            bias_means[f"mlp_channels.{i}"] = {
                f"model.layers.{i}.mlp.down_proj.weight": entry["channel_means"][~channels].double().tolist()
            }
    return PruningPlan(
        config.model_type, config.num_hidden_layers, unit_counts=counts, kept=kept, bias_means=bias_means
    )


__all__ = [
    "ADAPTATIONS",
    "EDITS",
    "FLAP_COMMIT",
    "adaptive_ratio",
    "load_flap_model",
    "materialise",
    "records_to_plan",
    "run_flap",
    "uniform_ratio",
]


def reference_model_and_windows():
    """The model and windows of the stored reference plans: the test suite's tiny LLaMA with one KV head per head,
    and 16 seeded random windows of 32 tokens in the order our calibration takes them (FLAP's estimator is
    order-dependent)."""
    from optimum_prune.calibration import prepare_calibration

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.testing_utils import VOCAB, tiny_llama

    ids = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    return tiny_llama(num_key_value_heads=8), ids, prepare_calibration(ids, None, 16, 32)


def write_reference_plans(checkout: str | Path, path: str | Path) -> dict:
    """Run FLAP's code (UL-UM at 0.5, AL-AM at 0.3, WIFV, bias compensation) on the reference model and store its
    plans as JSON (`tests/fixtures/flap_reference_plans.json`): kept indices and bias means, no weights."""
    import copy
    import json

    from optimum_prune import count_parameters

    model, ids, windows = reference_model_and_windows()
    total = count_parameters(model)
    stored = {"flap_commit": FLAP_COMMIT, "windows": list(windows.shape), "adaptations": list(ADAPTATIONS)}
    with tempfile.TemporaryDirectory() as model_dir:
        model.save_pretrained(model_dir)
        for structure, ratio in (("UL-UM", 0.5), ("AL-AM", 0.3)):
            peer_model, records = run_flap(
                checkout, model_dir, windows, method="flap", pruning_ratio=ratio, structure=structure
            )
            plan = records_to_plan(records, model.config)
            removed = 1 - count_parameters(plan.apply(copy.deepcopy(model))) / total
            stored[structure] = {"flap_ratio": ratio, "removed": removed, "plan": plan.to_dict()}
            del peer_model
    Path(path).write_text(json.dumps(stored, indent=1) + "\n", encoding="utf-8")
    return stored


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the FLAP reference plans the tests compare against.")
    parser.add_argument("checkout", help="FLAP work tree or git dir")
    parser.add_argument("output", help="JSON file, e.g. tests/fixtures/flap_reference_plans.json")
    args = parser.parse_args()
    write_reference_plans(args.checkout, args.output)
