"""Calibration: user data -> token batches, and the statistics criteria declare in `needs`.

Only what the chosen criterion needs is collected: nothing for weight-only criteria; per-channel activation statistics
from one no-grad forward pass with hooks (wanda_sp, flap, bip, block_influence); forward-only SPSA loss differences
(mini_llm, with the model's loss or each layer's own); gradients (and the Fisher diagonal) only for Taylor. So the memory of a run stays near the model's own
size unless backpropagation is required.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures.base import get_architecture
from .errors import PruneInputError
from .groups import decoder_layers, get_submodule_or_none, layer_prefix
from .importance.base import (
    ACTIVATIONS,
    BLOCK_LOSS,
    FISHER,
    FORWARD_LOSS,
    GRADIENTS,
    INPUT_GRAM,
    ROUTING,
    SPSA_DISTRIBUTIONS,
    SPSA_ESTIMATORS,
    WEIGHTS,
)
from .offload import (
    OffloadAwareParameters,
    OffloadedGradients,
    execution_device,
    input_device,
    keep_tied_weights,
    register_inner_forward_hooks,
)


logger = logging.getLogger(__name__)


def read_text_file(path: str) -> str:
    """The text of a .txt file, or of a .jsonl file's records' `text` fields joined by blank lines. A file that is
    not UTF-8 text, a line that is not a JSON object, or a `text` that is not a string is refused, naming the file
    (and the line)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise PruneInputError(
            f"{path} is not UTF-8 text (byte {err.start} cannot be decoded); give a UTF-8 .txt or .jsonl file."
        ) from None
    if "\x00" in text:
        raise PruneInputError(f"{path} holds NUL bytes, so it is binary, not text; give a UTF-8 .txt or .jsonl file.")
    if not path.endswith(".jsonl"):
        return text
    texts = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            texts.append(_jsonl_text(path, line_no, line))
    return "\n\n".join(texts)


