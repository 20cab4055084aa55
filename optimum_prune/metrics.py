"""Measurements of a model that every engine reports: parameter counts and perplexity on held-out text."""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import read_text_file
from .errors import PruneInputError
from .offload import input_device


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


TEXT_FILE_SUFFIXES = (".txt", ".jsonl")


def names_a_file(data: str) -> bool:
    """Whether the string `data` is meant as a file path rather than text: one line that ends in .txt/.jsonl, or that
    holds a path separator and no space (text such as "and/or" has spaces around it)."""
    if "\n" in data:
        return False
    return data.endswith(TEXT_FILE_SUFFIXES) or (("/" in data or os.sep in data) and " " not in data.strip())


def _eval_ids(data, tokenizer) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.long().flatten()
    if isinstance(data, (str, os.PathLike)) and os.path.isfile(data):
        text = read_text_file(os.fspath(data))
    elif isinstance(data, os.PathLike) or (isinstance(data, str) and names_a_file(data)):
        raise PruneInputError(
            f"Evaluation file {os.fspath(data)!r} does not exist; give an existing .txt or .jsonl file (or the text "
            "itself, which is not read as a path when it spans lines or has no path separator or file ending)."
        )
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
