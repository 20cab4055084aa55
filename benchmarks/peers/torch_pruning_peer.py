"""Torch-Pruning as a benchmark peer, configured the way its own ``examples/LLMs/prune_llm.py`` (v1.6.1) does.

The peer is `torch-pruning` 1.6.1 from PyPI: ``GroupMagnitudeImportance(p=2, group_reduction="mean")``, a
``MetaPruner`` (alias ``BasePruner``) with local pruning, the attention heads registered as ``num_heads`` with
``prune_num_heads=True`` and ``prune_head_dims=False`` (RoPE stays intact), ``head_pruning_ratio`` equal to
``pruning_ratio``, ``out_channel_groups=2`` for a fused ``gate_up_proj``, ``round_to=4``, the LM head ignored, and
afterwards the script's config fix-ups (hidden size, heads, key-value groups, intermediate size).

Why a subprocess: building Torch-Pruning's dependency graph never finishes on GQA LLaMA models under Transformers
5.x (Torch-Pruning issue 527), so every run gets a hard timeout, and a timeout or crash becomes a recorded result
("status" and a precise "reason", with the phase and the Python stack where it hung) instead of a hung benchmark.

Why a search: Torch-Pruning's knob is a per-layer width ratio, while the benchmark compares methods at a fraction of
*total* parameters removed. Embeddings and norms shrink linearly in the ratio and the projections quadratically, so
the worker predicts the ratio from that model, measures, recalibrates the model on each measurement and keeps the
ratio inside a bracket (bisection fallback), within ``tolerance`` or ``max_trials``.

Where ``prune_llm.py`` only knows LLaMA/Qwen/Phi-3 module names, the fix-ups are extended by a small alias table
(OPT's ``fc1``/``ffn_dim``, BLOOM's ``self_attention.query_key_value``/``n_head``/``dense_h_to_4h``). Some pruned
shapes cannot be written into those configs at all (OPT ties the attention width to ``hidden_size``, BLOOM the MLP to
``4 * hidden_size``), so the worker saves with ``save_pretrained``, reloads with ``from_pretrained`` and compares
logits; if that is not exact it falls back to ``torch.save`` of the whole module and says so in the result. Load
either format with :func:`load_pruned_model` and measure with :func:`evaluate_perplexity`.

CLI (prints the result dict as JSON)::

    HF_HUB_OFFLINE=1 python benchmarks/peers/torch_pruning_peer.py /work/shared/models/tiny-opt 0.2 \\
        --eval-text /work/shared/data/corpus/eval.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


__all__ = [
    "TORCH_PRUNING_VERSION",
    "count_parameters",
    "evaluate_perplexity",
    "load_pruned_model",
    "make_random_mha_llama",
    "prune_with_torch_pruning",
]

logger = logging.getLogger(__name__)

TORCH_PRUNING_VERSION = "1.6.1"
TORCH_SAVE_FILE = "pruned_model.pt"
META_FILE = "torch_pruning_peer.json"
_WORKER_FLAG = "--_worker"
_POLL_S = 0.2
_STACK_GRACE_S = 3.0
# Reload check: fp32 logits of the saved model must match the in-memory pruned model this closely.
_RELOAD_ATOL = 1e-4

# Module/config names beyond the LLaMA-style ones prune_llm.py hard-codes; kept as data so that the prune_llm.py logic
# below stays recognisable.
_ATTN_SUFFIXES = ("self_attn", "self_attention")
_FUSED_QKV_NAMES = ("qkv_proj", "query_key_value")
_HEADS_ALIASES = ("num_attention_heads", "n_head")


# --------------------------------------------------------------------------------------------------------------------
# Helpers usable in both processes
# --------------------------------------------------------------------------------------------------------------------
def count_parameters(model) -> int:
    """Count parameters once per storage, so tied (or re-tied) embeddings are not counted twice."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.data_ptr(), p.shape)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def _offline_env() -> dict[str, str]:
    """Environment for the worker: offline hub, no tokenizer thread pools fighting over two cores."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def load_pruned_model(output_dir: str | os.PathLike):
    """Load what :func:`prune_with_torch_pruning` saved, whichever format it had to use.

    Returns `(model, tokenizer)`, the model in float32 eval mode. A ``torch.save`` checkpoint is a pickle of the whole
    module (shapes the config cannot describe), so it needs ``weights_only=False``: only load directories you wrote.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(output_dir)
    meta = json.loads((out / META_FILE).read_text()) if (out / META_FILE).exists() else {}
    tokenizer = AutoTokenizer.from_pretrained(out)
    if meta.get("save_format") == "torch.save" or (out / TORCH_SAVE_FILE).exists():
        model = torch.load(out / TORCH_SAVE_FILE, weights_only=False, map_location="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return model.float().eval(), tokenizer


def evaluate_perplexity(model, tokenizer, text_path: str | os.PathLike, seq_len: int = 256, max_windows: int = 64):
    """Perplexity on the first `max_windows * seq_len` tokens of a text file, in non-overlapping windows.

    Same protocol as ``shared/models/train_tiny.py`` (windows of `seq_len` tokens stepping by `seq_len`, loss over the
    `seq_len - 1` predicted tokens, the last partial window dropped), so the unpruned models reproduce the perplexities
    in ``shared/models/README.md``. Needed here because some pruned models only exist as ``torch.save`` pickles.
    """
    import torch

    ids = torch.tensor(tokenizer(Path(text_path).read_text())["input_ids"])[: max_windows * seq_len]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, ids.numel() - seq_len, seq_len):
            x = ids[start : start + seq_len].unsqueeze(0)
            loss = model(input_ids=x, labels=x).loss
            total += loss.item() * (seq_len - 1)
            count += seq_len - 1
    if count == 0:
        raise ValueError(f"{text_path} has fewer than {seq_len + 1} tokens")
    return math.exp(total / count)


