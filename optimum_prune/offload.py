"""Models dispatched by accelerate (`device_map=...`): several devices, CPU offload, disk offload.

With `device_map`, accelerate wraps each module's `forward` in an `AlignDevicesHook`. When a module is *offloaded*
(`"cpu"` next to a GPU, or `"disk"`), its parameters are meta tensors outside its forward; the hook loads real tensors
from its `weights_map` onto the execution device just before the wrapped forward (`module._old_forward`) runs, as new
Parameter objects, and puts meta tensors back right after. So for offloaded weights:

- reading a weight means reading the hook's `weights_map` ([`OffloadAwareParameters`]);
- anything that must see the real weights inside the forward (SPSA's perturbation, capturing the Parameter that
  autograd fills) runs *inside* accelerate's hook, around `_old_forward` ([`register_inner_forward_hooks`]): torch's
  own forward pre-hooks run before accelerate's, while the weights are still meta;
- `param.grad` of the module's own Parameter never fills: [`OffloadedGradients`] keeps the Parameters accelerate made
  for each forward and reads their `.grad` after the backward;
- surgery cannot slice meta tensors: [`apply_plan_dispatched`] loads the offloaded weights into CPU memory, prunes,
  and dispatches the smaller model again with the same device per module (so it still fits `max_memory`).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .surgery import apply_plan, check_plan


logger = logging.getLogger(__name__)


def _align_hooks(module: nn.Module) -> list:
    """The accelerate `AlignDevicesHook`s attached to `module` (inside a `SequentialHook` too)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", [hook]))
    return [h for h in hooks if type(h).__name__ == "AlignDevicesHook"]


def _offload_hook(module: nn.Module):
    """The hook that offloads `module`'s tensors, or None."""
    return next((h for h in _align_hooks(module) if h.offload and h.weights_map is not None), None)


def offloaded_parameters(model: nn.Module) -> dict[str, tuple[nn.Module, object, str]]:
    """`{parameter name: (module whose hook loads it, the hook, name relative to that module)}` for every parameter
    that an accelerate hook offloads (empty for a model in memory)."""
    found = {}
    for module_name, module in model.named_modules():
        hook = _offload_hook(module)
        if hook is None:
            continue
        prefix = f"{module_name}." if module_name else ""
        for rel, _ in module.named_parameters(recurse=hook.place_submodules):
            found[prefix + rel] = (module, hook, rel)
    return found


def is_offloaded(model: nn.Module) -> bool:
    return any(_offload_hook(m) is not None for m in model.modules())


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks are attached (several devices or offloading)."""
    return any(_align_hooks(m) for m in model.modules())


def _retie(model: nn.Module) -> None:
    """Tie the output embedding to the input embedding again where the config ties them."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()


def _retie_hook(module, args, output):
    _retie(module)


def keep_tied_weights(model: nn.Module) -> None:
    """Keep tied weights tied on an offloaded model.

    After an offloaded module's forward accelerate puts a *new* meta Parameter in place, so `lm_head.weight` stops
    being `embed_tokens.weight` after the first forward: `named_parameters()` then lists both, which changes parameter
    counts, group sets and gradients. A forward hook on the model ties them again after every forward (accelerate's
    hooks load each module's weights by name, so this changes nothing in the computation).
    """
    if not is_offloaded(model) or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    _retie(model)
    if not getattr(model, "_optimum_prune_keeps_ties", False):
        model.register_forward_hook(_retie_hook)
        model._optimum_prune_keeps_ties = True


def execution_device(module: nn.Module) -> torch.device | None:
    """Where `module` computes: its accelerate hook's execution device, else the device of its first tensor that is
    not meta."""
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            return torch.device(hook.execution_device)  # an int is the current accelerator's index
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """The device to put input ids on: the root hook's execution device under `device_map`, else the first
    parameter's device (accelerate's hooks move inputs between devices from there)."""
    return execution_device(model) or torch.device("cpu")


