"""Speed benchmark: inference tokens/s of pruned models as ratios to the unpruned model, measured in one run.

One model (tiny-llama by default, or a random LLaMA built in memory with `--random-llama`, big enough that CPU
timings are not dominated by Python overhead) is copied and pruned to each ratio with the `magnitude` criterion
(needs no data; attention heads + MLP channels, uniform widths). Every model, the unpruned one included, is then
timed the same way in the same process, so the ratios compare like with like:

- prefill: one forward pass over `batch x seq` tokens with `logits_to_keep=1` (as `generate` runs its prefill),
  `torch.inference_mode`, warmup then the median of `--repeats` passes;
- decode, eager: `model.generate` at batch 1, greedy, `N` forced new tokens with the default dynamic cache. Decode
  tokens/s is `(N - 1) / (t(N) - t(1))`, so the prompt's prefill and the first token are not counted;
- decode, static (`--static`): the same with `cache_implementation="static"`. Transformers compiles that path by itself
  only on accelerators; on CPU it runs eagerly unless `--compile` is given, which asks for compilation on every device
  (slow to compile on CPU). A failure of these paths is recorded in the table, not raised.

BENCHMARKS.md ("Inference speed depends on the runtime") explains why the paths differ: eager decode at batch 1 is
bound by per-token overhead, so width pruning speeds it up little; prefill and the compiled static path show the gain.

Prints a Markdown table and appends JSON lines to `benchmarks/results/speed.jsonl`.

    python benchmarks/speed.py                                   # tiny-llama, float32, 20% and 50%
    python benchmarks/speed.py --random-llama medium --static    # random 1024-hidden, 8-layer LLaMA
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "tiny-llama"
RESULTS = ROOT / "benchmarks" / "results"

logger = logging.getLogger("speed")

# Random LLaMA shapes built in memory (no checkpoint on disk). "tiny" is for the smoke test only.
RANDOM_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=8000),
    "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PATHS = ("prefill", "decode_eager", "decode_static", "decode_compiled")
PATH_TITLES = {
    "prefill": "prefill",
    "decode_eager": "decode, eager `generate`",
    "decode_static": 'decode, `cache_implementation="static"`',
    "decode_compiled": "decode, static + compiled",
}


def load_model(args) -> torch.nn.Module:
    """The unpruned model: a checkpoint from `--model`, or a random LLaMA of shape `RANDOM_SIZES[--random-llama]`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = DTYPES[args.dtype]
    if args.random_llama:
        torch.manual_seed(0)
        config = LlamaConfig(
            **RANDOM_SIZES[args.random_llama],
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = LlamaForCausalLM(config).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return model.eval()


def prune_copy(model: torch.nn.Module, ratio: float, round_to: int = 1) -> torch.nn.Module:
    """A pruned deep copy (the unpruned model stays intact for its own timings). `round_to` rounds MLP widths: odd
    widths (e.g. 2162) can make CPU matmuls as slow as the unpruned width, hiding the gain."""
    from optimum_prune import AutoPruner, PrunerConfig

    config = PrunerConfig(pruning_ratio=ratio, importance="magnitude", round_to=round_to)
    pruner = AutoPruner.from_model(copy.deepcopy(model), config)
    return pruner.prune().eval()


def _median_time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def prefill_tokens_per_second(model, args, vocab_size: int) -> float:
    """`batch x seq` tokens over the median time of one forward pass (last-position logits only, like `generate`)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (args.batch, args.seq), generator=generator)  # [batch, seq]
    seconds = _median_time(lambda: model(input_ids, use_cache=False, logits_to_keep=1), args.warmup, args.repeats)
    return args.batch * args.seq / seconds


@torch.inference_mode()
def decode_tokens_per_second(model, args, vocab_size: int, **generate_kwargs) -> float:
    """`(N - 1) / (t(N) - t(1))` at batch 1: the difference removes the prompt's prefill and the first token."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (1, args.prompt_len), generator=generator)  # [1, prompt_len]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def run(n: int):
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
            **generate_kwargs,
        )
        if output.shape[1] != args.prompt_len + n:
            raise RuntimeError(f"generate returned {output.shape[1] - args.prompt_len} new tokens, expected {n}")

    n = args.new_tokens
    t_n = _median_time(lambda: run(n), args.warmup, args.repeats)
    t_1 = _median_time(lambda: run(1), args.warmup, args.repeats)
    if t_n <= t_1:
        raise RuntimeError(f"t({n})={t_n:.4f}s is not above t(1)={t_1:.4f}s: too few new tokens to time decode")
    return (n - 1) / (t_n - t_1)


