"""The dtype calibration arithmetic runs in (`PrunerConfig.compute_dtype`), and running a model's layers in it.

Most checkpoints ship in bfloat16, and most CPUs have no native bfloat16: PyTorch's bfloat16 matmul there is a slow
fallback (on AVX2, 5x to 250x slower than float32 depending on the op and shape). So on such CPUs the layers are
computed in float32, one layer (or module) at a time, and the weights stay, and are written, in the checkpoint's dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .offload import offloaded_parameters, register_inner_forward_hooks


logger = logging.getLogger(__name__)

AUTO = "auto"
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_DTYPE_CHOICES = (AUTO, *COMPUTE_DTYPES)


def check_compute_dtype(value) -> None:
    """Refuse anything but the names in `COMPUTE_DTYPE_CHOICES`."""
    if not isinstance(value, str) or value not in COMPUTE_DTYPE_CHOICES:
        raise ValueError(f"`compute_dtype` must be one of {list(COMPUTE_DTYPE_CHOICES)}, got {value!r}.")


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes `dtype` natively: bfloat16 with AVX512-BF16 or AMX tiles, float16 with AMX-FP16.
    `torch.backends.cpu.get_cpu_capability()` names only the vector ISA level (`AVX2`, `AVX512`), not these
    extensions, so PyTorch's own CPU feature probes (`torch.cpu._is_*_supported`) decide."""
    probes = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }.get(dtype)
    if probes is None:
        return True  # float32, float64
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def cpu_capability() -> str:
    """What benchmarks print beside their numbers: the ISA level PyTorch dispatches to and the native half types."""
    native = [name for name, dtype in COMPUTE_DTYPES.items() if dtype != torch.float32 and cpu_has_native(dtype)]
    return f"{torch.backends.cpu.get_cpu_capability()} (native: {', '.join(native) or 'no half types'})"


def resolve_compute_dtype(setting: str, checkpoint_dtype: torch.dtype, device="cpu") -> torch.dtype:
    """The dtype calibration computes in, for weights stored in `checkpoint_dtype` and run on `device`.

    `"auto"`: on CUDA (or any accelerator) the checkpoint's dtype; on the CPU the checkpoint's dtype where the CPU has
    it natively (see [`cpu_has_native`]), else float32. A named dtype is used as given, unless it cannot hold every
    value of the checkpoint exactly (float32 computed in bfloat16): the weights the run writes are the computed ones,
    so they are never rounded; the checkpoint's dtype is used then, with a warning.
    """
    check_compute_dtype(setting)
    if not checkpoint_dtype.is_floating_point:
        return checkpoint_dtype
    if setting == AUTO:
        on_cpu = torch.device(device).type == "cpu"
        return torch.float32 if on_cpu and not cpu_has_native(checkpoint_dtype) else checkpoint_dtype
    wanted = COMPUTE_DTYPES[setting]
    if wanted == checkpoint_dtype or _holds_exactly(wanted, checkpoint_dtype):
        return wanted
    logger.warning(
        "compute_dtype=%r would round the %s weights; computing in %s instead.",
        setting,
        checkpoint_dtype,
        checkpoint_dtype,
    )
    return checkpoint_dtype