class OffloadAwareParameters(Mapping):
    """`model.named_parameters()` as a mapping whose offloaded entries read the hook's `weights_map` (a CPU tensor,
    or a memory-mapped one for disk offload), loaded on access: one tensor at a time, never the whole model."""

    def __init__(self, model: nn.Module):
        self._params = dict(model.named_parameters())
        self._offloaded = offloaded_parameters(model)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._offloaded:
            _, hook, rel = self._offloaded[name]
            return hook.weights_map[rel]
        return self._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def is_offloaded(self, name: str) -> bool:
        return name in self._offloaded

    def execution_device(self, name: str) -> torch.device:
        """Where parameter `name` takes part in the forward (its module's execution device when offloaded)."""
        if name in self._offloaded:
            return execution_device(self._offloaded[name][0]) or torch.device("cpu")
        return self._params[name].device


class _InnerHandle:
    def __init__(self, module: nn.Module, original):
        self.module = module
        self.original = original

    def remove(self) -> None:
        self.module._old_forward = self.original


def register_inner_forward_hooks(module: nn.Module, pre, post) -> list:
    """Call `pre(module, args)` and `post(module, args, output)` around the module's computation, with its real
    weights in place: inside accelerate's hook when there is one (after it loads the offloaded weights, before it puts
    meta tensors back), else as torch forward hooks. Returns handles with `remove()`."""
    original = getattr(module, "_old_forward", None)
    if original is None or not _align_hooks(module):
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def wrapped(*args, **kwargs):
        pre(module, args)
        output = original(*args, **kwargs)
        post(module, args, output)
        return output

    module._old_forward = wrapped
    return [_InnerHandle(module, original)]


class OffloadedGradients:
    """Gradients of offloaded parameters, which `param.grad` cannot hold (the Parameter autograd sees is a fresh one
    that accelerate builds for each forward).

    While active, every forward of a module that owns one of `names` keeps a reference to the Parameters accelerate
    put in place; `collect()` after the backward returns their `.grad` summed per parameter name (tied weights used by
    several modules add up, as one Parameter's `.grad` does) and drops the references. The result is exactly what
    `p.grad` holds for a model in memory.
    """

    def __init__(self, model: nn.Module, names):
        keep_tied_weights(model)
        canonical = {id(p): n for n, p in model.named_parameters()}  # a tied weight under its first name
        names = set(names)
        self._owners: dict[nn.Module, list[tuple[str, str]]] = {}
        for module, _, rel in offloaded_parameters(model).values():
            name = canonical.get(id(module.get_parameter(rel)))
            if name in names:
                self._owners.setdefault(module, []).append((rel, name))
        self._seen: list[tuple[str, torch.Tensor]] = []
        self._handles: list = []

    @property
    def names(self) -> set[str]:
        return {name for entries in self._owners.values() for _, name in entries}

    def __enter__(self) -> OffloadedGradients:
        for module in self._owners:

            def keep(mod, args):
                for rel, name in self._owners[mod]:
                    self._seen.append((name, mod.get_parameter(rel)))

            self._handles += register_inner_forward_hooks(module, keep, lambda mod, args, output: None)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._seen = []

    def collect(self) -> dict[str, torch.Tensor]:
        """`{name: gradient}` (float32, on the CPU) of the last backward; forgets the forward's Parameters."""
        grads: dict[str, torch.Tensor] = {}
        for name, p in self._seen:
            if p.grad is not None:
                g = p.grad.detach().float().cpu()
                grads[name] = grads[name] + g if name in grads else g
        self._seen = []
        return grads


