"""Choosing the defaults by measurement: every candidate configuration on every model at 20%, 40% and 50%, each as a
ratio to the best row of its (model, target), and the candidate with the best worst case.

    python benchmarks/defaults.py                                       # the shared models, the multi-head variant
    python benchmarks/defaults.py --models tiny-llama tiny-qwen3 --candidates taylor-global-recon default
    python benchmarks/defaults.py --report-only                         # the table from the rows already measured

Each run goes through `benchmarks/quality.py` (its own subprocess, 32 x 128 calibration tokens from `calibration.txt`
unless a method says otherwise; `default`: the library default, 128 x 128),
perplexity on `eval.txt`, float32 on CPU). Rows are appended to `benchmarks/results/defaults.jsonl` and a run that is
already there is not repeated (delete the file to measure afresh). Models are the shared ones, then
`benchmarks/checkpoints/` (`train_multihead.py`, `train_families.py`); a model that is missing is skipped with a line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import METHODS, RESULTS, model_path, subprocess_row  # noqa: E402


MODELS = ("tiny-llama", "tiny-opt", "tiny-bloom", "tiny-glm", "tiny-llama-mha", "tiny-qwen3", "tiny-gemma3")
CANDIDATES = (  # in the order they run
    "obs-global-recon-error",
    "taylor-global-recon-error",
    "taylor-global-recon",
    "flap-adaptive-recon",
    "wanda_sp-recon",
    "taylor-global",
    "taylor",
    "bip-global-recon",
    "flap-adaptive",
    "taylor-global-recon-cal128",
)
RATIOS = (0.2, 0.4, 0.5)
LOG = RESULTS / "defaults.jsonl"


def load_rows() -> dict[tuple, dict]:
    """Rows measured so far, by (model, method, ratio); the last measurement of a run wins."""
    rows = {}
    if LOG.exists():
        for line in LOG.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            rows[(row["model"], row["method"], row["ratio"])] = row
    return rows


def measure(models, candidates, ratios) -> dict[tuple, dict]:
    """Runs what is not measured yet, candidate by candidate (so that an interrupted sweep has the first candidates on
    every model), the unpruned models first; each row is appended as it comes."""
    rows = load_rows()
    RESULTS.mkdir(parents=True, exist_ok=True)
    present = []
    for model in models:
        try:
            model_path(model)
            present.append(model)
        except SystemExit as missing:
            print(f"skipped: {missing}", file=sys.stderr)
    runs = [(model, "unpruned", 0.0) for model in present]
    runs += [(model, method, ratio) for method in candidates for model in present for ratio in ratios]
    for key in runs:
        if key in rows:
            continue
        model, method, ratio = key
        row = {"model": model, "method": method, "ratio": ratio}
        row.update(subprocess_row(["--single", model, method, str(ratio)]))
        rows[key] = row
        with open(LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr)
    return rows


def ratios_to_best(rows, models, candidates, ratios) -> dict[str, dict[tuple, float]]:
    """candidate -> {(model, target): perplexity / best perplexity of that (model, target)}; a failed run is inf."""
    table = {method: {} for method in candidates}
    for model in models:
        for ratio in ratios:
            ppl = {m: rows.get((model, m, ratio), {}).get("perplexity") for m in candidates}
            measured = [p for p in ppl.values() if p is not None]
            if not measured:
                continue
            best = min(measured)
            for method, value in ppl.items():
                table[method][(model, ratio)] = value / best if value is not None else math.inf
    return table


def report(rows, models, candidates, ratios) -> str:
    """A Markdown table: one row per (model, target) with each candidate's ratio to unpruned (the best in bold), then
    each candidate's worst ratio to the best row and its rank by that worst case (a missing run counts as inf)."""
    relative = ratios_to_best(rows, models, candidates, ratios)
    worst = {m: max(relative[m].values(), default=math.inf) for m in candidates}
    order = sorted(candidates, key=lambda m: worst[m])
    cells = [(model, ratio) for model in models for ratio in ratios if (model, ratio) in relative[order[0]]]
    lines = ["| model, target | " + " | ".join(order) + " |", "|" + " --- |" * (len(order) + 1)]
    for model, ratio in cells:
        base = rows.get((model, "unpruned", 0.0), {}).get("perplexity")
        values = []
        for method in order:
            ppl = rows.get((model, method, ratio), {}).get("perplexity")
            if ppl is None or base is None:
                values.append(rows.get((model, method, ratio), {}).get("status", "-"))
                continue
            mark = "**" if relative[method][(model, ratio)] == 1.0 else ""
            values.append(f"{mark}x{ppl / base:.2f}{mark}")
        lines.append(f"| {model}, {ratio:.0%} | " + " | ".join(values) + " |")
    lines.append("| worst ratio to the best row | " + " | ".join(f"{worst[m]:.3f}" for m in order) + " |")
    lines.append("| rank | " + " | ".join(str(i + 1) for i in range(len(order))) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=sorted(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--report-only", action="store_true", help="print the table from the rows already measured")
    args = parser.parse_args(argv)
    rows = load_rows() if args.report_only else measure(args.models, args.candidates, args.ratios)
    print(report(rows, args.models, args.candidates, args.ratios))


if __name__ == "__main__":
    main()