def measure(model, args, vocab_size: int) -> dict:
    """Tokens/s on every requested path; a path that fails gives its error message instead of a number."""
    from transformers import CompileConfig

    paths = {
        "prefill": lambda: prefill_tokens_per_second(model, args, vocab_size),
        "decode_eager": lambda: decode_tokens_per_second(model, args, vocab_size),
    }
    if args.static:
        paths["decode_static"] = lambda: decode_tokens_per_second(
            model, args, vocab_size, cache_implementation="static"
        )
    if args.compile:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless this is set

        paths["decode_compiled"] = lambda: decode_tokens_per_second(
            model, args, vocab_size, cache_implementation="static", compile_config=compile_config
        )
    results = {}
    for name, fn in paths.items():
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as error:  # recorded as a row, the other paths still run
            logger.warning("%s failed: %s: %s", name, type(error).__name__, error)
            results[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        logger.info("  %s: %s (%.1fs)", name, results[name], time.perf_counter() - start)
    return results


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per ratio, tokens/s per path with its ratio to the unpruned row."""
    paths = [p for p in PATHS if any(p in row["speed"] for row in rows)]
    header = ["removed (asked)", "params", *[PATH_TITLES[p] + " tok/s" for p in paths]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    base = rows[0]["speed"]
    for row in rows:
        cells = [f"{row['ratio']:.0%}", f"{row['params'] / 1e6:.2f}M ({row['params_removed']:.1%} removed)"]
        for path in paths:
            value, reference = row["speed"].get(path), base.get(path)
            if isinstance(value, float):
                ratio = f" (x{value / reference:.2f})" if isinstance(reference, float) and row is not rows[0] else ""
                cells.append(f"{value:,.0f}{ratio}" if value >= 100 else f"{value:.1f}{ratio}")
            else:
                cells.append(str(value) if value is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL), help="Checkpoint to load (ignored with --random-llama).")
    parser.add_argument("--random-llama", choices=sorted(RANDOM_SIZES), help="Random in-memory LLaMA of this shape.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5], help="Pruning ratios to time.")
    parser.add_argument("--round-to", type=int, default=1, help="PrunerConfig.round_to (MLP width multiple).")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads.")
    parser.add_argument("--batch", type=int, default=4, help="Prefill batch size.")
    parser.add_argument("--seq", type=int, default=256, help="Prefill sequence length.")
    parser.add_argument("--prompt-len", type=int, default=32, help="Decode prompt length (batch 1).")
    parser.add_argument("--new-tokens", type=int, default=64, help="Decode: forced new tokens per generate call.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats; the median is kept.")
    parser.add_argument("--static", action="store_true", help='Also time cache_implementation="static".')
    parser.add_argument("--compile", action="store_true", help="Also time static + torch.compile (slow on CPU).")
    parser.add_argument("--results", default=str(RESULTS / "speed.jsonl"), help="JSON lines file ('' for none).")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Runs the benchmark; returns one dict per model (unpruned first) and prints the Markdown table."""
    from optimum_prune.evaluation import count_parameters

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args)
    vocab_size = model.config.vocab_size
    params_base = count_parameters(model)
    name = f"random-llama-{args.random_llama}" if args.random_llama else Path(args.model).name
    logger.info("%s: %.2fM parameters, %s, %d threads", name, params_base / 1e6, args.dtype, args.threads)

    rows = []
    for ratio in [0.0, *args.ratios]:
        pruned = model if ratio == 0 else prune_copy(model, ratio, args.round_to)
        params = count_parameters(pruned)
        logger.info("ratio %.0f%%: %.2fM parameters (%s)", ratio * 100, params / 1e6, type(pruned).__name__)
        rows.append(
            {
                "model": name,
                "ratio": ratio,
                "params": params,
                "params_removed": 1 - params / params_base,
                "model_class": type(pruned).__name__,
                "speed": measure(pruned, args, vocab_size),
            }
        )
        if pruned is not model:
            del pruned

    settings = (
        f"{name}, {args.dtype}, magnitude, round_to={args.round_to}, {args.threads} threads, torch {torch.__version__}; prefill {args.batch} x {args.seq} "
        f"tokens; decode batch 1, {args.prompt_len}-token prompt, {args.new_tokens} new tokens; "
        f"median of {args.repeats} after {args.warmup} warmup"
    )
    print(settings)
    print(format_table(rows))
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for row in rows:
                f.write(json.dumps({**row, "settings": settings}) + "\n")
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