def _renumber_device_map(device_map: dict, layers_path: str, removed: list[int]) -> dict:
    """`device_map` with the entries of removed decoder layers dropped and the later layers' indices shifted."""
    if not removed:
        return dict(device_map)
    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)(\..*)?$")
    gone = set(removed)
    out = {}
    for key, device in device_map.items():
        match = pattern.match(key)
        if match is None:
            out[key] = device
            continue
        index = int(match.group(1))
        if index in gone:
            continue
        new_index = index - sum(1 for r in gone if r < index)
        out[f"{layers_path}.{new_index}{match.group(2) or ''}"] = device
    return out


def materialize_offloaded(model: nn.Module) -> None:
    """Remove every accelerate hook and load offloaded tensors into CPU memory as ordinary Parameters (copies, so
    nothing stays memory-mapped onto an offload file); tied weights are tied again."""
    from accelerate.hooks import remove_hook_from_submodules
    from accelerate.utils import set_module_tensor_to_device

    pending = []
    for module in model.modules():
        hook = _offload_hook(module)
        if hook is not None:
            names = [n for n, _ in module.named_parameters(recurse=hook.place_submodules)]
            if hook.offload_buffers:
                names += [n for n, _ in module.named_buffers(recurse=hook.place_submodules)]
            pending.append((module, hook.weights_map, names))
    remove_hook_from_submodules(model)
    for module in model.modules():
        # accelerate leaves the original *bound* forward as an instance attribute; drop it so that a module whose
        # class surgery changes (BLOOM's per-layer ALiBi blocks) runs its new class's forward.
        bound = module.__dict__.get("forward")
        if getattr(bound, "__self__", None) is module and bound.__func__ is getattr(
            type(module).forward, "__func__", type(module).forward
        ):
            del module.__dict__["forward"]
    for module, weights_map, names in pending:
        for name in names:
            value = weights_map[name]
            set_module_tensor_to_device(module, name, "cpu", value=value.detach().to("cpu", copy=True))
    _retie(model)


def apply_plan_dispatched(model: nn.Module, plan, spec, offload_folder: str | None = None) -> nn.Module:
    """`surgery.apply_plan` for a model dispatched with `device_map`.

    The hooks are removed and the offloaded tensors loaded into CPU memory (the peak memory of this step: the
    offloaded part of the model once, in CPU RAM; tensors already on a device stay there), the model is pruned, and the
    smaller model is dispatched again with every module on the device it had (renumbered for removed layers), so it
    fits the `max_memory` the original fitted. Weights placed on `"disk"` are written to a new folder inside
    `offload_folder` (a temporary folder without one). A model without hooks is pruned as it is. A plan that does
    not fit the model is refused before anything changes (`surgery.check_plan`).
    """
    check_plan(model, plan, spec)  # before the hooks come off: a plan that does not fit leaves the model as it was
    device_map = getattr(model, "hf_device_map", None)
    if not is_dispatched(model):
        apply_plan(model, plan, spec)
        if device_map is not None:
            model.hf_device_map = _renumber_device_map(device_map, spec.layers, plan.removed_layers)
        return model
    if device_map is None:
        raise ValueError(
            "This model carries accelerate hooks but no `hf_device_map` to dispatch it again after pruning; load it "
            "with `device_map=` (`from_pretrained`) or `accelerate.dispatch_model`."
        )
    from accelerate import dispatch_model

    materialize_offloaded(model)
    apply_plan(model, plan, spec)
    device_map = _renumber_device_map(device_map, spec.layers, plan.removed_layers)
    if "" in device_map:  # the whole model on one device: accelerate offloads named submodules, not the root
        device_map = {name: device_map[""] for name, _ in model.named_children()}
    offload_dir = None
    if "disk" in device_map.values():
        offload_dir = tempfile.mkdtemp(prefix="optimum-prune-offload-", dir=offload_folder)
        logger.info("Offloading the pruned model's 'disk' modules to %s.", offload_dir)
    dispatch_model(model, device_map=device_map, offload_dir=offload_dir)
    model.hf_device_map = device_map
    keep_tied_weights(model)  # attaching the hooks unties them
    return model