def make_random_mha_llama(output_dir: str | os.PathLike, like: str | os.PathLike = "/work/shared/models/tiny-llama"):
    """Write a random LLaMA shaped like `like` but with as many key-value heads as heads (no GQA).

    Why: it tells apart "Torch-Pruning cannot handle LLaMA under Transformers 5.x" from "it cannot handle GQA".
    The tokenizer of `like` is copied so that the worker's example input is built the same way.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(like)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(like).save_pretrained(output_dir)
    return str(output_dir)


# --------------------------------------------------------------------------------------------------------------------
# Parent side: run the worker under a timeout
# --------------------------------------------------------------------------------------------------------------------
def _read_vm_hwm_mib(pid: int) -> float | None:
    """Peak resident set of a live process from /proc (Linux); polled because a killed worker cannot report it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_text(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _last_progress(progress_path: Path) -> dict[str, Any]:
    """Last progress record the worker wrote, to say in which phase a timeout hit."""
    try:
        lines = [line for line in progress_path.read_text().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _all_progress(progress_path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in progress_path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _stack_summary(stack_text: str, max_frames: int = 8) -> str:
    """Innermost frames of the main thread from a faulthandler dump: where the worker actually was."""
    blocks = stack_text.strip().split("\n\n")
    main = next(
        (b for b in blocks if "most recent call first" in b and "Current thread" in b), blocks[0] if blocks else ""
    )
    frames = [line.strip() for line in main.splitlines() if line.strip().startswith("File ")]
    return " <- ".join(frames[:max_frames])


def _peer_frame(stack_summary: str) -> str:
    """Innermost Torch-Pruning frame ("group.py:89 in has_pruning_op"): the headline of a hang."""
    for frame in stack_summary.split(" <- "):
        if "torch_pruning" in frame:
            path, _, rest = frame.partition('", line ')
            return f"torch_pruning/{path.split('torch_pruning/')[-1]}:{rest}"
    return ""


def run_watched(cmd: list[str], work: Path, timeout_s: float, stack_path: str):
    """Run a peer worker under a timeout, in a session of its own (so the kill on timeout reaches every process it
    started), with stdout/stderr in `work`, polling its peak RSS. On timeout, SIGUSR1 first makes the worker's
    faulthandler dump every thread's stack to `stack_path` (the precise place it hung), then the session is killed.

    Returns `(process, peak RSS MiB, timed out, seconds)`.
    """
    start = time.perf_counter()
    peak = 0.0
    timed_out = False
    with open(work / "stdout.txt", "wb") as out_f, open(work / "stderr.txt", "wb") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=_offline_env(), start_new_session=True)
        while proc.poll() is None:
            peak = max(peak, _read_vm_hwm_mib(proc.pid) or 0.0)
            if time.perf_counter() - start > timeout_s:
                timed_out = True
                break
            time.sleep(_POLL_S)
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGUSR1)
            deadline = time.perf_counter() + _STACK_GRACE_S
            while time.perf_counter() < deadline and not _read_text(stack_path).strip():
                time.sleep(0.1)
            peak = max(peak, _read_vm_hwm_mib(proc.pid) or 0.0)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc, peak, timed_out, time.perf_counter() - start


def prune_with_torch_pruning(
    model_dir: str | os.PathLike,
    target_fraction: float,
    output_dir: str | os.PathLike | None = None,
    timeout_s: float = 300.0,
    tolerance: float = 0.01,
    max_trials: int = 8,
    python: str | None = None,
) -> dict[str, Any]:
    """Prune `model_dir` with Torch-Pruning until about `target_fraction` of all parameters is gone.

    Args:
        model_dir (`str`): local Hugging Face causal LM (loaded in float32).
        target_fraction (`float`): fraction of *total* parameters to remove, in (0, 1), e.g. 0.2 or 0.5.
        output_dir (`str`, *optional*): where to save the pruned model; a fresh temp dir when omitted.
        timeout_s (`float`, *optional*, defaults to 300): wall-clock limit of the whole worker (all search trials,
            saving and the reload check). Torch-Pruning hangs on GQA models, so this is what ends those runs.
        tolerance (`float`, *optional*, defaults to 0.01): accepted |removed - target|; the step size of the knob
            (whole heads, ``round_to=4``) may make it unreachable, then the closest trial wins.
        max_trials (`int`, *optional*, defaults to 8): most pruning runs of the ratio search.
        python (`str`, *optional*): interpreter for the worker (defaults to this one; needs torch-pruning 1.6.1).

    Returns:
        `dict` with "status" ("ok" | "failed" | "timeout"), "reason", "params_before", "params_after",
        "removed_fraction", "pruning_ratio" (Torch-Pruning's knob that was used), "seconds" (worker wall time, search
        included), "peak_rss_mib" (worker), "output_dir" (None unless saved), "save_format" ("save_pretrained" |
        "torch.save" | None), "reload_error", "phase" (where a failure happened) and "trials".
    """
    if not 0.0 < target_fraction < 1.0:
        raise ValueError(f"`target_fraction` must be in (0, 1), got {target_fraction}")
    if timeout_s <= 0:
        raise ValueError(f"`timeout_s` must be positive, got {timeout_s}")
    model_dir = str(Path(model_dir).resolve())
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="torch_pruning_peer_")
    output_dir = str(Path(output_dir).resolve())

    work = Path(tempfile.mkdtemp(prefix="torch_pruning_peer_run_"))
    spec = {
        "model_dir": model_dir,
        "target_fraction": target_fraction,
        "output_dir": output_dir,
        "tolerance": tolerance,
        "max_trials": max_trials,
        "progress_path": str(work / "progress.jsonl"),
        "result_path": str(work / "result.json"),
        "stack_path": str(work / "stack.txt"),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    cmd = [python or sys.executable, str(Path(__file__).resolve()), _WORKER_FLAG, str(work / "spec.json")]

    result: dict[str, Any] = {
        "tool": f"torch-pruning {TORCH_PRUNING_VERSION} (examples/LLMs/prune_llm.py configuration)",
        "model_dir": model_dir,
        "target_fraction": target_fraction,
        "status": "failed",
        "reason": "",
        "params_before": None,
        "params_after": None,
        "removed_fraction": None,
        "pruning_ratio": None,
        "seconds": None,
        "peak_rss_mib": None,
        "output_dir": None,
        "save_format": None,
        "reload_error": None,
        "phase": None,
        "trials": [],
    }
    logger.info("torch-pruning peer: %s, target %.3f, timeout %.0f s", model_dir, target_fraction, timeout_s)
    proc, peak, timed_out, elapsed = run_watched(cmd, work, timeout_s, spec["stack_path"])
    result["seconds"] = round(elapsed, 2)

    progress = _all_progress(Path(spec["progress_path"]))
    worker_result = {}
    if Path(spec["result_path"]).exists():
        worker_result = json.loads(Path(spec["result_path"]).read_text())
    result.update({k: v for k, v in worker_result.items() if k in result})
    result["trials"] = worker_result.get("trials") or [p for p in progress if p.get("phase") == "trial_done"]
    if result["params_before"] is None:
        result["params_before"] = next((p["params_before"] for p in progress if "params_before" in p), None)
    peak = max(peak, worker_result.get("worker_peak_rss_mib") or 0.0)
    result["peak_rss_mib"] = round(peak, 1) if peak else None

    if timed_out:
        last = _last_progress(Path(spec["progress_path"]))
        stack = _stack_summary(_read_text(spec["stack_path"]))
        phase = last.get("phase", "startup")
        result.update(
            status="timeout",
            phase=phase,
            reason=(
                f"timeout after {timeout_s:.0f} s in phase '{phase}'"
                + (f" ({last['detail']})" if last.get("detail") else "")
                + (f", trial {last['trial']} at pruning_ratio={last['ratio']:.4f}" if "ratio" in last else "")
                + (f", phase entered {last['t']:.1f} s after worker start" if "t" in last else "")
                + (f"; stuck in {_peer_frame(stack)}" if _peer_frame(stack) else "")
                + (f"; innermost frames: {stack}" if stack else "")
            ),
        )
    elif not worker_result:
        stderr_tail = _read_text(work / "stderr.txt")[-2000:]
        last = _last_progress(Path(spec["progress_path"]))
        result.update(
            status="failed",
            phase=last.get("phase", "startup"),
            reason=f"worker exited with code {proc.returncode} without a result; stderr tail: {stderr_tail}",
        )
    if result["status"] != "ok":
        result["output_dir"] = None if result["save_format"] is None else result["output_dir"]
    result["log_dir"] = str(work)
    logger.info("torch-pruning peer: %s (%s) in %.1f s", result["status"], result["reason"][:200], elapsed)
    return result


# --------------------------------------------------------------------------------------------------------------------
# Worker side (runs in the subprocess)
# --------------------------------------------------------------------------------------------------------------------
class _Progress:
    """Append-only phase log, flushed at once, so a parent that kills us still knows where we were."""

    def __init__(self, path: str):
        self.path = path
        self.t0 = time.perf_counter()

    def __call__(self, phase: str, **fields):
        record = {"phase": phase, "t": round(time.perf_counter() - self.t0, 3), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        logger.info("%s", record)


def _config_get(config, names, default=None):
    for name in names:
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return default


def _config_set(config, names, value):
    """Write a value under every alias the config has (BLOOM's n_head is also readable as num_attention_heads)."""
    for name in names:
        if hasattr(config, name):
            setattr(config, name, value)


def _find_lm_head(model):
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings to ignore")
    return head


def _registration(model):
    """Heads and channel groups exactly as prune_llm.py builds them, with the alias table for other families."""
    config = model.config
    n_heads = _config_get(config, _HEADS_ALIASES)
    n_kv = _config_get(config, ("num_key_value_heads",), n_heads)  # OPT/BLOOM have no KV field: MHA
    num_heads, out_channel_groups, separate_qkv = {}, {}, False
    for name, m in model.named_modules():
        if name.endswith(_ATTN_SUFFIXES):
            if hasattr(m, "q_proj"):
                separate_qkv = True
                num_heads[m.q_proj] = n_heads
                num_heads[m.k_proj] = n_kv
                num_heads[m.v_proj] = n_kv
            else:
                for fused in _FUSED_QKV_NAMES:
                    if hasattr(m, fused):
                        separate_qkv = False
                        num_heads[getattr(m, fused)] = n_heads
        if name.endswith("mlp") and hasattr(m, "gate_up_proj"):
            out_channel_groups[m.gate_up_proj] = 2
    return num_heads, out_channel_groups, separate_qkv, n_heads != n_kv


def _fix_config(model, separate_qkv: bool, is_gqa: bool) -> list[str]:
    """prune_llm.py's post-pruning attribute/config updates, plus the same updates under other families' names."""
    config = model.config
    notes = []
    config.hidden_size = _find_lm_head(model).in_features
    new_heads = None
    for name, m in model.named_modules():
        if name.endswith(_ATTN_SUFFIXES):
            if separate_qkv:
                width = m.q_proj.out_features
            else:
                fused = next(getattr(m, f) for f in _FUSED_QKV_NAMES if hasattr(m, f))
                width = fused.out_features // 3
            m.num_heads = width // m.head_dim
            new_heads = m.num_heads
            if hasattr(m, "hidden_size"):
                m.hidden_size = width
            if hasattr(m, "split_size"):  # BLOOM
                m.split_size = width
            if hasattr(m, "embed_dim"):  # OPT keeps the attention width here
                m.embed_dim = width
            if not is_gqa and hasattr(m, "num_key_value_heads"):
                m.num_key_value_heads = m.num_heads
            if not is_gqa and hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = m.num_heads
            if hasattr(m, "num_key_value_groups"):
                m.num_key_value_groups = m.num_heads // _config_get(config, ("num_key_value_heads",), m.num_heads)
        elif name.endswith("mlp"):
            if hasattr(m, "gate_proj"):
                config.intermediate_size = m.gate_proj.out_features
            elif hasattr(m, "gate_up_proj"):
                config.intermediate_size = m.gate_up_proj.out_features // 2
            elif hasattr(m, "dense_h_to_4h"):  # BLOOM: width is 4 * hidden_size by construction, no config field
                if m.dense_h_to_4h.out_features != 4 * config.hidden_size:
                    notes.append(
                        f"BLOOM MLP width {m.dense_h_to_4h.out_features} != 4 * hidden_size {4 * config.hidden_size}: "
                        "not expressible in BloomConfig"
                    )
            else:
                raise ValueError(f"Unknown mlp layer {name}: {type(m).__name__}")
        elif hasattr(m, "fc1") and hasattr(m, "fc2") and hasattr(config, "ffn_dim"):  # OPT decoder layer, no mlp
            config.ffn_dim = m.fc1.out_features
    if new_heads is not None:
        _config_set(config, _HEADS_ALIASES, new_heads)
        # BLOOM recomputes ALiBi slopes from the model-level head count, as the peer would (kept heads get new slopes).
        for m in model.modules():
            if hasattr(m, "num_heads") and not hasattr(m, "head_dim") and isinstance(m.num_heads, int):
                m.num_heads = new_heads
    if hasattr(config, "word_embed_proj_dim") and model.get_input_embeddings().embedding_dim == config.hidden_size:
        config.word_embed_proj_dim = config.hidden_size  # OPT without project_in/out
    if not is_gqa and hasattr(config, "num_key_value_heads") and new_heads is not None:
        config.num_key_value_heads = new_heads
    head_dim = getattr(config, "head_dim", None)
    if new_heads and not head_dim and config.hidden_size % new_heads:
        notes.append(
            f"hidden_size {config.hidden_size} is not divisible by {new_heads} heads: config cannot describe it"
        )
    return notes


def _retie_if_needed(model) -> bool:
    """Torch-Pruning replaces Parameters one module at a time, which silently unties a tied LM head."""
    import torch

    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    emb, head = model.get_input_embeddings(), _find_lm_head(model)
    if emb.weight is head.weight:
        return False
    if emb.weight.shape == head.weight.shape and torch.equal(emb.weight, head.weight):
        head.weight = emb.weight
        return True
    return False


def _annotated_importance(tp, model):
    """GroupMagnitudeImportance whose IndexError names the layer the dependency graph mapped wrongly.

    Scores are unchanged; without this the failure reads "index 64 is out of bounds" with no layer in sight.
    """
    names = {m: n for n, m in model.named_modules()}

    class AnnotatedGroupMagnitudeImportance(tp.importance.GroupMagnitudeImportance):
        def __call__(self, group):
            try:
                return super().__call__(group)
            except IndexError as exc:
                raise IndexError(f"{exc} [{_describe_bad_deps(tp, group, names)}]") from exc

    return AnnotatedGroupMagnitudeImportance


def _describe_bad_deps(tp, group, names) -> str:
    """Which members of a pruning group got indices beyond their layer's width."""
    import torch

    root = group[0].dep.target.module
    bad = []
    for dep, idxs in group:
        layer = dep.target.module
        if not isinstance(layer, torch.nn.Linear) or not idxs:
            continue
        is_out = dep.handler == tp.prune_linear_out_channels
        size = layer.out_features if is_out else layer.in_features
        top = max(int(i) for i in idxs)
        if top >= size:
            kind = "out" if is_out else "in"
            bad.append(f"{names.get(layer, '?')} {kind}-channels (size {size}) got {len(idxs)} indices up to {top}")
    head = f"group rooted at {names.get(root, type(root).__name__)}"
    return head + (": " + "; ".join(bad) if bad else ": no out-of-range Linear member found")


def _prune_once(spec, ratio: float, progress: _Progress, trial: int):
    """One run of the prune_llm.py recipe at `ratio`; returns the pruned model and measurements."""
    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("load", trial=trial, ratio=ratio)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    inputs = torch.tensor(tokenizer.encode("Hello world.")).unsqueeze(0)
    num_heads, out_channel_groups, separate_qkv, is_gqa = _registration(model)

    t0 = time.perf_counter()
    progress(
        "graph_build",
        trial=trial,
        ratio=ratio,
        detail="MetaPruner.__init__: DependencyGraph.build_dependency + group enumeration",
        gqa=is_gqa,
    )
    importance = _annotated_importance(tp, model)(p=2, group_reduction="mean")
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=inputs,
        importance=importance,
        global_pruning=False,
        output_transform=lambda x: x.logits,
        pruning_ratio=ratio,
        ignored_layers=[_find_lm_head(model)],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        out_channel_groups=out_channel_groups,
        round_to=4,
    )
    t1 = time.perf_counter()
    progress("prune", trial=trial, ratio=ratio, detail="pruner.step(interactive=True); group.prune()")
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            group.prune()
    t2 = time.perf_counter()
    progress("fixup", trial=trial, ratio=ratio)
    notes = _fix_config(model, separate_qkv, is_gqa)
    if _retie_if_needed(model):
        notes.append("re-tied the LM head to the pruned input embedding (identical values)")
    del pruner
    model.eval()
    progress("forward_check", trial=trial, ratio=ratio)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    if not torch.isfinite(logits).all():
        raise FloatingPointError("pruned model produces non-finite logits")
    return (
        model,
        tokenizer,
        {
            "graph_build_s": round(t1 - t0, 3),
            "prune_s": round(t2 - t1, 3),
            "notes": notes,
            "gqa": is_gqa,
        },
    )


def _linear_share(model) -> float:
    """Share of parameters in decoder projections (quadratic in the ratio); the rest shrinks linearly."""
    import torch

    head = _find_lm_head(model)
    quad = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return quad / count_parameters(model)


def _predict_ratio(target: float, quad_share: float) -> float:
    """Invert removed(r) = q * (1 - (1 - r)^2) + (1 - q) * r, i.e. q r^2 - (1 + q) r + target = 0."""
    q = min(max(quad_share, 1e-6), 1.0)
    disc = (1 + q) ** 2 - 4 * q * target
    return ((1 + q) - math.sqrt(max(disc, 0.0))) / (2 * q)


def _search(spec, progress: _Progress):
    """Find Torch-Pruning's ratio for the target removed fraction; returns the closest trial's model."""
    import torch
    from transformers import AutoModelForCausalLM

    target, tol, max_trials = spec["target_fraction"], spec["tolerance"], spec["max_trials"]
    base = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    params_before = count_parameters(base)
    quad_share = _linear_share(base)
    del base
    progress("measured", params_before=params_before, quad_share=round(quad_share, 4))

    # removed(r) lies between r (all linear) and 1 - (1 - r)^2 (all quadratic); widened for whole-head steps.
    lo, hi = max(0.0, 1 - math.sqrt(1 - target) - 0.05), min(0.99, target + 0.05)
    ratio = min(max(_predict_ratio(target, quad_share), lo), hi)
    best, trials = None, []
    for trial in range(1, max_trials + 1):
        model, tokenizer, info = _prune_once(spec, ratio, progress, trial)
        params_after = count_parameters(model)
        removed = 1 - params_after / params_before
        record = {
            "trial": trial,
            "ratio": round(ratio, 5),
            "params_after": params_after,
            "removed_fraction": round(removed, 5),
            **info,
        }
        trials.append(record)
        progress("trial_done", **record)
        if best is None or abs(removed - target) < abs(best[2]["removed_fraction"] - target):
            best = (model, tokenizer, record)
        else:
            del model
        if abs(removed - target) <= tol:
            break
        if removed < target:
            lo = max(lo, ratio)
        else:
            hi = min(hi, ratio)
        # Recalibrate the quadratic share on this measurement (removed = r + q (r - r^2)), then keep inside bracket.
        if 0 < ratio < 1:
            quad_share = min(max((removed - ratio) / (ratio - ratio * ratio), 0.0), 1.0)
        guess = _predict_ratio(target, quad_share)
        ratio = guess if lo < guess < hi and abs(guess - ratio) > 1e-4 else (lo + hi) / 2
        if hi - lo < 1e-3:
            break
    return best, trials, params_before


def _save_and_check(model, tokenizer, output_dir: str, progress: _Progress):
    """save_pretrained, then prove a from_pretrained reload gives the same logits; else torch.save the module."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = torch.tensor(tokenizer.encode("To be, or not to be, that is the question.")).unsqueeze(0)
    with torch.no_grad():
        ref = model(input_ids=inputs).logits
    reload_error = None
    progress("save_pretrained")
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        progress("reload_check")
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            got = reloaded(input_ids=inputs).logits
        diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("inf")
        if diff > _RELOAD_ATOL:
            reload_error = f"from_pretrained reload differs from the pruned model: max |logit diff| = {diff:.3g}"
    except Exception as exc:  # the message is the result
        reload_error = f"{type(exc).__name__}: {exc}"[:2000]
    if reload_error is None:
        return "save_pretrained", None
    # Do not leave a config/weights pair that from_pretrained might load with silently re-initialised tensors.
    for child in out.iterdir():
        if child.name.startswith(("config", "model", "generation_config")) or child.suffix == ".safetensors":
            child.unlink() if child.is_file() else shutil.rmtree(child)
    progress("torch_save", detail=reload_error[:300])
    torch.save(model, out / TORCH_SAVE_FILE)
    tokenizer.save_pretrained(out)
    return "torch.save", reload_error


_STACK_FILE = None  # the worker's stack dump file, open for its whole life


def _start_worker(spec_path: str) -> tuple[dict, _Progress]:
    """A peer worker's start-up: read its spec, dump every thread's stack on SIGUSR1 (what the parent reads when the
    worker times out), log to stderr and report the first progress phase."""
    import faulthandler

    spec = json.loads(Path(spec_path).read_text())
    global _STACK_FILE
    _STACK_FILE = open(spec["stack_path"], "w")  # noqa: SIM115 - must stay open for the signal handler
    faulthandler.register(signal.SIGUSR1, file=_STACK_FILE, all_threads=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    progress = _Progress(spec["progress_path"])
    progress("startup", pid=os.getpid())
    return spec, progress


def _worker_main(spec_path: str) -> int:
    import resource

    spec, progress = _start_worker(spec_path)

    import torch

    torch.manual_seed(0)
    result: dict[str, Any] = {"status": "failed", "reason": "", "output_dir": spec["output_dir"], "trials": []}
    phase = "startup"
    try:
        import torch_pruning

        if torch_pruning.__version__ != TORCH_PRUNING_VERSION:
            logger.warning("torch-pruning %s, expected %s", torch_pruning.__version__, TORCH_PRUNING_VERSION)
        phase = "search"
        best, trials, params_before = _search(spec, progress)
        model, tokenizer, record = best
        result.update(
            params_before=params_before,
            params_after=record["params_after"],
            removed_fraction=record["removed_fraction"],
            pruning_ratio=record["ratio"],
            trials=trials,
        )
        phase = "save"
        save_format, reload_error = _save_and_check(model, tokenizer, spec["output_dir"], progress)
        meta = {
            "save_format": save_format,
            "reload_error": reload_error,
            "model_dir": spec["model_dir"],
            "target_fraction": spec["target_fraction"],
            **{k: result[k] for k in ("params_before", "params_after", "removed_fraction", "pruning_ratio")},
            "notes": record["notes"],
        }
        Path(spec["output_dir"], META_FILE).write_text(json.dumps(meta, indent=2))
        off = abs(record["removed_fraction"] - spec["target_fraction"])
        reason = f"removed {record['removed_fraction']:.4f} of parameters at pruning_ratio={record['ratio']:.4f}"
        if off > spec["tolerance"]:
            reason += f" (closest of {len(trials)} trials; {off:.4f} off target)"
        if reload_error:
            reason += f"; saved with torch.save because {reload_error[:300]}"
        if record["notes"]:
            reason += "; " + "; ".join(record["notes"])
        result.update(status="ok", reason=reason, save_format=save_format, reload_error=reload_error, phase="done")
    except Exception as exc:  # a failing peer is a result, not a crash
        import traceback

        last = _last_progress(Path(spec["progress_path"]))
        # Report where the peer itself failed, not the re-raise in _annotated_importance.
        tb = traceback.extract_tb((exc.__cause__ or exc).__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name}" if tb else "?"
        result.update(
            status="failed",
            phase=last.get("phase", phase),
            reason=f"{type(exc).__name__} in phase '{last.get('phase', phase)}' at {where}: {exc}"[:3000],
            output_dir=None,
            trials=[p for p in _all_progress(Path(spec["progress_path"])) if p.get("phase") == "trial_done"],
        )
        logger.exception("torch-pruning peer failed")
    result["worker_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prune a local causal LM with Torch-Pruning (benchmark peer).")
    parser.add_argument("model_dir", help="local model directory, or an output dir for --make-mha-llama")
    parser.add_argument("target_fraction", type=float, nargs="?", default=0.2, help="fraction of all params to remove")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole worker")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--max-trials", type=int, default=8)
    parser.add_argument("--eval-text", default=None, help="also report perplexity of the saved model on this text")
    parser.add_argument("--eval-base", action="store_true", help="also report the unpruned perplexity")
    parser.add_argument(
        "--make-mha-llama",
        action="store_true",
        help="first write a random non-GQA LLaMA shaped like tiny-llama into model_dir, then prune it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.make_mha_llama:
        make_random_mha_llama(args.model_dir)
    result = prune_with_torch_pruning(
        args.model_dir,
        args.target_fraction,
        output_dir=args.output_dir,
        timeout_s=args.timeout,
        tolerance=args.tolerance,
        max_trials=args.max_trials,
    )
    if args.eval_text:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if args.eval_base:
            base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(args.model_dir)
            result["ppl_before"] = round(evaluate_perplexity(base, tok, args.eval_text), 3)
        if result["save_format"]:
            model, tok = load_pruned_model(result["output_dir"])
            result["ppl_after"] = round(evaluate_perplexity(model, tok, args.eval_text), 3)
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _WORKER_FLAG:
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit(_cli())
