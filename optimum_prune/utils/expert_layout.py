"""The two ways MoE checkpoints name their experts, for code that reads or writes safetensors names itself.

Transformers 4.x stores each expert as its own Linears (`mlp.experts.3.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.3.w1.weight`); 5.x models hold them fused (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows
then up rows, and `mlp.experts.down_proj` [E, H, I]). `from_pretrained` under 5.x fuses on load and `save_pretrained`
splits again (its `conversion_mapping`), so checkpoints on disk keep the 4.x names whichever version wrote them.
[`fuse_experts`] and [`split_experts`] do the same for tensors read or written without Transformers (streaming),
from one declaration per family ([`ModuleListExperts`]).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModuleListExperts:
    """How a family's 4.x checkpoints name a layer's MoE block: `{block}.gate.weight` (the router) and
    `{block}.experts.{i}.{gate|up|down}.weight`; 5.x names the block `mlp`."""

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def expert_pattern(self) -> re.Pattern:
        parts = "|".join(re.escape(part) for part in (self.gate, self.up, self.down))
        return re.compile(rf"^(.*)\.{re.escape(self.block)}\.experts\.(\d+)\.({parts})\.weight$")


MIXTRAL_EXPERTS = ModuleListExperts(block="block_sparse_moe", gate="w1", up="w3", down="w2")
QWEN_MOE_EXPERTS = ModuleListExperts()


def fuse_experts(tensors: Mapping[str, torch.Tensor], layout: ModuleListExperts) -> dict[str, torch.Tensor]:
    """`tensors` with every layer's module-list experts stacked into 5.x's fused tensors and the block renamed `mlp`;
    other tensors (and already fused ones) pass through unchanged."""
    pattern, experts, fused = layout.expert_pattern(), {}, {}
    for name, tensor in tensors.items():
        match = pattern.match(name)
        if match:
            prefix, index, part = match.groups()
            experts.setdefault(prefix, {}).setdefault(part, {})[int(index)] = tensor
        else:
            fused[name.replace(f".{layout.block}.", ".mlp.")] = tensor
    for prefix, parts in experts.items():
        count = len(parts[layout.down])
        if any(sorted(parts[part]) != list(range(count)) for part in (layout.gate, layout.up, layout.down)):
            raise ValueError(f"{prefix}.{layout.block}.experts: expert indices are not 0..{count - 1} in every part.")
        gate_up = [torch.cat([parts[layout.gate][i], parts[layout.up][i]]) for i in range(count)]
        fused[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{prefix}.mlp.experts.down_proj"] = torch.stack([parts[layout.down][i] for i in range(count)])
    return fused


def split_experts(tensors: Mapping[str, torch.Tensor], layout: ModuleListExperts) -> dict[str, torch.Tensor]:
    """The inverse of [`fuse_experts`]: 5.x's fused expert tensors as 4.x's per-expert Linears, the block under its
    4.x name (what `save_pretrained` writes under 5.x)."""
    split = {}
    for name, tensor in tensors.items():
        prefix, _, rest = name.rpartition(".mlp.")
        if not prefix or rest not in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            split[name] = tensor
            continue
        block = f"{prefix}.{layout.block}"
        if rest == "gate.weight":
            split[f"{block}.gate.weight"] = tensor
        elif rest == "experts.down_proj":
            split.update({f"{block}.experts.{i}.{layout.down}.weight": t.contiguous() for i, t in enumerate(tensor)})
        else:
            for i, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                split[f"{block}.experts.{i}.{layout.gate}.weight"] = gate.contiguous()
                split[f"{block}.experts.{i}.{layout.up}.weight"] = up.contiguous()
    return split
