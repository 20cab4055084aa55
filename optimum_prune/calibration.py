"""Calibration: user data -> token batches, and the statistics criteria declare in `needs`.

Only what the chosen criterion needs is collected: nothing for weight-only criteria, gradients (and the Fisher
diagonal) only for Taylor, so the memory of a run stays near the model's own size unless backpropagation is required.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .importance.base import FISHER, GRADIENTS


logger = logging.getLogger(__name__)


def _read_text_file(path: str) -> str:
    if path.endswith(".jsonl"):
        texts = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if "text" not in record:
                    raise ValueError(f"{path}:{line_no}: every jsonl record needs a 'text' field.")
                texts.append(record["text"])
        return "\n\n".join(texts)
    with open(path, encoding="utf-8") as f:
        return f.read()


def _token_stream(data, tokenizer) -> torch.Tensor | list[torch.Tensor]:
    """A 1-D token stream, or a list of rows when the data already holds fixed token windows."""
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise TypeError(f"Calibration tensors must hold token ids (integer dtype), got {data.dtype}.")
        return data.long().flatten() if data.dim() == 1 else list(data.long())
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Calibration file {path!r} does not exist (expected a .txt or .jsonl file).")
        text = _read_text_file(path)
    elif hasattr(data, "column_names"):  # datasets.Dataset
        if "input_ids" in data.column_names:
            return [torch.tensor(row, dtype=torch.long) for row in data["input_ids"]]
        if "text" not in data.column_names:
            raise ValueError(f"A calibration Dataset needs a 'text' or 'input_ids' column, got {data.column_names}.")
        text = "\n\n".join(data["text"])
    elif isinstance(data, Iterable):
        items = list(data)
        if not all(isinstance(t, str) for t in items):
            raise TypeError("A calibration list must hold strings.")
        text = "\n\n".join(items)
    else:
        raise TypeError(
            "Calibration data must be a datasets.Dataset, a list of strings, a path to a .txt/.jsonl file or a "
            f"LongTensor of token ids, got {type(data).__name__}."
        )
    if tokenizer is None:
        raise ValueError("Text calibration data needs a tokenizer; pass `tokenizer=` or token ids.")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def prepare_calibration(data, tokenizer, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens ([num_samples, seq_len]), drawn at seeded random offsets the way
    LLM-Pruner samples its calibration examples."""
    stream = _token_stream(data, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(stream, list):  # fixed rows: take the first seq_len tokens of each long-enough row
        rows = [row[:seq_len] for row in stream if row.numel() >= seq_len]
        if not rows:
            longest = max((row.numel() for row in stream), default=0)
            raise ValueError(
                f"Calibration data is shorter than `calibration_seq_len` ({seq_len} tokens): its longest row has "
                f"{longest}. Lower `calibration_seq_len` or provide longer samples."
            )
        order = torch.randperm(len(rows), generator=generator)[:num_samples]
        return torch.stack([rows[i] for i in order.tolist()])
    if stream.numel() < seq_len:
        raise ValueError(
            f"Calibration data is shorter than `calibration_seq_len`: {stream.numel()} tokens < {seq_len}. Lower "
            "`calibration_seq_len` or provide more text."
        )
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


class Statistics:
    """What the pruner collected for a criterion: weights always, gradients / Fisher diagonal on demand."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._params = dict(model.named_parameters())
        self.gradients: dict[str, torch.Tensor] = {}
        self.fishers: dict[str, torch.Tensor] = {}
        self.num_samples = 0

    def parameter(self, name: str) -> torch.Tensor:
        return self._params[name]

    def gradient(self, name: str) -> torch.Tensor:
        if name not in self.gradients:
            raise KeyError(f"No gradient was collected for {name!r}; the criterion must declare 'gradients'.")
        return self.gradients[name]

    def fisher(self, name: str) -> torch.Tensor:
        if name not in self.fishers:
            raise KeyError(f"No Fisher diagonal was collected for {name!r}; the criterion must declare 'fisher'.")
        return self.fishers[name]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def collect_statistics(
    model: nn.Module, batches: torch.Tensor | None, needs, param_names=None, batch_size: int = 4
) -> Statistics:
    """Run the calibration batches and collect what `needs` asks for.

    Gradients are the mean over samples of the LM-loss gradient (LLM-Pruner's single batched backward). The Fisher
    diagonal is the mean of per-sample squared gradients, so it needs one backward per sample.
    """
    stats = Statistics(model)
    if not ({GRADIENTS, FISHER} & set(needs)):
        return stats
    if batches is None:
        raise ValueError("This criterion needs calibration data (it uses gradients of the LM loss).")
    names = set(param_names) if param_names is not None else set(stats._params)
    params = {n: p for n, p in stats._params.items() if n in names}
    requires_grad = {n: p.requires_grad for n, p in stats._params.items()}
    for n, p in stats._params.items():
        p.requires_grad_(n in params)
    was_training = model.training
    model.eval()
    per_sample = FISHER in needs
    step = 1 if per_sample else batch_size
    device = _device_of(model)
    try:
        for start in tqdm(range(0, len(batches), step), desc="Gradients", disable=len(batches) <= step):
            input_ids = batches[start : start + step].to(device)
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            (loss * input_ids.shape[0]).backward()
            for n, p in params.items():
                if p.grad is None:
                    continue
                g = p.grad.detach().float()
                stats.gradients[n] = stats.gradients.get(n, 0) + g
                if per_sample:
                    stats.fishers[n] = stats.fishers.get(n, 0) + g * g
        stats.num_samples = len(batches)
        for store in (stats.gradients, stats.fishers):
            for n in store:
                store[n] /= len(batches)
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in stats._params.items():
            p.requires_grad_(requires_grad[n])
        model.train(was_training)
    return stats
