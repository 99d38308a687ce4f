"""LoRA applied beside a model's Linear layers, not merged into their weights.

    factors = {"layers.0.attention.to_q.weight": [LoRAFactor(up, down, scale)], ...}
    changed = set_lora(model, factors)   # True: the module structure changed (captured CUDA graphs are stale)

Each targeted Linear computes base(x) + up(scale * down(x)), several LoRAs on one layer stacked along the rank. Why
unmerged: the base weights stay exactly as loaded, so a new strength or another LoRA is a small copy of the factors
(no backup of the weights, no re-read of the file), and a rank holding a shard of the sequence computes exactly what
a single process does. The sum equals a merged W + scale * up @ down up to float rounding (a merged bf16 weight
rounds the small update away; this keeps it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LoRAFactor:
    up: torch.Tensor  # (out_features, rank)
    down: torch.Tensor  # (rank, in_features)
    scale: float  # strength x alpha / rank, as ComfyUI's and kohya's LoRA define it


class LoRALinear(nn.Module):
    """A Linear with the stacked LoRA factors of every LoRA applied to it."""

    def __init__(self, base: nn.Linear, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("down", down, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down), self.up)


def stacked(factors: list[LoRAFactor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, scaled down) of all factors, concatenated along the rank, in the layer's dtype and device."""
    up = torch.cat([f.up.float() for f in factors], dim=1)
    down = torch.cat([f.scale * f.down.float() for f in factors], dim=0)
    return up.to(like.device, like.dtype), down.to(like.device, like.dtype)


def set_lora(model: nn.Module, factors: dict[str, list[LoRAFactor]]) -> bool:
    """Make `factors` (by weight name, as in model.state_dict()) the model's LoRA, replacing any earlier one. Only
    Linear weights take a LoRA. Returns True when layers were wrapped or unwrapped (the same targets at the same
    ranks are updated in place: a captured CUDA graph stays valid)."""
    targets = {}
    for name, layer_factors in factors.items():
        if not name.endswith(".weight"):
            raise ValueError(f"a LoRA can only change a Linear layer's weight, not {name}")
        targets[name.removesuffix(".weight")] = layer_factors
    changed = False
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear) and name not in targets:
            _replace(model, name, module.base)
            changed = True
    for name, layer_factors in targets.items():
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoRALinear) else module
        if not isinstance(base, nn.Linear):
            raise ValueError(f"a LoRA targets {name}, a {type(base).__name__}; only Linear layers take one")
        for f in layer_factors:
            if f.up.shape[0] != base.out_features or f.down.shape[1] != base.in_features or \
                    f.up.shape[1] != f.down.shape[0]:
                raise ValueError(f"a LoRA for {name} has factors {tuple(f.up.shape)} x {tuple(f.down.shape)}; the "
                                 f"layer is {base.in_features} -> {base.out_features} (a LoRA of another model?)")
        up, down = stacked(layer_factors, base.weight)
        if isinstance(module, LoRALinear) and module.up.shape == up.shape:
            module.up.copy_(up)
            module.down.copy_(down)
        else:
            _replace(model, name, LoRALinear(base, up, down))
            changed = True
    return changed


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
