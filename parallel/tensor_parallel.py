"""Tensor parallelism for nn.Linear layers (Megatron style), for decoders whose speed is the time to read their
weights: each rank reads 1/N of them per token.

A column-parallel layer keeps some of its output features on each rank; the row-parallel layer after it keeps the
matching input features and sums the partial outputs over the group (one all-reduce per pair). A model's plan
chooses the layers and the features (models/<family>/plan.py); nothing here knows a model. `linear`, where a
layer takes it, is the matmul to run (F.linear's signature): a decode step passes its one-row kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import Comm


def keep_output_features(linear: nn.Linear, index: torch.Tensor) -> None:
    """Column parallel: the layer computes only output features `index`, in that order (the full copy is freed)."""
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach().index_select(0, index), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index), requires_grad=False)
    linear.out_features = len(index)


class RowParallelLinear(nn.Module):
    """Reads input features `index` of a column-parallel layer's output; the partial products are summed over the
    group, and the bias is added once, after the sum."""

    def __init__(self, linear: nn.Linear, index: torch.Tensor, comm: Comm, group: str):
        super().__init__()
        index = index.to(linear.weight.device)
        self.weight = nn.Parameter(linear.weight.detach().index_select(1, index), requires_grad=False)
        self.bias = linear.bias
        self.comm, self.group = comm, group

    def forward(self, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
        out = self.comm.all_reduce(linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


class GatheredColumnLinear(nn.Module):
    """Each rank computes its contiguous block of output features; every rank gets them all (an output layer:
    logits over a vocabulary that would cost a full read of its weights on every rank)."""

    def __init__(self, linear: nn.Linear, comm: Comm, group: str):
        super().__init__()
        parts, rank = comm.group_size(group), comm.group_rank(group)
        if linear.out_features % parts:
            raise ValueError(f"{linear.out_features} output features do not split into {parts} equal blocks")
        block = linear.out_features // parts
        rows = slice(rank * block, (rank + 1) * block)
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach()[rows].clone(),
                                                                  requires_grad=False)
        self.comm, self.group = comm, group

    def forward(self, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
        return self.comm.all_gather_last(linear(x, self.weight, self.bias), self.group)


def features_of_heads(heads: range | list[int], head_dim: int) -> torch.Tensor:
    """The feature indices of the given attention heads in a (heads * head_dim) projection."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
