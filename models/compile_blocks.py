"""torch.compile for a model's repeated transformer blocks ("regional compilation").

    compile_blocks(blocks)   # each block's forward compiled; blocks of one class share the compiled code

Z-Image's blocks run eagerly as about 40 small kernels each, half of them element-wise (norms, modulation, rotary
embedding, gates), and on 4 GPUs the host could not launch them as fast as a quarter of the sequence took on the GPU
(bench/results/zimage_turbo_denoise_h200x4.json). Compiled, inductor fuses the element-wise work into a few kernels.
Only `forward` is compiled: the module's hooks (a sequence-parallel plan's shard and gather) stay eager, and the
all-to-alls inside attention split the compiled graph where they are. The compiled code is shared by every block of
a class, so a model compiles a few graphs, not one per block; it is compiled on the first call of each input shape,
and after a second sequence length with the length as a dynamic size (torch.compile's automatic dynamic shapes).
"""
from __future__ import annotations

import types

import torch
from torch import nn


def compile_blocks(blocks: list[nn.Module]) -> None:
    compiled = {}
    for block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward)
        block.forward = types.MethodType(compiled[cls], block)
