"""Evaluation helpers shared by the CLI, the demo and the benchmarks: perplexity, parameter counts, summary tables."""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from .offload import input_device


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def _eval_ids(data, tokenizer) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.long().flatten()
    if isinstance(data, (str, os.PathLike)) and os.path.isfile(data):
        with open(data, encoding="utf-8") as f:
            text = f.read()
    elif isinstance(data, str):
        text = data
    else:
        raise TypeError(f"Evaluation data must be a text file path, a string or token ids, got {type(data).__name__}.")
    if tokenizer is None:
        raise ValueError("Text evaluation data needs a tokenizer.")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(
    model: nn.Module, data, tokenizer=None, seq_len: int = 256, max_windows: int | None = 64, batch_size: int = 8
) -> float:
    """Perplexity over consecutive non-overlapping windows of `seq_len` tokens from the start of `data`.

    Every window predicts its tokens 2..seq_len, so the number is comparable across models with the same tokenizer
    (the shared models' READMEs use 64 windows of 256 tokens).
    """
    ids = _eval_ids(data, tokenizer)
    num_windows = ids.numel() // seq_len
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise ValueError(f"Evaluation data has {ids.numel()} tokens, fewer than one window of {seq_len}.")
    windows = ids[: num_windows * seq_len].view(num_windows, seq_len)
    device = input_device(model)  # not a meta tensor's device under `device_map` offloading
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for start in tqdm(range(0, num_windows, batch_size), desc="Perplexity", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / tokens)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (readable in a terminal and pasteable into README)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def summary_table(before: dict, after: dict) -> str:
    """Before/after table of parameters (and perplexity when measured)."""
    rows = [
        [
            "parameters",
            f"{before['parameters']:,}",
            f"{after['parameters']:,}",
            f"{after['parameters'] / before['parameters']:.3f}",
        ]
    ]
    if before.get("perplexity") is not None and after.get("perplexity") is not None:
        rows.append(
            [
                "perplexity",
                f"{before['perplexity']:.2f}",
                f"{after['perplexity']:.2f}",
                f"{after['perplexity'] / before['perplexity']:.3f}",
            ]
        )
    return format_table(["", "before", "after", "ratio"], rows)
