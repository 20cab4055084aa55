"""Quality benchmark: perplexity after pruning, as a ratio to the unpruned model, side by side with a peer tool.

Every run (model x method x ratio) executes in its own subprocess so that its peak RSS and wall time are its own.
Prints a Markdown table and writes JSON lines to `benchmarks/results/quality.jsonl`.

    python benchmarks/quality.py                                   # tiny-llama, 20% and 50%, core criteria + peer
    python benchmarks/quality.py --models tiny-opt tiny-bloom --methods taylor magnitude --ratios 0.2
    python benchmarks/quality.py --methods wanda_sp-recon taylor-global-recon flap-adaptive-recon --ratios 0.2 0.4 0.5
    python benchmarks/quality.py --models tiny-mixtral --methods experts-frequency experts-reap --ratios 0.25 0.5 --peers

Models are looked up in the shared models (`../shared/models`), then in `benchmarks/checkpoints/` (where
`benchmarks/train_families.py` and `benchmarks/train_multihead.py` put theirs). For the `experts-*` methods a ratio is
the fraction of **experts** removed from every MoE layer (0.25 of 8: 2 experts); it is turned into the fraction of
total parameters that `PrunerConfig.pruning_ratio` takes (those experts' fused weights and router rows), and the row
records both. For every other method a ratio is the fraction of total parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODELS = SHARED / "models"
CHECKPOINTS = ROOT / "benchmarks" / "checkpoints"
CALIBRATION = SHARED / "data" / "corpus" / "calibration.txt"
EVAL = SHARED / "data" / "corpus" / "eval.txt"
RESULTS = ROOT / "benchmarks" / "results"

# Method name -> PrunerConfig keyword arguments. Every method but `default` calibrates on 32 windows of 128 tokens
# unless it names another count (`method_kwargs`); `default` on the library's default (128 windows).
METHODS: dict[str, dict] = {
    "random": {"importance": "random"},
    "magnitude": {"importance": "magnitude"},
    "magnitude-l1": {"importance": "magnitude", "importance_kwargs": {"p": 1}},
    "taylor": {"importance": "taylor"},
    "taylor-vector": {"importance": "taylor", "importance_kwargs": {"granularity": "vector"}},
    "taylor-mix": {"importance": "taylor", "importance_kwargs": {"order": "mix"}},
    "wanda_sp": {"importance": "wanda_sp"},
    "flap": {"importance": "flap"},
    "bip": {"importance": "bip"},
    "obs": {"importance": "obs"},
    "mini_llm": {"importance": "mini_llm"},
    # MINI-LLM with each decoder layer's own loss (forwards of one layer only; it streams), 8 and 32 perturbations.
    "mini_llm-block": {"importance": "mini_llm", "importance_kwargs": {"loss": "block"}},
    "mini_llm-block32": {"importance": "mini_llm", "importance_kwargs": {"loss": "block", "num_perturbations": 32}},
    # LLM-Pruner's recipe: spare the first and last layers (tiny models have 6 layers).
    "taylor-layers1-5": {"importance": "taylor", "attention_layers": [1, 2, 3, 4], "mlp_layers": [1, 2, 3, 4]},
    # The same with LLM-Pruner's own calibration (10 windows of 64 tokens), to measure how much of the gap to its code
    # the calibration size explains.
    "taylor-layers1-5-cal10x64": {
        "importance": "taylor",
        "attention_layers": [1, 2, 3, 4],
        "mlp_layers": [1, 2, 3, 4],
        "num_calibration_samples": 10,
        "calibration_seq_len": 64,
    },
    # The same, rounding kept head counts up as LLM-Pruner's code does (it removes int(ratio x KV groups)).
    "taylor-layers1-5-up": {
        "importance": "taylor",
        "attention_layers": [1, 2, 3, 4],
        "mlp_layers": [1, 2, 3, 4],
        "head_rounding": "up",
    },
    "magnitude-layers1-5": {"importance": "magnitude", "attention_layers": [1, 2, 3, 4], "mlp_layers": [1, 2, 3, 4]},
    # Global ranking: raw scores where they are in comparable units (loss change, block-output change).
    "taylor-global": {"importance": "taylor", "global_ranking": True, "global_normalization": "none"},
    "bip-global": {"importance": "bip", "global_ranking": True, "global_normalization": "none"},
    "obs-global": {"importance": "obs", "global_ranking": True, "global_normalization": "none"},
    "wanda_sp-global": {"importance": "wanda_sp", "global_ranking": True},
    "magnitude-global": {"importance": "magnitude", "global_ranking": True},
    # FLAP's adaptive structure (one threshold over heads and channels of every layer), with its bias compensation.
    "flap-adaptive": {"importance": "flap", "allocation": "flap"},
    "flap-adaptive-nobias": {"importance": "flap", "allocation": "flap", "bias_compensation": False},
    "block_influence-layers": {"importance": "block_influence", "structures": ["layers"]},
    # Uniform allocation that rounds kept head counts up (FLAP's and LLM-Pruner's code): `<criterion>-up`.
    **{f"{name}-up": {"importance": name, "head_rounding": "up"} for name in ("taylor", "wanda_sp", "flap", "bip")},
    # Query heads within KV groups (GQA models) instead of whole KV groups, uniform allocation.
    **{
        f"{name}-qheads": {"importance": name, "structures": ["query_heads", "mlp_channels"]}
        for name in ("random", "magnitude", "taylor", "wanda_sp", "flap", "bip", "mini_llm")
    },
}
# Whole experts of MoE models, uniform: the same number from every layer (ratio = fraction of experts, see above).
EXPERT_METHODS = {
    f"experts-{name}": {"importance": name, "structures": ["experts"]}
    for name in ("frequency", "reap", "magnitude", "random")
}
# Random experts with other seeds (`seed` also seeds calibration sampling, which random scores do not read).
EXPERT_METHODS.update(
    {
        f"experts-random-seed{seed}": {"importance": "random", "structures": ["experts"], "seed": seed}
        for seed in range(1, 5)
    }
)
METHODS.update(EXPERT_METHODS)
# Layer-wise reconstruction (the consumers o_proj/down_proj refit by ridge least squares after the plan is chosen) on
# the best configurations of each allocation: `<method>-recon`.
RECONSTRUCTED = (
    "magnitude",  # with magnitude-global: the criteria that score MoE expert channels
    "magnitude-global",
    "wanda_sp",
    "taylor",
    "flap",
    "bip",
    "taylor-global",
    "wanda_sp-global",
    "bip-global",
    "flap-adaptive",
    "flap-adaptive-nobias",
)
METHODS.update({f"{name}-recon": {**METHODS[name], "reconstruction": True} for name in RECONSTRUCTED})
# Units chosen by the error left after the refit (structured OBS); the criterion still sets the widths.
METHODS.update(
    {
        f"{name}-recon-error": {**METHODS[name], "reconstruction": True, "reconstruction_selection": "error"}
        for name in ("taylor-global", "wanda_sp", "flap-adaptive-nobias", "bip-global", "obs-global")
    }
)
# Calibration size under reconstruction: 128 windows of 128 tokens instead of 32.
METHODS["taylor-global-recon-cal128"] = {**METHODS["taylor-global-recon"], "num_calibration_samples": 128}
METHODS["wanda_sp-recon-cal128"] = {**METHODS["wanda_sp-recon"], "num_calibration_samples": 128}
# The refit fit to the unpruned residual stream (`reconstruction_target="residual"`, the default since it was measured
# here); the other `*-recon*` rows fit each consumer to its own outputs, as they did before.
METHODS.update(
    {
        f"{name}-res": {**METHODS[name], "reconstruction_target": "residual"}
        for name in (
            "taylor-global-recon-error",
            "obs-global-recon-error",
            "flap-adaptive-recon",
            "wanda_sp-recon",
            "taylor-global-recon",
            "magnitude-recon",
            "magnitude-global-recon",
        )
    }
)
# The same with 128 calibration windows of 128 tokens.
METHODS.update(
    {
        f"{name}-res-cal128": {**METHODS[f"{name}-res"], "num_calibration_samples": 128}
        for name in ("taylor-global-recon-error", "obs-global-recon-error")
    }
)
# Whatever `PrunerConfig(pruning_ratio=...)` does with no other argument (not pinned, see `method_kwargs`).
METHODS["default"] = {}
PEERS = ("torch-pruning",)
# LLM-Pruner's own code (a checkout + its own Transformers 4.45 venv): peer name -> its block_*_layer_start/end.
LLM_PRUNER_PEERS = {"llm-pruner": None, "llm-pruner-layers1-4": (1, 5)}


def method_kwargs(method: str) -> dict:
    """A method's `PrunerConfig` arguments. Every method but `default` is pinned to uniform allocation without
    reconstruction (refit to each consumer's own outputs) and to 32 calibration windows unless it names them, so that
    its rows mean what they did before those became defaults."""
    if method == "default":
        return {}
    pinned = {"global_ranking": False, "reconstruction": False, "reconstruction_target": "output"}
    return {**pinned, "num_calibration_samples": 32, **METHODS[method]}


def peak_rss_mib() -> float:
    """This process's own peak RSS. VmHWM belongs to the address space, so it starts afresh at exec; `ru_maxrss`
    would carry over the benchmark driver's peak from before the fork."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_path(name: str) -> Path:
    """A shared model, else one trained by a script in `benchmarks/` (`benchmarks/checkpoints/NAME`)."""
    for root in (MODELS, CHECKPOINTS):
        if (root / name / "config.json").exists():
            return root / name
    raise SystemExit(f"no model {name!r} in {MODELS} or {CHECKPOINTS} (see benchmarks/train_families.py)")


def experts_pruning_ratio(path: Path, fraction: float) -> tuple[float, int]:
    """The `pruning_ratio` (fraction of total parameters) that removes `round(fraction x experts)` experts from every
    MoE layer: their slices of the fused `gate_up_proj` / `down_proj` and their router rows. Returns it and the
    number of experts removed per layer."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    experts = [p for n, p in model.named_parameters() if n.endswith("mlp.experts.down_proj")]
    removed = round(fraction * experts[0].shape[0])
    per_expert = sum(
        p[0].numel()
        for n, p in model.named_parameters()
        if n.endswith(("mlp.gate.weight", "gate_up_proj", "down_proj"))
    )
    return round(removed * per_expert / sum(p.numel() for p in model.parameters()), 4), removed


def run_single(model_name: str, method: str, ratio: float) -> dict:
    """One pruning run in this process (called in a subprocess by `main`)."""
    import torch

    from optimum_prune import AutoPruner, PrunerConfig, count_parameters, perplexity

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    row = {"model": model_name, "method": method, "ratio": ratio}
    path = model_path(model_name)
    if method == "unpruned":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        row.update(parameters=count_parameters(model), perplexity=perplexity(model, EVAL, tokenizer), status="ok")
        return row
    pruning_ratio = ratio
    if method in EXPERT_METHODS:
        pruning_ratio, removed_experts = experts_pruning_ratio(path, ratio)
        row.update(pruning_ratio=pruning_ratio, experts_removed_per_layer=removed_experts)
    try:
        config = PrunerConfig(pruning_ratio=pruning_ratio, **method_kwargs(method))
    except (TypeError, ValueError) as err:
        return {**row, "status": "unsupported", "reason": str(err).splitlines()[0][:160]}
    pruner = AutoPruner.from_pretrained(path, pruner_config=config, dtype=torch.float32)
    rss_loaded = peak_rss_mib()
    start = time.perf_counter()
    try:
        model = pruner.prune(calibration_data=str(CALIBRATION))
    except ValueError as err:
        return {**row, "status": "failed", "reason": str(err).splitlines()[0][:160]}
    seconds = time.perf_counter() - start
    row.update(
        status="ok",
        seconds=round(seconds, 2),
        peak_rss_mib=round(peak_rss_mib(), 1),
        rss_loaded_mib=round(rss_loaded, 1),
        parameters=count_parameters(model),
        removed=round(1 - count_parameters(model) / pruner.params_before, 4),
        model_type=model.config.model_type,
        perplexity=perplexity(model, EVAL, pruner.tokenizer),
    )
    if method in EXPERT_METHODS:
        row["experts_kept"] = {key: len(kept) for key, kept in pruner.plan.kept.items() if key.startswith("experts.")}
    return row


def run_llm_pruner(model_name: str, peer: str, ratio: float, timeout: int, checkout, python) -> dict:
    """LLM-Pruner's Taylor block-wise recipe at the same fraction of total parameters, evaluated here with our
    `perplexity` on the same text; without a checkout and its interpreter the row says why it is missing."""
    row = {"model": model_name, "method": peer, "ratio": ratio}
    if not checkout or not python:
        reason = "needs --llm-pruner-checkout and --llm-pruner-python (or LLM_PRUNER_CHECKOUT / LLM_PRUNER_PYTHON)"
        return {**row, "status": "unavailable", "reason": reason}
    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    import llm_pruner_peer

    try:
        result = llm_pruner_peer.prune_with_llm_pruner(
            model_path(model_name),
            ratio,
            checkout=checkout,
            python=python,
            layers=LLM_PRUNER_PEERS[peer],
            calibration=CALIBRATION,
            eval_text=EVAL,
            timeout_s=timeout,
        )
    except FileNotFoundError as err:
        return {**row, "status": "unavailable", "reason": str(err)}
    row.update(
        status=result["status"],
        reason=result.get("reason", ""),
        seconds=result.get("seconds"),
        peak_rss_mib=result.get("peak_rss_mib"),
        removed=result.get("removed_fraction"),
        pruning_ratio=result.get("pruning_ratio"),
        within_tolerance=result.get("within_tolerance"),
        ppl_peer_env=result.get("ppl_peer_env"),
        ppl_unpruned_peer_env=result.get("ppl_unpruned_peer_env"),
        tool=result.get("tool"),
        adaptations=result.get("adaptations"),
        trials=len(result.get("trials") or []),
    )
    if result["status"] == "ok":
        from optimum_prune import perplexity

        model, tokenizer = llm_pruner_peer.load_pruned_model(result["output_dir"])
        row["perplexity"] = perplexity(model, EVAL, tokenizer)
        if not result.get("within_tolerance"):
            row["note"] = result.get("off_target") or result["reason"]
    return row


def run_peer(model_name: str, peer: str, ratio: float, timeout: int) -> dict:
    """Torch-Pruning on the same model and parameter target, in its own process under a timeout; failures are rows."""
    row = {"model": model_name, "method": peer, "ratio": ratio}
    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    try:
        import torch_pruning_peer
    except ImportError as err:
        return {**row, "status": "unavailable", "reason": str(err)}
    result = torch_pruning_peer.prune_with_torch_pruning(str(model_path(model_name)), ratio, timeout_s=timeout)
    row.update(
        status=result["status"],
        reason=result.get("reason", ""),
        seconds=round(result["seconds"], 2) if result.get("seconds") is not None else None,
        peak_rss_mib=result.get("peak_rss_mib"),
        removed=result.get("removed_fraction"),
    )
    if result["status"] == "ok":
        from optimum_prune import perplexity

        model, tokenizer = torch_pruning_peer.load_pruned_model(result["output_dir"])
        row["perplexity"] = perplexity(model, EVAL, tokenizer)
        row["save_format"] = result.get("save_format")
    return row


def subprocess_row(args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"status": "crashed", "reason": (result.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def format_rows(rows: list[dict]) -> str:
    from optimum_prune.evaluation import format_table

    base = {r["model"]: r["perplexity"] for r in rows if r["method"] == "unpruned" and r.get("status") == "ok"}
    table = []
    for r in rows:
        if r["method"] == "unpruned":
            continue
        ok = r.get("status") == "ok" and r.get("perplexity") is not None
        ppl = f"{r['perplexity']:.2f}" if ok else "-"
        ratio = f"x{r['perplexity'] / base[r['model']]:.2f}" if ok and r["model"] in base else r.get("status", "?")
        table.append(
            [
                r["model"],
                r["method"],
                f"{r['ratio']:.0%}",
                f"{r['removed']:.1%}" if r.get("removed") is not None else "-",
                ppl,
                ratio,
                r.get("seconds", "-"),
                r.get("peak_rss_mib", "-"),
                r.get("note", "")[:90] if ok else r.get("reason", "")[:90],
            ]
        )
    headers = ["model", "method", "target", "removed", "ppl", "vs unpruned", "prune s", "peak RSS MiB", "note"]
    return format_table(headers, table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-llama"])
    parser.add_argument("--methods", nargs="+", default=["random", "magnitude", "taylor"])
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--peer-timeout", type=int, default=300)
    parser.add_argument("--llm-pruner-checkout", default=os.environ.get("LLM_PRUNER_CHECKOUT"), help="LLM-Pruner tree")
    parser.add_argument(
        "--llm-pruner-python",
        default=os.environ.get("LLM_PRUNER_PYTHON"),
        help="its venv's python (transformers 4.45)",
    )
    parser.add_argument("--single", nargs=3, metavar=("MODEL", "METHOD", "RATIO"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.single:
        model, method, ratio = args.single
        print(json.dumps(run_single(model, method, float(ratio))))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        rows.append(
            {
                "model": model,
                "method": "unpruned",
                "ratio": 0.0,
                **subprocess_row(["--single", model, "unpruned", "0"]),
            }
        )
        for ratio in args.ratios:
            for method in args.methods:
                row = subprocess_row(["--single", model, method, str(ratio)])
                rows.append({"model": model, "method": method, "ratio": ratio, **row})
                print(json.dumps(rows[-1]), file=sys.stderr)
            for peer in args.peers:
                if peer in LLM_PRUNER_PEERS:
                    rows.append(
                        run_llm_pruner(
                            model, peer, ratio, args.peer_timeout, args.llm_pruner_checkout, args.llm_pruner_python
                        )
                    )
                else:
                    rows.append(run_peer(model, peer, ratio, args.peer_timeout))
                print(json.dumps(rows[-1]), file=sys.stderr)
    with open(RESULTS / "quality.jsonl", "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for model in args.models:
        base = next((r for r in rows if r["model"] == model and r["method"] == "unpruned"), {})
        if base.get("status") == "ok":
            print(f"{model}: unpruned perplexity {base['perplexity']:.2f}, {base['parameters']:,} parameters")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
