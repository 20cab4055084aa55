"""FLAP's own code beside ours on a multi-head model: FLAP UL-UM, FLAP AL-AM and FLAP's Wanda-SP, each against our
`flap` / `wanda_sp` with the same settings, on the same calibration windows, evaluated with our `perplexity`.

    python benchmarks/train_multihead.py --init-from-gqa --steps 0      # the model (git-ignored checkpoints/)
    FLAP_CHECKOUT=/path/to/FLAP python benchmarks/flap_peers.py --ratios 0.2 0.4 --samples 32

For each setting: FLAP's run at its own per-layer ratio closest to the target fraction of *total* parameters, its
masks as a plan applied with our surgery (checked against FLAP's own pruned model), ours with our own allocation at
the fraction FLAP removed, and ours with FLAP's widths (the criterion alone: how many kept units differ). Rows are
appended to `benchmarks/results/flap_peers.jsonl` as they finish. The FLAP checkout is fetched, never committed
(`benchmarks/peers/flap_peer.py` lists the edits it applies).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CALIBRATION = SHARED / "data" / "corpus" / "calibration.txt"
EVAL = SHARED / "data" / "corpus" / "eval.txt"
RESULTS = ROOT / "benchmarks" / "results"
logger = logging.getLogger("flap_peers")
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

# Setting -> (FLAP method, FLAP structure, our PrunerConfig keyword arguments).
SETTINGS: dict[str, tuple[str, str, dict]] = {
    "flap-UL-UM": ("flap", "UL-UM", {"importance": "flap", "bias_compensation": True}),
    "flap-AL-AM": ("flap", "AL-AM", {"importance": "flap", "allocation": "flap", "bias_compensation": True}),
    "wanda_sp": ("wanda_sp", "UL-UM", {"importance": "wanda_sp", "bias_compensation": False}),
    # FLAP's code removes int(r x heads) per layer: our uniform allocation with its head rounding.
    "flap-UL-UM-up": ("flap", "UL-UM", {"importance": "flap", "bias_compensation": True, "head_rounding": "up"}),
    "wanda_sp-up": (
        "wanda_sp",
        "UL-UM",
        {"importance": "wanda_sp", "bias_compensation": False, "head_rounding": "up"},
    ),
}


def widths(plan, key: str) -> int:
    """Kept units of one group set; a plan leaves out the group sets it does not prune."""
    return len(plan.kept[key]) if key in plan.kept else plan.unit_counts.get(key, -1)


def row_peer(row: dict) -> tuple[float, float]:
    return row["peer_ppl"], row["peer_removed"]


def ours_plans(model_dir, config, peer_plan):
    """Our plan with our own allocation, and our plan with the peer's kept counts, from one statistics pass."""
    from optimum_prune import AutoPruner

    pruner = AutoPruner.from_pretrained(str(model_dir), pruner_config=config, dtype=torch.float32)
    importance = config.build_importance()
    batches = pruner._calibration_batches(importance, str(CALIBRATION))
    planner = pruner.planner
    all_group_sets = planner.group_sets()
    group_sets = planner.prunable(all_group_sets)
    means = {} if config.bias_compensation else None
    scores = pruner._score(importance, group_sets, batches, means)
    own = planner.plan(all_group_sets, group_sets, scores, planner.kept_counts(group_sets, scores), (), means)
    peer_counts = {key: len(kept) for key, kept in peer_plan.kept.items()}
    same_widths = planner.plan(all_group_sets, group_sets, scores, peer_counts, (), means)
    return own, same_widths


def differing_units(a, b) -> int:
    """Units kept by one plan and not the other, over every group set."""
    return sum(len(set(a.kept.get(k, [])) ^ set(b.kept.get(k, []))) for k in set(a.kept) | set(b.kept))


def plan_matches_peer_model(model_dir, plan, peer_model, ids: torch.Tensor) -> float:
    """Largest logit difference between FLAP's own pruned model and our surgery applying its plan."""
    from transformers import AutoModelForCausalLM

    ours = plan.apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    with torch.no_grad():
        return float((ours(ids).logits - peer_model(ids).logits).abs().max())


def evaluate(model_dir, plan, tokenizer, total: int) -> tuple[float, float]:
    """(perplexity on eval.txt, removed fraction of total parameters) of the original model pruned by `plan`."""
    from transformers import AutoModelForCausalLM

    from optimum_prune import count_parameters, perplexity

    model = plan.apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    return perplexity(model, str(EVAL), tokenizer), 1 - count_parameters(model) / total


