"""Weights stored in 8-bit floating point and computed in the model's dtype, as ComfyUI's weight_dtype
fp8_e4m3fn runs its models: half the memory of bf16 for the layers that hold most of it.

    store_fp8(linears, compute_dtype)   # each module's `weight` kept as float8_e4m3fn, upcast when read

Through torch.nn.utils.parametrize: the stored tensor becomes `parametrizations.weight.original` and every read of
`module.weight` (its forward's, a compiled block's, a tensor-parallel layer's) returns it upcast, one layer at a
time, so only one layer's upcast copy exists at once. Values are rounded to the nearest e4m3fn value, clamped to
its range (+-448; beyond it torch's cast gives NaN); an fp8 file's values pass unchanged (every e4m3fn value is a
bf16 value, so its bf16 load and this cast give back its very bytes).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

WEIGHT_DTYPES = ("default", "fp8_e4m3fn")
FP8 = torch.float8_e4m3fn


def check_weight_dtype(weight_dtype: str) -> None:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")


class Upcast(nn.Module):
    """The parametrization: the stored fp8 weight, read in the compute dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype)


def to_fp8(weight: torch.Tensor) -> torch.Tensor:
    limit = torch.finfo(FP8).max
    return weight.clamp(-limit, limit).to(FP8)


def store_fp8(modules: Iterable[nn.Module], compute_dtype: torch.dtype) -> None:
    """Each module's `weight` parameter stored in fp8 and read in `compute_dtype`; the 16- or 32-bit copy is freed
    module by module."""
    for module in modules:
        weight = module.weight.detach()
        module.weight = nn.Parameter(to_fp8(weight), requires_grad=False)
        del weight
        parametrize.register_parametrization(module, "weight", Upcast(compute_dtype), unsafe=True)


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]