def _holds_exactly(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every `narrow` value is a `wide` value (float32 holds bfloat16 and float16)."""
    wide_info, narrow_info = torch.finfo(wide), torch.finfo(narrow)
    return wide_info.bits > narrow_info.bits and wide_info.max >= narrow_info.max and wide_info.eps <= narrow_info.eps


def upcast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype` where that holds each of its values exactly (bfloat16 -> float32), else unchanged: the
    weights a run writes back are never rounded."""
    if tensor.is_floating_point() and _holds_exactly(dtype, tensor.dtype):
        return tensor.to(dtype)
    return tensor


def cast_floating(value, dtype: torch.dtype):
    """`value` with every floating-point tensor in it (inside tuples, lists and dicts too) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value


class ComputeIn:
    """While active, `model`'s forward computes in `dtype` one unit at a time, its weights staying in their dtype.

    The units are the decoder layers and every other module that owns weights (norms, the LM head): a unit's
    floating-point parameters are replaced by `dtype` copies just before its forward and put back after it, so at most
    one unit's copy exists at a time (in a forward without gradients). The input embeddings are not copied: a lookup is
    exact in any dtype, so their output is cast instead; everything the model builds from it (causal masks, rotary
    tables) then has `dtype` too. Under `device_map` the copies are made inside accelerate's hook, once it has loaded
    the offloaded weights.

    With gradients, the copies autograd would keep for the backward pass are not kept: they are made again from the
    weights when the backward needs them (`saved_tensors_hooks`). Gradients reach the weights in their own dtype.

    A context manager; nothing happens when every weight already has `dtype`.
    """

    def __init__(self, model: nn.Module, units: list[nn.Module], dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.embedding = model.get_input_embeddings()
        self.units = [u for u in units if u is not self.embedding and _casts_to(u, dtype)]
        self._saved: dict[int, list[tuple[nn.Module, str, nn.Parameter]]] = {}
        self._copies: dict[int, nn.Parameter] = {}  # copy's storage address -> its weight, during the unit's forward
        self._handles: list = []
        self._saved_tensors = None

    def _swap_in(self, unit, args):
        saved = self._saved.setdefault(id(unit), [])
        for owner, attr, param in _floating_params(unit, self.dtype):
            copy = param.to(self.dtype)
            self._copies[copy.untyped_storage().data_ptr()] = param
            owner._parameters[attr] = copy
            saved.append((owner, attr, param))

    def _swap_out(self, unit, args, output):
        for owner, attr, param in self._saved.pop(id(unit), []):
            self._copies.pop(owner._parameters[attr].untyped_storage().data_ptr(), None)
            owner._parameters[attr] = param

    def _cast_output(self, module, args, output):
        return cast_floating(output, self.dtype)

    def _pack(self, tensor):
        """A weight copy (or a view of one, e.g. its transpose) is saved as the weight and the view's geometry."""
        if tensor.layout != torch.strided or not self._copies:
            return tensor
        param = self._copies.get(tensor.untyped_storage().data_ptr())
        if param is None:
            return tensor
        return _RecastView(param, tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset())

    @staticmethod
    def _unpack(packed):
        return packed.make() if isinstance(packed, _RecastView) else packed

    def __enter__(self) -> ComputeIn:
        if not self.units and (self.embedding is None or not _casts_to(self.embedding, self.dtype)):
            return self
        logger.info("Calibration computes in %s, one layer at a time.", self.dtype)
        for unit in self.units:
            self._handles += register_inner_forward_hooks(unit, self._swap_in, self._swap_out)
        if self.embedding is not None:
            self._handles.append(self.embedding.register_forward_hook(self._cast_output))
        self._saved_tensors = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_tensors.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._saved_tensors is not None:
            self._saved_tensors.__exit__(*exc)
            self._saved_tensors = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for unit_saved in self._saved.values():  # a forward that raised: put every weight back
            for owner, attr, param in unit_saved:
                owner._parameters[attr] = param
        self._saved.clear()
        self._copies.clear()


class _RecastView:
    """What autograd keeps of a weight copy: the weight, and how to cast and view it again."""

    def __init__(self, param, dtype, size, stride, offset):
        self.param, self.dtype, self.size, self.stride, self.offset = param, dtype, size, stride, offset

    def make(self) -> torch.Tensor:
        return self.param.detach().to(self.dtype).as_strided(self.size, self.stride, self.offset)


def _casts_to(module: nn.Module, dtype: torch.dtype) -> bool:
    """Whether `module` has floating-point parameters (offloaded ones included) in another dtype than `dtype`."""
    return any(p.is_floating_point() and p.dtype != dtype for p in module.parameters())


def _floating_params(module: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner, attribute, parameter) of every floating-point parameter in `module` not already in `dtype`. Offloaded
    ones (meta tensors until their own module's accelerate hook loads them) are left to that module's unit."""
    return [
        (owner, attr, p)
        for owner in module.modules()
        for attr, p in owner._parameters.items()
        if p is not None and p.is_floating_point() and p.dtype != dtype and not p.is_meta
    ]


def compute_units(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """What [`ComputeIn`] copies at once: the decoder layers, every module outside them that owns parameters, and,
    under `device_map`, every module whose accelerate hook loads offloaded weights (its copies are made inside the
    hook, once the weights are there; a layer's own unit skips them)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    others = [m for m in model.modules() if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    loading = [module for module, _, _ in offloaded_parameters(model).values()]
    return list({id(m): m for m in [*layers, *others, *loading]}.values())


def compute_in(model: nn.Module, layers: nn.ModuleList, dtype: torch.dtype) -> ComputeIn:
    """[`ComputeIn`] over `model`'s decoder `layers` and its other weight-owning modules."""
    return ComputeIn(model, compute_units(model, layers), dtype)