def run_setting(checkout, model_dir, setting: str, target: float, samples: int, seq_len: int) -> dict:
    import flap_peer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune import PrunerConfig, count_parameters
    from optimum_prune.calibration import prepare_calibration

    method, structure, ours_kwargs = SETTINGS[setting]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total = count_parameters(base)
    ratio_of = flap_peer.adaptive_ratio if structure == "AL-AM" else flap_peer.uniform_ratio
    flap_ratio = ratio_of(base.config, target, total)
    ids = prepare_calibration(str(CALIBRATION), tokenizer, samples, seq_len)
    start = time.perf_counter()
    flap_model, records = flap_peer.run_flap(
        checkout, model_dir, ids, method=method, pruning_ratio=flap_ratio, structure=structure
    )
    row = {"setting": setting, "target": target, "samples": samples, "seq_len": seq_len, "flap_ratio": flap_ratio}
    row["peer_seconds"] = round(time.perf_counter() - start, 1)
    peer_plan = flap_peer.records_to_plan(records, base.config)
    row["peer_ppl"], row["peer_removed"] = evaluate(model_dir, peer_plan, tokenizer, total)
    logger.warning("%s %.0f%%: FLAP's plan perplexity %.3f, removed %.4f", setting, target * 100, *row_peer(row))
    row["plan_vs_peer_model_max_logit_diff"] = plan_matches_peer_model(model_dir, peer_plan, flap_model, ids[:2])
    del flap_model
    config = PrunerConfig(
        pruning_ratio=round(row["peer_removed"], 4),
        num_calibration_samples=samples,
        calibration_seq_len=seq_len,
        **{"reconstruction": False, **ours_kwargs},
    )
    own, same_widths = ours_plans(model_dir, config, peer_plan)
    logger.warning(
        "%s: ours keeps %s, FLAP %s",
        setting,
        own.unit_counts and {k: len(v) for k, v in own.kept.items()},
        {k: len(v) for k, v in peer_plan.kept.items()},
    )
    row["ours_ppl"], row["ours_removed"] = evaluate(model_dir, own, tokenizer, total)
    logger.warning("%s: our perplexity %.3f, removed %.4f", setting, row["ours_ppl"], row["ours_removed"])
    row["ours_same_widths_ppl"], _ = evaluate(model_dir, same_widths, tokenizer, total)
    row["units_differing_same_widths"] = differing_units(peer_plan, same_widths)
    row["units_differing_own_allocation"] = differing_units(peer_plan, own)
    row["peer_heads"] = [len(peer_plan.kept[f"attention_heads.{i}"]) for i in range(base.config.num_hidden_layers)]
    row["ours_heads"] = [widths(own, f"attention_heads.{i}") for i in range(base.config.num_hidden_layers)]
    row["peer_channels"] = [len(peer_plan.kept[f"mlp_channels.{i}"]) for i in range(base.config.num_hidden_layers)]
    row["ours_channels"] = [widths(own, f"mlp_channels.{i}") for i in range(base.config.num_hidden_layers)]
    row["peer_plan"] = peer_plan.to_dict() if setting != "wanda_sp" else None
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "benchmarks" / "checkpoints" / "tiny-llama-mha"))
    parser.add_argument("--flap-checkout", default=os.environ.get("FLAP_CHECKOUT"), help="FLAP work tree or git dir")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (FLAP's scripts: 1024)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--base-ppl", type=float, default=None, help="unpruned perplexity, when already measured")
    parser.add_argument("--output", default=str(RESULTS / "flap_peers.jsonl"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.flap_checkout:
        raise SystemExit("flap_peers.py: error: needs --flap-checkout (or FLAP_CHECKOUT): a FLAP work tree or git dir")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune import perplexity

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base_ppl = args.base_ppl or perplexity(
        AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), str(EVAL), tokenizer
    )
    print(f"{args.model}: unpruned perplexity {base_ppl:.3f}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    for target in args.ratios:
        for setting in args.settings:
            try:
                row = run_setting(args.flap_checkout, args.model, setting, target, args.samples, args.seq_len)
            except ValueError as err:  # e.g. FLAP's adaptive threshold leaving a layer without heads
                print(f"{setting} {target:.0%}: failed: {err}", flush=True)
                continue
            row.update(model=args.model, base_ppl=base_ppl)
            for key in ("peer_ppl", "ours_ppl", "ours_same_widths_ppl"):
                row[key.replace("ppl", "ratio")] = row[key] / base_ppl
            with open(args.output, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{setting} {target:.0%}: FLAP x{row['peer_ratio']:.3f} (removed {row['peer_removed']:.1%}), ours "
                f"x{row['ours_ratio']:.3f} ({row['ours_removed']:.1%}), ours with FLAP's widths "
                f"x{row['ours_same_widths_ratio']:.3f}, {row['units_differing_same_widths']} units differ",
                flush=True,
            )


if __name__ == "__main__":
    main()
