"""llama.cpp speed of pruned models: prompt processing and generation tokens/s of tiny-llama, dense and pruned to 20% /
50% (uniform widths, and per-layer widths by global ranking), as ratios to the dense model measured in the same run.

Each model is pruned with the `magnitude` criterion (attention heads + MLP channels), exported with `export_gguf`
(f32 by default) and timed by llama-cpp-python in .venv-gguf (`make install-gguf`), one model at a time:

- prompt processing: `eval` of `--prompt-tokens` ids in one batch, fresh context each repeat;
- generation: `--gen-tokens` single-token `eval` calls after the prompt;

best of `--repeats` rounds; each round times every model once (a fresh process each), so slow drift of a shared
machine hits all models alike. Prints a Markdown table.

    make install-gguf
    LLAMA_CPP_LIB_PATH=$PWD/.venv-gguf/build/bin python benchmarks/llama_cpp_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import torch

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.export import export_gguf


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in .venv-gguf: prints {"pp": tokens/s, "tg": tokens/s}.
TIMER = textwrap.dedent("""
    import json, sys, time
    from llama_cpp import Llama
    path, prompt, gen, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    llm = Llama(model_path=path, n_ctx=prompt + gen + 8, n_batch=prompt, n_threads=threads, verbose=False)
    ids = [(i * 37) % 4000 + 10 for i in range(prompt)]
    best_pp = best_tg = 0.0
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        best_pp = max(best_pp, prompt / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(gen):
            llm.eval([ids[i]])
        best_tg = max(best_tg, gen / (time.perf_counter() - start))
    print(json.dumps({"pp": best_pp, "tg": best_tg}))
""")


def _pruned(model_dir: str, ratio: float, global_ranking: bool, out: str) -> str:
    config = PrunerConfig(
        pruning_ratio=ratio,
        importance="magnitude",
        structures=["attention_heads", "mlp_channels"],
        global_ranking=global_ranking,
    )
    pruner = AutoPruner.from_pretrained(model_dir, pruner_config=config, dtype=torch.float32)
    pruner.prune(calibration_data=os.path.join(ROOT, "examples", "data", "calibration.txt"))
    pruner.save_pretrained(out)
    return out


def _time(python: str, gguf_path: str, args) -> dict:
    result = subprocess.run(
        [
            python,
            "-c",
            TIMER,
            gguf_path,
            str(args.prompt_tokens),
            str(args.gen_tokens),
            str(args.repeats),
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "examples", "tiny-llama"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--python",
        default=os.path.join(ROOT, ".venv-gguf", "bin", "python"),
        help="A Python with llama-cpp-python (make install-gguf).",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", os.path.join(ROOT, ".venv-gguf", "build", "bin"))
    with tempfile.TemporaryDirectory() as tmp:
        models = [("dense", "-", args.model)]
        for ratio in args.ratios:
            for name, global_ranking in (("uniform", False), ("per-layer (global)", True)):
                out = os.path.join(tmp, f"{ratio}-{global_ranking}")
                models.append((name, f"{ratio:.0%}", _pruned(args.model, ratio, global_ranking, out)))
        paths = [
            str(export_gguf(model_dir, os.path.join(tmp, f"{i}.gguf"), outtype=args.outtype))
            for i, (_, _, model_dir) in enumerate(models)
        ]
        best = [{"pp": 0.0, "tg": 0.0} for _ in paths]
        for _ in range(args.repeats):
            for speeds, path in zip(best, paths):
                measured = _time(args.python, path, args)
                for key in speeds:
                    speeds[key] = max(speeds[key], measured[key])
        rows = [(name, ratio, speeds) for (name, ratio, _), speeds in zip(models, best)]
    dense = rows[0][2]
    print(
        f"| model | pruned | prompt tok/s | x dense | generation tok/s | x dense |  ({args.outtype}, "
        f"{args.threads} threads)"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, ratio, speed in rows:
        print(
            f"| {name} | {ratio} | {speed['pp']:.0f} | x{speed['pp'] / dense['pp']:.2f} | {speed['tg']:.0f} | "
            f"x{speed['tg'] / dense['tg']:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
