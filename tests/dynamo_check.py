"""Compiled blocks checked on CPU: compile_blocks as on CUDA, but with dynamo's eager backend, which keeps dynamo's
guards, recompiles and graph breaks, runs exactly like uncompiled code and costs no inductor compile."""
from contextlib import contextmanager

import torch
from torch._dynamo.utils import counters

from comfyui_parallel_diffusion.models.compile_blocks import compile_blocks


@contextmanager
def blocks_compiled_by_dynamo(blocks):
    torch._dynamo.reset()
    compile_blocks(blocks, backend="eager")
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
        torch._dynamo.reset()


def graphs_made() -> int:
    """How many graphs dynamo has made so far in this process."""
    return counters["stats"]["unique_graphs"]
