"""llama.cpp speed of pruned models: prompt processing and generation tokens/s, dense and pruned to 20% / 50% (uniform
widths, and per-layer widths by global ranking, which run as llama.cpp's `deci`), as ratios to the dense model.

The model is tiny-llama, or with `--random-llama HIDDEN LAYERS` a random LLaMA of that size made here (head_dim 64,
KV groups of 2 heads, MLP 2.75 x hidden, tiny-llama's tokenizer), big enough that matrix products, not per-call
overhead, dominate. Each model is pruned with the `magnitude` criterion (attention heads + MLP channels), exported with
`export_gguf` (f32 by default) and timed by llama-cpp-python in .venv-gguf (`make install-gguf`):

- prompt processing: one `eval` of `--prompt-tokens` ids in one batch, on a fresh context;
- generation: `--gen-tokens` single-token `eval` calls after the prompt;

after one untimed warm-up of both. Each of `--repeats` rounds times every model once, each in a fresh process with
`OMP_NUM_THREADS` and llama.cpp's threads set to `--threads` and (with `--cpus`) its CPU affinity pinned, so slow
drift of a shared machine hits all models alike. Prints a Markdown table of medians with the spread (min-max over the
rounds, as a percentage of the median): a ratio whose models' spreads overlap it is noise.

    make install-gguf
    python benchmarks/llama_cpp_speed.py --threads 1 --cpus 1 --repeats 5 --random-llama 1024 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_prune import AutoPruner, PrunerConfig
from optimum_prune.export import export_gguf


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LLAMA = os.path.join(ROOT, "examples", "tiny-llama")

# Run in .venv-gguf: prints {"pp": tokens/s, "tg": tokens/s} of one timed run after a warm-up.
TIMER = textwrap.dedent("""
    import json, sys, time
    from llama_cpp import Llama
    path, prompt, gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = Llama(model_path=path, n_ctx=prompt + gen + 8, n_batch=prompt, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    ids = [(i * 37) % 4000 + 10 for i in range(prompt)]

    def run():
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        pp = prompt / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(gen):
            llm.eval([ids[i]])
        return pp, gen / (time.perf_counter() - start)

    run()
    pp, tg = run()
    print(json.dumps({"pp": pp, "tg": tg}))
""")


def _random_llama(hidden: int, layers: int, out: str) -> str:
    """A random float32 LLaMA of the given size with tiny-llama's tokenizer (4096 tokens)."""
    torch.manual_seed(0)
    heads = hidden // 64
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TINY_LLAMA, name), os.path.join(out, name))
    return out


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
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cpus = {int(cpu) for cpu in args.cpus.split(",")} if args.cpus else None
    result = subprocess.run(
        [python, "-c", TIMER, gguf_path, str(args.prompt_tokens), str(args.gen_tokens), str(args.threads)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> tuple[float, float]:
    """Median and spread (max - min as a fraction of the median)."""
    median = statistics.median(values)
    return median, (max(values) - min(values)) / median


def _print_table(rows, args) -> None:
    dense = {key: _summary(rows[0][2][key])[0] for key in ("pp", "tg")}
    print(
        f"| model | pruned | params | prompt tok/s (spread) | x dense | generation tok/s (spread) | x dense |  "
        f"({args.outtype}, {args.threads} thread(s), {args.repeats} rounds, medians)"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, ratio, speeds, params in rows:
        cells = []
        for key in ("pp", "tg"):
            median, spread = _summary(speeds[key])
            cells.append(f"{median:.0f} ({spread:.0%}) | x{median / dense[key]:.2f}")
        print(f"| {name} | {ratio} | {params / 1e6:.1f}M | {cells[0]} | {cells[1]} |")


def _parameters(model_dir: str) -> int:
    """Parameters in the checkpoint's safetensors shards (read from their headers)."""
    total = 0
    for file in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
        with safe_open(os.path.join(model_dir, file), framework="pt") as shard:
            total += sum(math.prod(shard.get_slice(name).get_shape()) for name in shard.keys())
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY_LLAMA)
    parser.add_argument("--random-llama", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpus", default="", help="CPU ids to pin llama.cpp to, e.g. '1' (default: not pinned).")
    parser.add_argument(
        "--python",
        default=os.path.join(ROOT, ".venv-gguf", "bin", "python"),
        help="A Python with llama-cpp-python (make install-gguf).",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", os.path.join(ROOT, ".venv-gguf", "build", "bin"))
    with tempfile.TemporaryDirectory() as tmp:
        base = _random_llama(*args.random_llama, os.path.join(tmp, "base")) if args.random_llama else args.model
        models = [("dense", "-", base)]
        for ratio in args.ratios:
            for name, global_ranking in (("uniform", False), ("per-layer (global)", True)):
                out = os.path.join(tmp, f"{ratio}-{global_ranking}")
                models.append((name, f"{ratio:.0%}", _pruned(base, ratio, global_ranking, out)))
        paths = [
            str(export_gguf(model_dir, os.path.join(tmp, f"{i}.gguf"), outtype=args.outtype))
            for i, (_, _, model_dir) in enumerate(models)
        ]
        speeds = [{"pp": [], "tg": []} for _ in paths]
        for _ in range(args.repeats):
            for measured, path in zip(speeds, paths):
                for key, value in _time(args.python, path, args).items():
                    measured[key].append(value)
        rows = [(name, ratio, s, _parameters(d)) for (name, ratio, d), s in zip(models, speeds)]
    _print_table(rows, args)


if __name__ == "__main__":
    sys.exit(main())
