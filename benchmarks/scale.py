"""Scale benchmark: peak memory and time of streaming (layer-by-layer) pruning against the in-memory path.

Random LLaMA-architecture checkpoints are written to disk in bfloat16, in shards, one tensor at a time (so even the
largest one is built without holding it in memory), under `benchmarks/checkpoints/` (gitignored). Every run prunes 20%
of the parameters (attention heads + MLP channels) and saves the result, in a subprocess of its own, which reports its
peak resident memory (`resource.getrusage`, `ru_maxrss`) and wall time. A `baseline` run only imports the packages:
what the Python/PyTorch/Transformers runtime costs before any tensor.

Prints a Markdown table and appends JSON lines to `benchmarks/results/scale.jsonl`.

    python benchmarks/scale.py                              # 0.5b and 1b, wanda_sp and bip, streaming and in-memory
    python benchmarks/scale.py --sizes 0.5b 0.5b-32l 3b --modes streaming --criteria wanda_sp
    python benchmarks/scale.py --sizes 0.5b --modes streaming --criteria flap --allocation flap   # two passes
    python benchmarks/scale.py --sizes 0.5b --modes streaming --criteria wanda_sp --compute-dtype float32 bfloat16
    python benchmarks/scale.py --sizes 0.5b --criteria wanda_sp --allocation global --reconstruction off on

`--compute-dtype` runs each configuration once per compute dtype (`PrunerConfig.compute_dtype`; the checkpoints are
bfloat16): on CPUs without native bfloat16, `float32` against `bfloat16` shows what computing layer by layer in float32
saves. The table is headed by `torch.backends.cpu.get_cpu_capability()` and the native half types.

`--reconstruction off on error` runs each configuration without and with layer-wise reconstruction
(`PrunerConfig.reconstruction`) of the criterion's units, and with units chosen by refit error
(`reconstruction_selection="error"`), so its time and memory are a ratio within one run; `error-output` fits that
refit to each consumer's own outputs instead of the residual stream (`reconstruction_target="output"`). Streaming
refits only with the two-pass allocations (`--allocation global` or `flap`); uniform streaming with reconstruction is
reported as refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "benchmarks" / "checkpoints"
RESULTS = ROOT / "benchmarks" / "results"

_LLAMA = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
# LLaMA-architecture shapes. "1b" is TinyLlama-1.1B's; "3b" is OpenLLaMA-3B's; the "-Nl" variants change only the
# depth, to show that streaming memory follows the layer size, not the number of layers.
SIZES: dict[str, dict] = {
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4),
    "0.5b-8l": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=12,
                    num_key_value_heads=4),
    "0.5b-32l": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=32, num_attention_heads=12,
                     num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32),
}  # fmt: skip
MODES = ("streaming", "in-memory")
ALLOCATIONS = {  # pinned, so that the rows keep their meaning under the criterion-dependent defaults
    "uniform": {"global_ranking": False},
    "global": {"global_ranking": True, "global_normalization": "mean"},
    "flap": {"allocation": "flap"},
}
CRITERIA = ("wanda_sp", "bip")
# Criterion names with a variant: name -> (importance, importance_kwargs).
VARIANTS = {"mini_llm-block": ("mini_llm", {"loss": "block"})}


def build_checkpoint(name: str, path: Path) -> Path:
    """A random bfloat16 LLaMA checkpoint of shape `SIZES[name]`, written tensor by tensor in 1 GB shards."""
    import torch
    from transformers import LlamaConfig

    from optimum_prune.streaming import ShardWriter, build_skeleton

    if (path / "config.json").is_file():
        return path
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
    config = LlamaConfig(**_LLAMA, **SIZES[name])
    skeleton = build_skeleton(config, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in skeleton.state_dict().items()}
    writer = ShardWriter(tmp, layout, "1GB")
    for tensor_name, meta in skeleton.state_dict().items():
        if tensor_name.endswith("norm.weight"):
            value = 1 + 0.1 * torch.randn(meta.shape, generator=generator)
        else:
            value = torch.randn(meta.shape, generator=generator) * 0.02
        writer.add(tensor_name, value.to(torch.bfloat16))
    writer.close()
    config.dtype = torch.bfloat16
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: `VmHWM`, because `getrusage`'s `ru_maxrss` carries the peak of the
    process image before `exec` (the parent's, at fork time) over into the child; elsewhere `ru_maxrss`."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child(args) -> None:
    """One run: prune and save; prints one JSON line with its peak RSS and wall time."""
    start = time.perf_counter()
    import torch

    from optimum_prune import AutoPruner, PrunerConfig
    from optimum_prune.streaming import prune_streaming

    torch.set_num_threads(args.threads)
    mode = args.mode if args.allocation == "uniform" or args.mode == "baseline" else f"{args.mode}, {args.allocation}"
    result = {"size": args.size, "mode": mode, "criterion": args.criterion, "allocation": args.allocation}
    result["compute_dtype"] = args.compute_dtype
    result["reconstruction"] = args.reconstruction != "off"
    result["selection"] = "error" if args.reconstruction.startswith("error") else "criterion"
    result["target"] = "output" if args.reconstruction.endswith("output") else "residual"
    if args.mode != "baseline":
        calibration = torch.randint(0, 32000, (args.samples * args.seq_len * 2,), generator=torch.Generator())
        importance, importance_kwargs = VARIANTS.get(args.criterion, (args.criterion, {}))
        config = PrunerConfig(
            pruning_ratio=0.2,
            importance=importance,
            importance_kwargs=importance_kwargs,
            num_calibration_samples=args.samples,
            calibration_seq_len=args.seq_len,
            streaming=args.mode == "streaming",
            compute_dtype=args.compute_dtype,
            reconstruction=args.reconstruction != "off",
            reconstruction_selection=result["selection"],
            reconstruction_target=result["target"],
            **ALLOCATIONS[args.allocation],
        )
        with tempfile.TemporaryDirectory(dir=CHECKPOINTS) as out:
            if args.mode == "streaming":
                report = prune_streaming(args.model, config, calibration, Path(out) / "pruned")
                result["estimated_peak_gib"] = report["estimated_peak_bytes"]["peak"] / 2**30
                result["params_after"] = report["params_after"]
            else:
                pruner = AutoPruner.from_pretrained(args.model, pruner_config=config, dtype=torch.bfloat16)
                pruner.prune(calibration_data=calibration)
                pruner.save_pretrained(Path(out) / "pruned")
                result["params_after"] = pruner.params_after
    result["wall_s"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to other load on the machine
    result["peak_rss_gib"] = peak_rss_bytes() / 2**30
    print(json.dumps(result))


def _run_child(size, mode, criterion, model, args, compute_dtype: str = "auto", reconstruction: str = "off") -> dict:
    command = [sys.executable, __file__, "--child", "--size", size, "--mode", mode, "--criterion", criterion]
    command += ["--model", str(model), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    command += ["--compute-dtype", compute_dtype, "--reconstruction", reconstruction]
    command += ["--threads", str(args.threads), "--allocation", args.allocation]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if done.returncode != 0 and last.startswith("ValueError: "):  # refused (e.g. a criterion that cannot stream)
        refused = last[len("ValueError: ") :][:160]
        return {"size": size, "mode": mode, "criterion": criterion, "reconstruction": reconstruction != "off",
                "refused": refused}  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{size} {mode} {criterion} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.5b", "1b"], choices=sorted(SIZES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument("--samples", type=int, default=16, help="Calibration windows.")
    parser.add_argument("--seq-len", type=int, default=128, help="Tokens per calibration window.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--allocation", default="uniform", choices=sorted(ALLOCATIONS), help="global / flap: two streaming passes."
    )
    parser.add_argument(
        "--compute-dtype",
        nargs="+",
        default=["auto"],
        choices=["auto", "float32", "bfloat16"],
        help="Run each configuration once per compute dtype (PrunerConfig.compute_dtype), e.g. float32 bfloat16.",
    )
    parser.add_argument(
        "--reconstruction",
        nargs="+",
        default=["off"],
        choices=["off", "on", "error", "error-output"],
        help="Run each configuration without (off) and/or with layer-wise reconstruction of the criterion's units (on) "
        "or of units chosen by refit error (error, `reconstruction_selection='error'`), fit to the unpruned residual "
        "stream (the default) or, with error-output, to each consumer's own outputs.",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="Keep the random checkpoints on disk.")
    # Internal: one run in a child process.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--criterion", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.compute_dtype = args.compute_dtype[0]
        args.reconstruction = args.reconstruction[0]
        child(args)
        return
    if args.build:
        build_checkpoint(args.build, Path(args.model))
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = [_run_child("-", "baseline", "-", "-", args)]
    for size in args.sizes:
        path = CHECKPOINTS / f"random-llama-{size}"
        if not (path / "config.json").is_file():  # built in a child too, so this process stays small
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, __file__, "--build", size, "--model", str(path)], check=True, env=env)
        checkpoint_gib = _checkpoint_bytes(path) / 2**30
        for mode in args.modes:
            for criterion in args.criteria:
                for compute_dtype in args.compute_dtype:
                    for reconstruction in args.reconstruction:
                        row = _run_child(size, mode, criterion, path, args, compute_dtype, reconstruction)
                        row["checkpoint_gib"] = checkpoint_gib
                        logging.info("%s", row)
                        rows.append(row)
        if not args.keep_checkpoints:
            shutil.rmtree(path)
    capability = _cpu_capability()
    with open(RESULTS / "scale.jsonl", "a", encoding="utf-8") as f:
        for row in rows:
            extra = {"samples": args.samples, "seq_len": args.seq_len, "threads": args.threads, "cpu": capability}
            f.write(json.dumps({**row, **extra}) + "\n")
    print(f"CPU: {capability}; {args.threads} threads; {args.samples} x {args.seq_len} calibration tokens\n")
    print(
        "| size | checkpoint (GiB) | mode | criterion | compute | reconstruction | peak RSS (GiB) | RSS / checkpoint "
        "| est. tensors (GiB) | wall (s) | CPU (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_table_row(r))


def _cpu_capability() -> str:
    """`torch.backends.cpu.get_cpu_capability()` and the half types this CPU computes natively (in a child, so this
    process never imports torch)."""
    code = "from optimum_prune.compute_dtype import cpu_capability; print(cpu_capability())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip()


def _table_row(r: dict) -> str:
    head = f"| {r['size']} | {r['checkpoint_gib']:.2f} |" if "checkpoint_gib" in r else f"| {r['size']} | - |"
    recon = {True: "on", False: "off"}.get(r.get("reconstruction"), "-")
    recon += ", units by refit error" if r.get("reconstruction") and r.get("selection") == "error" else ""
    recon += ", own outputs" if r.get("reconstruction") and r.get("target") == "output" else ""
    head += f" {r['mode']} | {r['criterion']} | {r.get('compute_dtype', '-')} | {recon} |"
    if "refused" in r:
        return f"{head} refused: {r['refused']} |"
    ckpt = r.get("checkpoint_gib")
    ratio = f"{r['peak_rss_gib'] / ckpt:.2f}" if ckpt else "-"
    est = f"{r['estimated_peak_gib']:.2f}" if "estimated_peak_gib" in r else "-"
    cpu = f"{r['cpu_s']:.0f}" if "cpu_s" in r else "-"
    return f"{head} {r['peak_rss_gib']:.2f} | {ratio} | {est} | {r['wall_s']:.0f} | {cpu} |"


if __name__ == "__main__":
    main()
