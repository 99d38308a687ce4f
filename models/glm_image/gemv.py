"""The matmul of a one-token decode step, `x @ weight.T + bias` for a single row x, as a Triton kernel.

    linear(x, weight, bias=None)    # == F.linear(x, weight, bias); the kernel where applies(), else F.linear

Such a matmul is a matrix-vector product: its time is the time to read `weight` once. For one row, cuBLAS picks
split-K kernels, each with a second kernel that sums the partial results, and reaches well under the GPU's
bandwidth on the smaller matrices (bench/gemv.py measures both on the GLM-Image AR decoder's shapes). This kernel
has each program read BLOCK_N whole rows of `weight` and reduce them in float32 registers: one kernel per matmul,
no workspace, and a fixed summation order per shape (same inputs, same bits, in every process, which a seeded
sampler needs).

applies() only on CUDA for 16-bit floats with Triton present: float32 stays on F.linear, so a float32 run still
reproduces transformers' own generate() exactly (bench/ar.py's exactness check).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# (rows per program, columns per load, warps): within 3% of the sweep's best for every shape of the GLM-Image AR
# decoder at 1, 2 and 4 ranks on an H200, where cuBLAS took 9-25% longer per token (bench/results/gemv_h200.json)
CONFIG = (4, 1024, 2)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without Triton: linear() is F.linear there
    triton = None

if triton is not None:
    @triton.jit
    def _gemv_kernel(w_ptr, x_ptr, bias_ptr, out_ptr, n, k, stride_w, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        cols = tl.arange(0, BLOCK_K)
        tile_ptr = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptr + start + cols)
                tile = tl.load(tile_ptr + start, mask=row_ok[:, None], other=0.0)
            else:
                col_ok = start + cols < k
                x = tl.load(x_ptr + start + cols, mask=col_ok, other=0.0)
                tile = tl.load(tile_ptr + start, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tile.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @torch.library.triton_op("parallel_diffusion::gemv", mutates_args=())
    def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # wrap_triton: torch.compile traces the launch into its graph (and CUDA graph) as a kernel of its own
        return run_kernel(x, weight, bias, *CONFIG, kernel=torch.library.wrap_triton(_gemv_kernel))


def run_kernel(x, weight, bias, block_n: int, block_k: int, warps: int, kernel=None) -> torch.Tensor:
    """One launch of the kernel with an explicit configuration (bench/gemv.py sweeps them)."""
    n, k = weight.shape
    out = x.new_empty(x.shape[:-1] + (n,))
    (kernel or _gemv_kernel)[(triton.cdiv(n, block_n),)](
        weight, x, bias if bias is not None else weight, out, n, k, weight.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, num_warps=warps)
    return out


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.numel() == x.shape[-1] and x.stride(-1) == 1
            and weight.is_contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if applies(x, weight):
        return _gemv(x, weight, bias)
    return F.linear(x, weight, bias)