def _jsonl_text(path: str, line_no: int, line: str) -> str:
    """The `text` string of one .jsonl record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PruneInputError(
            f"{path}:{line_no}: not valid JSON ({err.msg}); each line must be a JSON object."
        ) from None
    if not isinstance(record, dict) or "text" not in record:
        raise PruneInputError(f"{path}:{line_no}: every jsonl record needs a 'text' field.")
    if not isinstance(record["text"], str):
        raise PruneInputError(
            f"{path}:{line_no}: the 'text' field must be a string, got {type(record['text']).__name__}."
        )
    return record["text"]


def token_stream(data, tokenizer) -> torch.Tensor | list[torch.Tensor]:
    """A 1-D token stream, or a list of rows when the data already holds fixed token windows."""
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise TypeError(f"Calibration tensors must hold token ids (integer dtype), got {data.dtype}.")
        return data.long().flatten() if data.dim() == 1 else list(data.long())
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Calibration file {path!r} does not exist (expected a .txt or .jsonl file).")
        text = read_text_file(path)
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
    stream = token_stream(data, tokenizer)
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


class ActivationStatistics:
    """Per-input-channel running sums of one Linear's input over every calibration token.

    Only vectors of the layer's input width are kept ([in_features] each, float64 so that the variance computed as
    E[x²] - E[x]² does not cancel), never the activations themselves.
    """

    def __init__(self, channels: int, device):
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros_like(self.sum)
        self.sum_sq = torch.zeros_like(self.sum)
        # FLAP's online fluctuation estimator (`BiasGPT.add_batch`), one calibration window at a time.
        self.windows = 0
        self.window_mean = torch.zeros_like(self.sum)
        self.online_fluctuation = torch.zeros_like(self.sum)
        self.gram: torch.Tensor | None = None  # X^T X [C, C] in float64, kept for consumers under `input_gram`

    @torch.no_grad()
    def add_gram(self, x: torch.Tensor) -> None:
        """Add every token of `x` ([..., C]) to the Gram matrix."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, torch.float64)
        if self.gram is None:
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.gram.addmm_(x.T, x)

    @staticmethod
    @torch.no_grad()
    def batch_sums(x: torch.Tensor) -> tuple:
        """(tokens, Σx, Σ|x|, Σx², per-window Σx, per-window Σx²) of one batch: [C] each, the per-window sums
        [windows, C] (a window is one row of a [B, T, C] batch); float32 within a batch, float64 across batches."""
        windows = x.detach().reshape(x.shape[0] if x.dim() > 2 else 1, -1, x.shape[-1]).float()  # [B, T, C]
        x = windows.reshape(-1, x.shape[-1])  # [tokens, C]
        sums = (
            x.shape[0],
            x.sum(0),
            torch.linalg.vector_norm(x, 1, dim=0),
            torch.linalg.vector_norm(x, 2, dim=0) ** 2,
        )
        return (*sums, windows.sum(1), windows.pow(2).sum(1))

    def add(self, sums: tuple) -> None:
        count, total, total_abs, total_sq, window_sums, window_squares = sums
        self.count += count
        # Under `device_map` a hook may see the input before accelerate moves it to the module's device.
        self.sum += total.to(self.sum.device)
        self.sum_abs += total_abs.to(self.sum.device)
        self.sum_sq += total_sq.to(self.sum.device)
        tokens = count // window_sums.shape[0]
        for window_sum, window_sq in zip(window_sums.double(), window_squares.double()):
            self._add_window(tokens, window_sum.to(self.sum.device), window_sq.to(self.sum.device))

    def _add_window(self, tokens: int, window_sum: torch.Tensor, window_sq: torch.Tensor) -> None:
        """FLAP's `BiasGPT.add_batch` for one window, from its sums: the running mean of window means is updated
        first, and the window adds Σ_t (x_t - mean)² with that *new* mean twice (its `old_baseline_inp` aliases the
        tensor it updates in place), divided by the window count; the first window only sets the mean."""
        n = self.windows
        self.window_mean = self.window_mean * (n / (n + 1)) + window_sum / (tokens * (n + 1))
        if n > 0:
            mean = self.window_mean
            scatter = window_sq - 2 * mean * window_sum + tokens * mean * mean
            self.online_fluctuation = self.online_fluctuation * ((n - 1) / n) + scatter / (n + 1)
        self.windows += 1

    def update(self, x: torch.Tensor) -> None:
        """Add every token of `x` ([..., C])."""
        self.add(self.batch_sums(x))

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x_j| over tokens ([C]): LLM-BIP's and MINI-LLM's activation magnitude."""
        return (self.sum_abs / max(self.count, 1)).float().cpu()

    @property
    def mean(self) -> torch.Tensor:
        """Mean x_j over tokens ([C]): FLAP's baseline (what bias compensation folds in)."""
        return (self.sum / max(self.count, 1)).float().cpu()

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x_j²] over tokens ([C])."""
        return (self.sum_sq / max(self.count, 1)).float().cpu()

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens ([C]): Wanda's input-channel norm."""
        return self.sum_sq.sqrt().float().cpu()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of x_j over tokens ([C]): FLAP's fluctuation."""
        n = max(self.count, 1)
        mean = self.sum / n
        return (self.sum_sq / n - mean * mean).clamp_min(0).float().cpu()

    @property
    def flap_fluctuation(self) -> torch.Tensor:
        """FLAP's code's fluctuation ([C], `fluc_inp` of its `BiasGPT`): per-window scatter around the running mean,
        the first window left out; close to the variance times the tokens per window once windows are many."""
        return self.online_fluctuation.float().cpu()


SPSA_LOSSES = ("lm", "block")


