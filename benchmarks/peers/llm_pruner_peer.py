"""LLM-Pruner's own code as a benchmark peer, driven the way its ``llama3.py`` ``main`` drives it (``--block_wise``).

The peer is a checkout of https://github.com/horseee/LLM-Pruner (commit 128a07d) in its own virtual environment with
Transformers 4.45.2 (its modules patch 4.x internals and do not import under Transformers 5). Nothing of it is vendored
here: the worker puts the checkout on ``sys.path`` and imports ``LLMPruner.torch_pruning`` and
``LLMPruner.pruner.hf_llama_pruner``, then repeats ``llama3.py``'s block-wise recipe step by step: every parameter
``requires_grad``, ``TaylorImportance(group_reduction="sum", taylor="param_first")``, a ``MetaPruner`` with
``ch_sparsity=pruning_ratio``, ``consecutive_groups={k_proj: head_dim}`` (whole key-value groups, the query heads
of a group follow), ``customized_pruners={LlamaRMSNorm: hf_rmsnorm_pruner}``, ``root_instances`` = the ``k_proj`` of
the attention layers and the ``gate_proj`` of the MLP layers in ``[start, end)``, one backward pass of the
calibration batch, ``pruner.step()``, then its attribute fix-ups (``num_heads``, ``num_key_value_heads``).

What had to be adapted (``ADAPTATIONS`` says the same in every result), without editing its files:

* calibration: ``get_examples('bookcorpus', ...)`` downloads BookCorpus; the worker instead gets ``num_samples``
  windows of ``seq_len`` tokens of our calibration text, drawn by our ``prepare_calibration`` (seeded random offsets,
  LLM-Pruner's own sampling scheme) in the parent process, so both sides see identical token ids;
* device and dtype: ``llama3.py`` loads float16 (``device_map="auto"``) and moves to ``cuda``; here float32 on CPU;
* the dependency-graph example input: its hard-coded LLaMA-2 token ids (up to 17632) exceed tiny-llama's vocabulary
  (4096), so the first 8 tokens of the first two calibration windows are used (only shapes matter for the graph);
* no logger directory, generation samples, WikiText/PTB perplexity or pickle: the worker saves the pruned
  ``state_dict`` (safetensors) and the per-layer widths instead, because a pickle of Transformers 4.45 modules does
  not load under Transformers 5.

Why a search: ``pruning_ratio`` is LLM-Pruner's per-layer width ratio, the benchmark compares at a fraction of *total*
parameters. The worker searches the ratio (secant step inside a bisection bracket) until the removed fraction is within
``tolerance`` of the target. Whole key-value groups make the removed fraction jump, so some targets cannot be hit; the
closest trial is kept and the result says so (``within_tolerance``).

Evaluation happens in our environment: :func:`load_pruned_model` rebuilds the model from the saved tensors with
``optimum_prune``'s surgery helpers (which switch to the registered ``pruned_llama`` type for per-layer widths) and
``benchmarks/quality.py`` measures it with ``optimum_prune.perplexity``. As a cross-check the worker also measures the
unpruned and the pruned model inside the peer environment on the same eval token ids with a copy of that protocol.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_pruning_peer import (  # noqa: E402 - sibling module, stdlib-only at import time
    _all_progress,
    _last_progress,
    _Progress,
    _read_text,
    _stack_summary,
    _start_worker,
    run_watched,
)


__all__ = ["ADAPTATIONS", "LLM_PRUNER_COMMIT", "load_pruned_model", "prune_with_llm_pruner"]

logger = logging.getLogger(__name__)

LLM_PRUNER_COMMIT = "128a07d"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "llm_pruner_peer.json"
_WORKER_FLAG = "--_worker"
_MAX_RATIO = 0.99  # ch_sparsity 1.0 would remove every channel of a layer
ADAPTATIONS = (
    "calibration: our prepare_calibration windows of calibration.txt instead of get_examples('bookcorpus')",
    "float32 on CPU instead of float16 on cuda",
    "dependency-graph example input: first 8 tokens of 2 calibration windows (its LLaMA-2 ids exceed the vocabulary)",
    "output: state_dict + per-layer widths instead of the torch.save pickle; no generation/WikiText/PTB evaluation",
)


# --------------------------------------------------------------------------------------------------------------------
# Parent side (our environment)
# --------------------------------------------------------------------------------------------------------------------
def _checkout_commit(checkout: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def prune_with_llm_pruner(
    model_dir: str | os.PathLike,
    ratio: float,
    *,
    checkout: str | os.PathLike,
    python: str | os.PathLike,
    layers: tuple[int, int] | None = None,
    calibration: str | os.PathLike,
    eval_text: str | os.PathLike | None = None,
    num_samples: int = 10,
    seq_len: int = 64,
    timeout_s: float = 300.0,
    tolerance: float = 0.005,
    max_trials: int = 14,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Prune `model_dir` with LLM-Pruner's Taylor block-wise recipe until about `ratio` of all parameters is gone.

    Args:
        model_dir (`str`): local LLaMA checkpoint.
        ratio (`float`): fraction of *total* parameters to remove, in (0, 1).
        checkout (`str`): LLM-Pruner work tree (the folder holding ``LLMPruner/``).
        python (`str`): interpreter of the peer environment (Transformers 4.45.2, CPU torch).
        layers (`tuple[int, int]`, *optional*): LLM-Pruner's ``block_*_layer_start``/``end`` (end exclusive), the same
            for attention and MLP; all layers when omitted.
        calibration (`str`): calibration text file; `num_samples` windows of `seq_len` tokens are drawn from it.
        eval_text (`str`, *optional*): when given, the worker also reports the in-venv perplexity (64 x 256 tokens).
        timeout_s (`float`): wall-clock limit of the whole worker (search, save, cross-check).
        tolerance (`float`): accepted |removed - ratio|.
        max_trials (`int`): most pruning runs of the ratio search.
        output_dir (`str`, *optional*): where the pruned tensors go; a fresh temp dir when omitted.

    Returns:
        `dict` with "status" ("ok" | "unreachable" | "failed" | "timeout"), "reason", "removed_fraction",
        "pruning_ratio", "within_tolerance", "params_before", "params_after", "seconds", "peak_rss_mib",
        "output_dir", "trials", "ppl_unpruned_peer_env", "ppl_peer_env" and "adaptations".
    """
    import torch  # noqa: F401 - our environment
    from transformers import AutoTokenizer

    from optimum_prune.calibration import prepare_calibration

    if not 0.0 < ratio < 1.0:
        raise ValueError(f"`ratio` must be in (0, 1), got {ratio}")
    checkout, python = Path(checkout).resolve(), Path(python)
    if not (checkout / "LLMPruner" / "pruner" / "hf_llama_pruner.py").is_file():
        raise FileNotFoundError(f"{checkout} is not an LLM-Pruner checkout (no LLMPruner/pruner/hf_llama_pruner.py)")
    if not python.is_file():
        raise FileNotFoundError(f"peer interpreter {python} does not exist")
    model_dir = str(Path(model_dir).resolve())
    output_dir = str(Path(output_dir or tempfile.mkdtemp(prefix="llm_pruner_peer_")).resolve())
    work = Path(tempfile.mkdtemp(prefix="llm_pruner_peer_run_"))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = prepare_calibration(str(calibration), tokenizer, num_samples=num_samples, seq_len=seq_len)
    spec = {
        "model_dir": model_dir,
        "checkout": str(checkout),
        "target": ratio,
        "layers": list(layers) if layers is not None else None,
        "tolerance": tolerance,
        "max_trials": max_trials,
        "calibration_ids": calib.tolist(),
        "eval_ids": None,
        "output_dir": output_dir,
        "progress_path": str(work / "progress.jsonl"),
        "result_path": str(work / "result.json"),
        "stack_path": str(work / "stack.txt"),
    }
    if eval_text is not None:
        ids = tokenizer(Path(eval_text).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        spec["eval_ids"] = ids[: 64 * 256]
    (work / "spec.json").write_text(json.dumps(spec))

    result: dict[str, Any] = {
        "tool": f"LLM-Pruner {_checkout_commit(checkout) or LLM_PRUNER_COMMIT} (llama3.py --block_wise, taylor "
        "param_first)",
        "model_dir": model_dir,
        "target_fraction": ratio,
        "layers": spec["layers"],
        "status": "failed",
        "reason": "",
        "removed_fraction": None,
        "pruning_ratio": None,
        "within_tolerance": None,
        "params_before": None,
        "params_after": None,
        "seconds": None,
        "peak_rss_mib": None,
        "output_dir": None,
        "trials": [],
        "off_target": None,
        "ppl_unpruned_peer_env": None,
        "ppl_peer_env": None,
        "peer_versions": None,
        "adaptations": list(ADAPTATIONS),
    }
    cmd = [str(python), str(Path(__file__).resolve()), _WORKER_FLAG, str(work / "spec.json")]
    proc, peak, timed_out, elapsed = run_watched(cmd, work, timeout_s, spec["stack_path"])
    result["seconds"] = round(elapsed, 2)
    worker = json.loads(Path(spec["result_path"]).read_text()) if Path(spec["result_path"]).exists() else {}
    result.update({k: v for k, v in worker.items() if k in result})
    peak = max(peak, worker.get("worker_peak_rss_mib") or 0.0)
    result["peak_rss_mib"] = round(peak, 1) if peak else None
    if timed_out:
        last = _last_progress(Path(spec["progress_path"]))
        stack = _stack_summary(_read_text(spec["stack_path"]))
        result.update(
            status="timeout",
            reason=f"timeout after {timeout_s:.0f} s in phase '{last.get('phase', 'startup')}'"
            + (f"; innermost frames: {stack}" if stack else ""),
        )
        result["trials"] = [p for p in _all_progress(Path(spec["progress_path"])) if p.get("phase") == "trial_done"]
    elif not worker:
        tail = _read_text(work / "stderr.txt")[-1500:]
        result.update(status="failed", reason=f"worker exited with code {proc.returncode} without a result: {tail}")
    result["log_dir"] = str(work)
    logger.info("llm-pruner peer: %s (%s)", result["status"], result["reason"][:200])
    return result


def load_pruned_model(output_dir: str | os.PathLike):
    """Rebuild what the worker saved as a model of our environment; returns `(model, tokenizer)` in float32 eval mode.

    The unpruned checkpoint is loaded, every tensor is replaced by the peer's (shapes included), and ``optimum_prune``'s
    surgery helpers write the per-layer widths into the config (registered ``pruned_llama`` type) and the attention
    modules. A strict comparison of the resulting state dict with the saved tensors proves nothing was left behind.
    """
    import torch
    from safetensors.torch import load_file
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune.architectures.base import get_architecture
    from optimum_prune.surgery import _owner, _sync_module_sizes, sync_module_attrs, write_config

    out = Path(output_dir)
    meta = json.loads((out / META_FILE).read_text())
    tensors = load_file(str(out / WEIGHTS_FILE))
    model = AutoModelForCausalLM.from_pretrained(meta["model_dir"], dtype=torch.float32)
    own = model.state_dict()
    if set(own) != set(tensors):
        raise ValueError(f"peer tensors differ in names: {sorted(set(own) ^ set(tensors))[:8]}")
    for name, value in tensors.items():
        owner, attr = _owner(model, name)
        setattr(owner, attr, nn.Parameter(value.float(), requires_grad=False))
    for module in model.modules():
        _sync_module_sizes(module)
    spec = get_architecture(model.config.model_type)
    write_config(model, spec)
    sync_module_attrs(model, spec)
    for name, value in model.state_dict().items():
        if not torch.equal(value, tensors[name].float()):
            raise ValueError(f"rebuilt tensor {name} differs from the peer's")
    return model.eval(), AutoTokenizer.from_pretrained(meta["model_dir"])


# --------------------------------------------------------------------------------------------------------------------
# Worker side (the peer environment: Transformers 4.45.2, the LLM-Pruner checkout on sys.path)
# --------------------------------------------------------------------------------------------------------------------
def _set_random_seed(seed: int) -> None:
    """llama3.py's set_random_seed (default --seed 42)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _prune_once(spec, ratio: float, calib, progress: _Progress, trial: int):
    """llama3.py main, --block_wise --pruner_type taylor --taylor param_first, at `ratio` (see module docstring)."""
    import LLMPruner.torch_pruning as tp
    import torch
    from LLMPruner.pruner import hf_llama_pruner as llama_pruner
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    _set_random_seed(42)
    model = LlamaForCausalLM.from_pretrained(spec["model_dir"], torch_dtype=torch.float32)
    for param in model.parameters():
        param.requires_grad_(True)
    num_layers = len(model.model.layers)
    start, end = spec["layers"] or (0, num_layers)
    forward_prompts = calib[:2, :8]
    imp = llama_pruner.TaylorImportance(group_reduction="sum", taylor="param_first")
    kwargs = {
        "importance": imp,
        "global_pruning": False,
        "iterative_steps": 1,
        "ch_sparsity": ratio,
        "ignored_layers": [],
        "channel_groups": {},
        "consecutive_groups": {layer.self_attn.k_proj: layer.self_attn.head_dim for layer in model.model.layers},
        "customized_pruners": {LlamaRMSNorm: llama_pruner.hf_rmsnorm_pruner},
        "root_module_types": None,
        "root_instances": [model.model.layers[i].self_attn.k_proj for i in range(start, end)]
        + [model.model.layers[i].mlp.gate_proj for i in range(start, end)],
    }
    t0 = time.perf_counter()
    progress("graph_build", trial=trial, ratio=ratio)
    pruner = tp.pruner.MetaPruner(model, forward_prompts, **kwargs)
    model.zero_grad()
    t1 = time.perf_counter()
    progress("backward", trial=trial, ratio=ratio)
    loss = model(calib, labels=calib).loss
    loss.backward()
    t2 = time.perf_counter()
    progress("step", trial=trial, ratio=ratio)
    pruner.step()
    for layer in model.model.layers:
        layer.self_attn.num_heads = layer.self_attn.q_proj.weight.data.shape[0] // layer.self_attn.head_dim
        layer.self_attn.num_key_value_heads = layer.self_attn.k_proj.weight.data.shape[0] // layer.self_attn.head_dim
    model.zero_grad()
    for name, param in model.named_parameters():
        if "weight" in name:
            param.grad = None
    del pruner
    t3 = time.perf_counter()
    info = {
        "graph_build_s": round(t1 - t0, 3),
        "backward_s": round(t2 - t1, 3),
        "step_s": round(t3 - t2, 3),
        "calibration_loss": round(loss.item(), 4),
    }
    return model, info


def _widths(model) -> dict[str, dict[str, int]]:
    out = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        out[str(i)] = {
            "num_attention_heads": attn.q_proj.out_features // attn.head_dim,
            "num_key_value_heads": attn.k_proj.out_features // attn.head_dim,
            "intermediate_size": layer.mlp.gate_proj.out_features,
        }
    return out


def _peer_perplexity(model, ids: list[int], seq_len: int = 256, batch_size: int = 8) -> float:
    """A copy of ``optimum_prune.perplexity``'s protocol (windows from the start, summed token NLL, batches of 8)."""
    import torch
    from torch import nn

    ids = torch.tensor(ids, dtype=torch.long)
    num_windows = min(ids.numel() // seq_len, 64)
    windows = ids[: num_windows * seq_len].view(num_windows, seq_len)
    nll, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, num_windows, batch_size):
            batch = windows[start : start + batch_size]
            logits = model(input_ids=batch).logits.float()
            nll += nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            tokens += batch[:, 1:].numel()
    return math.exp(nll / tokens)


def _search(spec, calib, progress: _Progress, params_before: int, prunable_share: float):
    """Ratio search: removed(r) is nondecreasing in r with jumps at whole key-value groups."""
    target, tol = spec["target"], spec["tolerance"]
    lo, hi = (0.0, 0.0), None  # (ratio, removed) brackets
    ratio = min(target / max(prunable_share, 1e-6), _MAX_RATIO)
    best, trials = None, []
    for trial in range(1, spec["max_trials"] + 1):
        model, info = _prune_once(spec, ratio, calib, progress, trial)
        removed = 1 - _count(model) / params_before
        record = {"trial": trial, "ratio": round(ratio, 5), "removed_fraction": round(removed, 5), **info}
        trials.append(record)
        progress("trial_done", **record)
        if best is None or abs(removed - target) < abs(best[1]["removed_fraction"] - target):
            best = (model, record)
        else:
            del model
        if abs(removed - target) <= tol + 1e-9:
            break
        if removed < target:
            if ratio >= _MAX_RATIO:
                break  # unreachable: even the largest ratio removes too little
            lo = (ratio, removed)
        else:
            hi = (ratio, removed)
        if hi is None:
            guess = min(ratio + (target - removed) / max(prunable_share, 1e-6), _MAX_RATIO)
        else:
            # Secant between the bracket ends, kept off the ends; bisection when that stalls.
            span = hi[1] - lo[1]
            guess = lo[0] + (target - lo[1]) * (hi[0] - lo[0]) / span if span > 0 else (lo[0] + hi[0]) / 2
            if not lo[0] + 0.1 * (hi[0] - lo[0]) < guess < hi[0] - 0.1 * (hi[0] - lo[0]):
                guess = (lo[0] + hi[0]) / 2
            if hi[0] - lo[0] < 1e-3:
                break
        ratio = guess
    return best, trials


def _worker_main(spec_path: str) -> int:
    import resource

    spec, progress = _start_worker(spec_path)
    sys.path.insert(0, spec["checkout"])
    result: dict[str, Any] = {"status": "failed", "reason": ""}
    try:
        import LLMPruner  # noqa: F401 - fail early with the import error if the checkout is broken
        import torch
        import transformers
        from safetensors.torch import save_file
        from transformers import LlamaForCausalLM

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        result["peer_versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        calib = torch.tensor(spec["calibration_ids"], dtype=torch.long)
        base = LlamaForCausalLM.from_pretrained(spec["model_dir"], torch_dtype=torch.float32)
        params_before = _count(base)
        start, end = spec["layers"] or (0, len(base.model.layers))
        prunable = sum(
            m.weight.numel()
            for i in range(start, end)
            for m in (
                *(getattr(base.model.layers[i].self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                *(getattr(base.model.layers[i].mlp, n) for n in ("gate_proj", "up_proj", "down_proj")),
            )
        )
        if spec["eval_ids"]:
            progress("eval_unpruned")
            result["ppl_unpruned_peer_env"] = _peer_perplexity(base, spec["eval_ids"])
        del base
        (model, record), trials = _search(spec, calib, progress, params_before, prunable / params_before)
        removed, ratio = record["removed_fraction"], record["ratio"]
        params_after = _count(model)
        within = abs(removed - spec["target"]) <= spec["tolerance"] + 1e-9  # rounded to 5 digits
        result.update(
            params_before=params_before,
            params_after=params_after,
            removed_fraction=removed,
            pruning_ratio=ratio,
            within_tolerance=within,
            trials=trials,
        )
        progress("save")
        out = Path(spec["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
        meta = {
            "model_dir": spec["model_dir"],
            "widths": _widths(model),
            "pruning_ratio": ratio,
            "removed_fraction": removed,
            "params_before": params_before,
            "params_after": params_after,
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        if spec["eval_ids"]:
            progress("eval_pruned")
            result["ppl_peer_env"] = _peer_perplexity(model, spec["eval_ids"])
        reason = f"removed {removed:.4f} of parameters at pruning_ratio={ratio:.4f} ({len(trials)} trials)"
        if within:
            result.update(status="ok", output_dir=str(out))
        else:
            # Show the two trials around the target: the jump the step function makes there.
            below = max(
                (t for t in trials if t["removed_fraction"] < spec["target"]),
                default=None,
                key=lambda t: t["removed_fraction"],
            )
            above = min(
                (t for t in trials if t["removed_fraction"] > spec["target"]),
                default=None,
                key=lambda t: t["removed_fraction"],
            )
            detail = []
            if below:
                detail.append(f"{below['removed_fraction']:.4f} at ratio {below['ratio']:.4f}")
            if above:
                detail.append(f"{above['removed_fraction']:.4f} at ratio {above['ratio']:.4f}")
            result["off_target"] = (
                f"{spec['target']:.0%} +/- {spec['tolerance']:.1%} unreachable: {' / '.join(detail)}"
            )
            reason += f"; {result['off_target']}"
            result.update(status="ok" if above and below else "unreachable", output_dir=str(out))
        result["reason"] = reason
    except Exception as exc:  # a failing peer is a result, not a crash
        import traceback

        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name}" if tb else "?"
        last = _last_progress(Path(spec["progress_path"]))
        result.update(
            status="failed",
            reason=f"{type(exc).__name__} in phase '{last.get('phase')}' at {where}: {exc}"[:3000],
            trials=[p for p in _all_progress(Path(spec["progress_path"])) if p.get("phase") == "trial_done"],
        )
        logger.exception("llm-pruner peer failed")
    result["worker_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _WORKER_FLAG:
    sys.exit(_worker_main(sys.argv[2]))
