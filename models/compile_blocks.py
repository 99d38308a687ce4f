"""torch.compile for a model's repeated transformer blocks ("regional compilation").

    compile_blocks(blocks)   # each block's forward compiled; blocks of one class share the compiled code
    compile_blocks(blocks, backend="eager")   # torch.compile's options (the tests: dynamo only, exact on CPU)

Run eagerly, Z-Image's blocks spend over a third of the GPU's time in separate element-wise kernels (norms,
modulation, rotary embedding, gates: aten::mul and aten::copy_ alone, on 2 H200s at 1024x1024,
bench/results/zimage_turbo_denoise_h200x4.json). Compiled, inductor fuses them into a few kernels: 1.156 -> 0.791 s
on 1 GPU, 0.450 -> 0.319 s on 4 (zimage_turbo_denoise_1024_h200x4_compiled.json).
Only `forward` is compiled: the module's hooks (a sequence-parallel plan's shard and gather) stay eager. The
compiled code is shared by every block of a class, so a model compiles a few graphs, not one per block; it is
compiled on the first call of each input shape, and after a second sequence length with the length as a dynamic
size (torch.compile's automatic dynamic shapes).
"""
from __future__ import annotations

import types

import torch
from torch import nn


def compile_blocks(blocks: list[nn.Module], **options) -> None:
    compiled = {}
    for block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, **options)
        block.forward = types.MethodType(compiled[cls], block)