def expert_hidden(experts: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
    """What expert `expert` of a fused-experts module (`gate_up_proj` [E, 2I, H]: gate rows, then up rows) feeds its
    `down_proj[expert]` for the tokens `hidden` [n, H]: act(gate) * up, [n, I], as the module computes it."""
    gate, up = nn.functional.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


class ExpertRouting:
    """Per expert of one MoE layer, over the calibration tokens: `count`, the (token, slot) pairs routed to it;
    `weighted_norm`, the sum over those pairs of gate weight x ||expert output||_2 (REAP's numerator). float64 [E]."""

    def __init__(self, num_experts: int):
        self.count = torch.zeros(num_experts, dtype=torch.float64)
        self.weighted_norm = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = 0

    def update(self, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights) -> None:
        """Record one forward of a fused-experts module (`mlp.experts`: `gate_up_proj` [E, 2I, H], `down_proj`
        [E, H, I]) from its inputs: each routed expert's output is computed as the module computes it."""
        self.tokens += hidden.shape[0]
        for expert in top_k_index.unique().tolist():
            if expert >= len(self.count):  # Transformers' padding index for dropped slots
                continue
            token, slot = torch.where(top_k_index == expert)
            output = nn.functional.linear(expert_hidden(experts, expert, hidden[token]), experts.down_proj[expert])
            weights = top_k_weights[token, slot].double()
            self.count[expert] += token.numel()
            self.weighted_norm[expert] += (weights * output.double().norm(dim=-1)).sum().item()


class Statistics:
    """What the pruner collected for a criterion: weights always, the rest on demand.

    - gradients / Fisher diagonal (`gradients`, `fisher` needs): per parameter, from backpropagation.
    - activations (`activations` need): per-input-channel statistics of every Linear whose weight is scored
      ([`ActivationStatistics`], keyed by the weight's name), and per decoder layer the mean 1 - cos(input, output)
      of its hidden states (ShortGPT's block influence).
    - forward-only gradient estimates (`forward_loss` need): SPSA, computed on first use by
      [`~Statistics.spsa_gradient`] from the kept calibration batches, one perturbation tensor at a time.
    """

    def __init__(self, model: nn.Module, batches: torch.Tensor | None = None, param_names=None, batch_size: int = 4):
        self.model = model
        # Offloaded weights (`device_map` with "cpu"/"disk") are read from accelerate's weights map on access.
        keep_tied_weights(model)
        self._params = OffloadAwareParameters(model)
        self.gradients: dict[str, torch.Tensor] = {}
        self.fishers: dict[str, torch.Tensor] = {}
        self.activations: dict[str, ActivationStatistics] = {}
        self.layer_influences: dict[int, float] = {}
        self.routing: dict[int, ExpertRouting] = {}
        self.num_samples = 0
        self.batches = batches
        self.batch_size = batch_size
        self.param_names = sorted(param_names) if param_names is not None else sorted(self._params)
        self._spsa: dict[tuple, dict[str, list[float]]] = {}
        self.calibration_forward = None  # streaming: runs its one layer on the captured inputs
        self._spec = None

    @property
    def spec(self):
        """The architecture spec of the model (looked up by `model_type`), for criteria that couple structures."""
        if self._spec is None:
            self._spec = get_architecture(self.model.config.model_type)
        return self._spec

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

    def activation(self, name: str) -> ActivationStatistics:
        """Input statistics of the Linear whose weight is `name` (e.g. `"model.layers.0.mlp.down_proj.weight"`)."""
        if name not in self.activations:
            raise KeyError(
                f"No activation statistics were collected for {name!r}; the criterion must declare 'activations' "
                "and the parameter must be the weight of an nn.Linear."
            )
        return self.activations[name]

    def expert_routing(self, layer: int) -> ExpertRouting:
        """What the router of MoE layer `layer` did over the calibration tokens (`routing` need)."""
        if layer not in self.routing:
            raise KeyError(
                f"No routing statistics were collected for layer {layer}; the criterion must declare 'routing'."
            )
        return self.routing[layer]

    def layer_influence(self, layer: int) -> float:
        """Mean over calibration tokens of 1 - cos(h_in, h_out) for decoder layer `layer` (ShortGPT, Eq. 1)."""
        if layer not in self.layer_influences:
            raise KeyError(f"No block influence was collected for layer {layer}; declare 'activations'.")
        return self.layer_influences[layer]

    def spsa_gradient(
        self,
        name: str,
        num_perturbations: int = 8,
        eps: float = 1e-3,
        distribution: str = "gaussian",
        estimator: str = "multiply",
        seed: int = 0,
        loss: str = "lm",
    ) -> torch.Tensor:
        """Forward-only (SPSA) estimate of d loss / d `name`, shaped like the parameter (float32).

        The scalar projected gradients d_k = (L(W + εz_k) - L(W - εz_k)) / 2ε are computed once per setting, for every
        perturbed parameter together; z_k for this one parameter is then regenerated from its seed, so only one
        tensor's perturbation exists at a time. `loss="lm"` is the model's next-token loss (2 · `num_perturbations`
        passes over the calibration batches, [`spsa_projected_gradients`]); `loss="block"` is the block-local loss of
        the decoder layer that owns `name` ([`block_spsa_projected_gradients`]: only that layer is run again).
        `estimator="multiply"` gives MeZO's Ĝ = mean_k d_k · z_k (default: lower variance); `"divide"` gives
        classical SPSA's Ĝ = mean_k d_k / z_k (identical for Rademacher z).
        """
        if estimator not in SPSA_ESTIMATORS:
            raise ValueError(f"`estimator` must be one of {SPSA_ESTIMATORS}, got {estimator!r}.")
        if loss not in SPSA_LOSSES:
            raise ValueError(f"`loss` must be one of {SPSA_LOSSES}, got {loss!r}.")
        if name not in self.param_names:
            raise KeyError(f"{name!r} was not perturbed; SPSA covers the scored parameters only.")
        key = (loss, num_perturbations, float(eps), distribution, seed)
        if key not in self._spsa:
            settings = dict(num_perturbations=num_perturbations, eps=eps, distribution=distribution, seed=seed)
            if loss == "block":
                self._spsa[key] = block_spsa_projected_gradients(
                    self.model, self.spec, self.run_calibration, self.param_names, **settings
                )
            else:
                if self.batches is None:
                    raise ValueError("Forward-only gradient estimates need calibration data.")
                projected = spsa_projected_gradients(
                    self.model, self.batches, self.param_names, batch_size=self.batch_size, **settings
                )
                self._spsa[key] = dict.fromkeys(self.param_names, projected)
        param = self._params[name]
        device = self._params.execution_device(name)  # where the forward drew z (an offloaded weight's GPU)
        estimate = torch.zeros(param.shape, dtype=torch.float32, device=device)
        projected = self._spsa[key][name]
        for k, d in enumerate(projected):
            z = spsa_perturbation(param, name, k, distribution, seed, device=device)
            estimate += d * (z if estimator == "multiply" else z.reciprocal())
        return (estimate / len(projected)).to(param.device)

    def run_calibration(self) -> None:
        """Run the calibration forwards again, outputs discarded, so that hooks see every decoder layer's inputs.

        A model in memory runs its batches; streaming sets `calibration_forward` to run its one layer on that layer's
        captured inputs."""
        if self.calibration_forward is not None:
            self.calibration_forward()
            return
        if self.batches is None:
            raise ValueError("Forward-only gradient estimates need calibration data.")
        device = _device_of(self.model)
        for start in range(0, len(self.batches), self.batch_size):
            self.model(input_ids=self.batches[start : start + self.batch_size].to(device), use_cache=False)


def spsa_perturbation(
    param: torch.Tensor, name: str, k: int, distribution: str, seed: int, device: torch.device | None = None
) -> torch.Tensor:
    """z_k of the parameter called `name`: regenerated from a seed, never stored, and the same whatever else is
    perturbed (a layer streamed alone draws what it draws inside the whole model).

    Returns a float32 tensor shaped like `param`, drawn on `device` (default: the parameter's; the stream depends on
    the device, so it must be where the forward drew it).
    """
    device = param.device if device is None else device
    generator = torch.Generator(device=device).manual_seed(_seed(seed, k, zlib.crc32(name.encode())))
    if distribution == "gaussian":
        return torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
    if distribution == "rademacher":
        bits = torch.randint(0, 2, param.shape, generator=generator, device=device)
        return bits.to(torch.float32).mul_(2).sub_(1)
    raise ValueError(f"`distribution` must be one of {SPSA_DISTRIBUTIONS}, got {distribution!r}.")


def _seed(seed: int, k: int, key: int) -> int:
    return (seed * 1_000_003 + k * 65_537 + key) % (2**63)


def _check_spsa_settings(num_perturbations: int, eps: float, distribution: str) -> None:
    if num_perturbations < 1:
        raise ValueError(f"`num_perturbations` must be >= 1, got {num_perturbations}.")
    if not eps > 0:
        raise ValueError(f"`eps` must be > 0, got {eps}.")
    if distribution not in SPSA_DISTRIBUTIONS:
        raise ValueError(f"`distribution` must be one of {SPSA_DISTRIBUTIONS}, got {distribution!r}.")


class SPSAPerturbation:
    """While `active`, every module that owns a parameter of `param_names` computes with W + `sign`·ε·z_`k`.

    The weights are never written. A forward pre-hook on each owner swaps in `W ± εz` (z regenerated from the
    parameter's seed) for the duration of that module's call, and a forward hook puts the original Parameter object
    back (under `device_map`, inside accelerate's hook, once the offloaded weights are loaded: see
    `offload.register_inner_forward_hooks`). So at most one module's perturbed tensors exist at a time, nothing is
    kept between calls, no `.grad` buffer is created, and the model is bit-identical afterwards by construction (MeZO's
    in-place `W += εz; W -= 2εz; W += εz` is not: floating-point addition does not round-trip). A context manager: on
    exit (a forward that raised included) the hooks are removed and every original is back.
    """

    def __init__(self, model: nn.Module, param_names, eps: float, distribution: str, seed: int):
        params = dict(model.named_parameters())
        wanted = {id(params[n]): n for n in param_names}
        self.owners: dict[nn.Module, list[tuple[str, str]]] = {}
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in wanted:  # tied tensors: every owner perturbs with the same z
                    self.owners.setdefault(module, []).append((attr, wanted[id(p)]))
        self.eps, self.distribution, self.seed = eps, distribution, seed
        self.k, self.sign, self.active = 0, 1.0, True
        self._saved: dict[tuple[int, str], tuple[nn.Module, torch.Tensor]] = {}
        self._handles: list = []

    def _swap_in(self, module, args):
        if not self.active:
            return
        for attr, name in self.owners[module]:
            original = module._parameters[attr]
            self._saved[(id(module), attr)] = (module, original)
            z = spsa_perturbation(original, name, self.k, self.distribution, self.seed)
            # In place on the fresh z, never on the weight: W ± εz in at least float32, then the weight's dtype.
            z = z.to(torch.promote_types(original.dtype, torch.float32))
            module._parameters[attr] = z.mul_(self.sign * self.eps).add_(original.detach()).to(original.dtype)

    def _swap_out(self, module, args, output):
        for attr, _ in self.owners[module]:
            if (id(module), attr) in self._saved:
                module._parameters[attr] = self._saved.pop((id(module), attr))[1]

    def __enter__(self) -> SPSAPerturbation:
        for module in self.owners:
            self._handles += register_inner_forward_hooks(module, self._swap_in, self._swap_out)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for (_, attr), (module, original) in self._saved.items():  # a forward that raised: put every original back
            module._parameters[attr] = original
        self._saved.clear()


def _calibration_loss(model: nn.Module, batches: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over all calibration batches, reduced in float64: the SPSA difference L+ - L- is ~ε times
    smaller than L, so float32 rounding of the loss (Transformers' loss upcasts to float32 only) would swamp it."""
    device = _device_of(model)
    total, tokens = 0.0, 0
    for start in range(0, len(batches), batch_size):
        input_ids = batches[start : start + batch_size].to(device)
        logits = model(input_ids=input_ids, use_cache=False).logits  # [B, T, V]
        targets = input_ids[:, 1:].reshape(-1)
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).double(), targets, reduction="sum"
        )
        total += nll.item()
        tokens += targets.numel()
    return total / tokens


@torch.no_grad()
def spsa_projected_gradients(
    model: nn.Module,
    batches: torch.Tensor,
    param_names: list[str],
    num_perturbations: int = 8,
    eps: float = 1e-3,
    distribution: str = "gaussian",
    seed: int = 0,
    batch_size: int = 4,
) -> list[float]:
    """d_k = (L(W + εz_k) - L(W - εz_k)) / 2ε for k < `num_perturbations` (MINI-LLM Eq. 7, MeZO's SPSA), L the
    model's next-token loss on the calibration batches; the weights are perturbed by [`SPSAPerturbation`]."""
    _check_spsa_settings(num_perturbations, eps, distribution)
    was_training = model.training
    model.eval()
    projected = []
    try:
        with SPSAPerturbation(model, param_names, eps, distribution, seed) as perturbation:
            for k in tqdm(range(num_perturbations), desc="SPSA", leave=False):
                perturbation.k = k
                perturbation.sign = 1.0
                loss_plus = _calibration_loss(model, batches, batch_size)
                perturbation.sign = -1.0
                loss_minus = _calibration_loss(model, batches, batch_size)
                projected.append((loss_plus - loss_minus) / (2 * eps))
    finally:
        model.train(was_training)
    return projected


def layer_output(output) -> torch.Tensor:
    """A decoder layer's output hidden states (layers return a tensor or a tuple that starts with it)."""
    return output[0] if isinstance(output, tuple) else output


def block_loss_noise(output: torch.Tensor, seed: int, layer: int, batch: int) -> torch.Tensor:
    """ξ of the block-local loss for decoder layer `layer` at calibration batch `batch`: N(0, I) shaped like the
    layer's `output`, float64, regenerated from the seed (so the in-memory and the streamed layer draw the same)."""
    generator = torch.Generator(device=output.device).manual_seed(_seed(seed, batch, 7_919 * (layer + 1)))
    return torch.randn(output.shape, generator=generator, device=output.device, dtype=torch.float64)


@torch.no_grad()
def block_spsa_projected_gradients(
    model: nn.Module,
    spec,
    run_calibration,
    param_names: list[str],
    num_perturbations: int = 8,
    eps: float = 1e-3,
    distribution: str = "gaussian",
    seed: int = 0,
) -> dict[str, list[float]]:
    """MINI-LLM's Eq. 7 with a block-local loss: d_k = (L_l(W + εz_k) - L_l(W - εz_k)) / 2ε for every decoder layer l
    that owns a perturbed parameter, from forward passes of that layer alone. Returns each parameter's layer's d_k.

    L_l is the change of the block's output, measured as a Gaussian log-likelihood with a sampled target:
    L_l(W) = Σ_t ‖f_l(x_t; W) - f_l(x_t; W₀) - ξ_t‖² / 2T over the T calibration tokens, ξ_t ~ N(0, I) drawn once per
    token (seeded). Its gradient at W₀ is -Jᵀξ, whose square is on average diag(JᵀJ): the Fisher diagonal of the block
    output, i.e. how much each weight moves the block's output (the sampled-target trick K-FAC uses for the Fisher).
    Without ξ the loss is flat at W₀ (zero gradient); with the LM loss every layer would need the whole model.

    `run_calibration()` must run the calibration forwards once (the whole model, or one streamed layer on its captured
    inputs): a forward hook on each such layer re-runs it on the same inputs with W ± εz_k for every k (2 ·
    `num_perturbations` layer forwards per batch). Sums are float64: L+ - L- is ~ε times smaller than L.
    """
    _check_spsa_settings(num_perturbations, eps, distribution)
    layers = decoder_layers(model, spec)
    owned = {i: [n for n in param_names if n.startswith(layer_prefix(spec, i))] for i in range(len(layers))}
    owned = {i: names for i, names in owned.items() if names}
    sums = {i: [0.0] * num_perturbations for i in owned}
    tokens = dict.fromkeys(owned, 0)
    calls = dict.fromkeys(owned, 0)
    perturbation = SPSAPerturbation(model, param_names, eps, distribution, seed)
    perturbation.active = False

    def layer_hook(module, args, kwargs, output, i):
        if perturbation.active:  # the re-runs below
            return
        base = layer_output(output)
        target = block_loss_noise(base, seed, i, calls[i]).add_(base.double())
        perturbation.active = True
        try:
            for k in range(num_perturbations):
                perturbation.k = k
                perturbation.sign = 1.0
                plus = layer_output(module(*args, **kwargs)).double()
                perturbation.sign = -1.0
                minus = layer_output(module(*args, **kwargs)).double()
                # ½‖a‖² - ½‖b‖² = (a - b)·(a + b)/2 with a, b = f± - target: no cancellation of two large sums.
                sums[i][k] += ((plus - minus) * ((plus + minus) / 2 - target)).sum().item()
        finally:
            perturbation.active = False
        calls[i] += 1
        tokens[i] += base.shape[:-1].numel()

    was_training = model.training
    model.eval()
    handles = [
        layers[i].register_forward_hook(lambda m, a, kw, o, i=i: layer_hook(m, a, kw, o, i), with_kwargs=True)
        for i in owned
    ]
    try:
        with perturbation:
            run_calibration()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    projected = {}
    for i, names in owned.items():
        if not tokens[i]:
            raise RuntimeError(f"The calibration forwards did not reach decoder layer {i}.")
        d = [s / (2 * eps * tokens[i]) for s in sums[i]]
        projected.update(dict.fromkeys(names, d))
    return projected


def _device_of(model: nn.Module) -> torch.device:
    return input_device(model)


def consumer_weight_names(spec, names) -> set[str]:
    """The weights among `names` of the Linears that read pruned units (each spec's `consumer=True` members)."""
    suffixes = tuple(m.name for st in spec.structures.values() for m in st.members if m.consumer and m.dim == 1)
    return {n for n in names if suffixes and n.endswith(suffixes)}


def hook_linear_inputs(stats: Statistics, linears, grams=frozenset()) -> list:
    """Forward pre-hooks that accumulate each Linear's per-input-channel statistics into `stats.activations` (keyed by
    the weight's name), for `linears` = [(weight name, module)], and for the weights named in `grams` the Gram matrix
    of their inputs too (`input_gram`). Returns the handles; remove them when done.

    Projections that read the same tensor (q/k/v, gate/up) share one reduction: the last input is held, by reference,
    until the next hook call (and released with the hooks). Each record lives on the device its module computes on
    (its weight may be a meta tensor when offloaded)."""
    last: dict = {"input": None, "sums": None}
    handles = []
    for weight_name, module in linears:
        record = ActivationStatistics(module.in_features, execution_device(module) or module.weight.device)
        stats.activations[weight_name] = record

        def linear_hook(mod, args, record=record, gram=weight_name in grams):
            if args[0] is not last["input"]:
                last["input"], last["sums"] = args[0], ActivationStatistics.batch_sums(args[0])
            record.add(last["sums"])
            if gram:
                record.add_gram(args[0])

        handles.append(module.register_forward_pre_hook(linear_hook))
    return handles


@torch.no_grad()
def _collect_activations(stats: Statistics, batches: torch.Tensor, batch_size: int, grams: bool = False) -> None:
    """One forward pass over the calibration batches with hooks: Linear input statistics (with `grams`, the consumers'
    input Gram matrices) and block influence."""
    model = stats.model
    wanted = set(stats.param_names)
    wanted_ids = {id(p) for n, p in model.named_parameters() if n in wanted}  # tied weights under another name
    linears = [
        (f"{name}.weight" if name else "weight", module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and ((f"{name}.weight" if name else "weight") in wanted or id(module.weight) in wanted_ids)
    ]
    handles = hook_linear_inputs(stats, linears, consumer_weight_names(stats.spec, wanted) if grams else ())
    try:
        layers = decoder_layers(model, stats.spec)
    except ValueError:
        layers = []  # no registered spec for this model: no block influence
    influence_sums = [0.0] * len(layers)
    token_counts = [0] * len(layers)
    for i, layer in enumerate(layers):

        def layer_hook(mod, args, kwargs, output, i=i):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            hidden_in = hidden_in.to(hidden_out.device)  # layers on different devices under `device_map`
            cos = nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # [B, T]
            influence_sums[i] += (1 - cos).double().sum().item()
            token_counts[i] += cos.numel()

        handles.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
    device = _device_of(model)
    try:
        for start in tqdm(range(0, len(batches), batch_size), desc="Activations", leave=False):
            model(input_ids=batches[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for i in range(len(layers)):
        stats.layer_influences[i] = influence_sums[i] / max(token_counts[i], 1)


def hook_expert_routing(stats: Statistics, layers) -> list:
    """Pre-hooks recording, into `stats.routing[i]`, what the experts module (`spec.extra["experts_module"]`) of each
    `(i, layer)` in `layers` receives: the hidden states and the router's top-k choice and weights. Returns the
    handles; dense layers (Qwen3-MoE's `mlp_only_layers`) and models without MoE get none."""
    path = stats.spec.extra.get("experts_module")
    handles = []
    for i, layer in layers:
        experts = get_submodule_or_none(layer, path) if path else None
        if experts is None:
            continue
        record = stats.routing[i] = ExpertRouting(experts.gate_up_proj.shape[0])

        def hook(module, args, record=record):
            record.update(module, *args[:3])

        handles.append(experts.register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def _collect_routing(stats: Statistics, batches: torch.Tensor, batch_size: int) -> None:
    """One forward pass with a hook on every MoE layer's experts module (`spec.extra["experts_module"]`), whose inputs
    are the hidden states and the router's top-k choice and weights."""
    model = stats.model
    handles = hook_expert_routing(stats, enumerate(decoder_layers(model, stats.spec)))
    device = _device_of(model)
    try:
        for start in tqdm(range(0, len(batches), batch_size), desc="Routing", leave=False):
            model(input_ids=batches[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def collect_statistics(
    model: nn.Module, batches: torch.Tensor | None, needs, param_names=None, batch_size: int = 4
) -> Statistics:
    """Run the calibration batches and collect what `needs` asks for.

    - `activations`: one gradient-free forward pass with hooks (per-channel vectors only, see [`Statistics`]).
    - `forward_loss`, `block_loss`: nothing now; the SPSA loss evaluations run on first use with the criterion's
      settings.
    - `gradients`: the mean over samples of the LM-loss gradient (LLM-Pruner's single batched backward).
    - `fisher`: the mean of per-sample squared gradients, so one backward per sample.
    """
    needs = set(needs)
    stats = Statistics(model, batches, param_names, batch_size)
    stats.num_samples = 0 if batches is None else len(batches)
    if needs & {ACTIVATIONS, INPUT_GRAM, FORWARD_LOSS, BLOCK_LOSS, GRADIENTS, FISHER, ROUTING} and batches is None:
        raise ValueError(f"This criterion needs calibration data (it uses {sorted(needs - {WEIGHTS})}).")
    if ROUTING in needs:
        was_training = model.training
        model.eval()
        try:
            _collect_routing(stats, batches, batch_size)
        finally:
            model.train(was_training)
    if needs & {ACTIVATIONS, INPUT_GRAM}:
        was_training = model.training
        model.eval()
        try:
            _collect_activations(stats, batches, batch_size, grams=INPUT_GRAM in needs)
        finally:
            model.train(was_training)
    if not ({GRADIENTS, FISHER} & needs):
        return stats
    names = set(stats.param_names)
    # Offloaded parameters are meta tensors whose `.grad` never fills: their gradients come from the Parameters
    # accelerate builds for each forward (`OffloadedGradients`, on the CPU); the others from `p.grad` as usual.
    offloaded = OffloadedGradients(model, names)
    params = {n: p for n, p in model.named_parameters() if n in names and n not in offloaded.names}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    was_training = model.training
    model.eval()
    per_sample = FISHER in needs
    step = 1 if per_sample else batch_size
    device = _device_of(model)
    try:
        with offloaded:
            for start in tqdm(range(0, len(batches), step), desc="Gradients", disable=len(batches) <= step):
                input_ids = batches[start : start + step].to(device)
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=input_ids, labels=input_ids).loss
                (loss * input_ids.shape[0]).backward()
                grads = {n: p.grad.detach().float() for n, p in params.items() if p.grad is not None}
                grads.update(offloaded.collect())
                for n, g in grads.items():
                    stats.gradients[n] = stats.gradients.get(n, 0) + g
                    if per_sample:
                        stats.fishers[n] = stats.fishers.get(n, 0) + g * g
        stats.num_samples = len(batches)
        for store in (stats.gradients, stats.fishers):
            for n in store:
                store[n] /= len(batches)
    finally:
        model.zero_grad(set_to_none=True)
        # Read again: accelerate replaces an offloaded module's (meta) Parameter objects at each forward.
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
        model.train(was_training)
    return stats
