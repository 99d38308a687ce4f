"""The matmuls and attention of one full-width Z-Image block at the row counts one rank sees, on one GPU: does a
rank's share of the work take its share of the time?

    python3 bench/dit_gemms.py --rows 4224,2112,1056 --out gemms.json

Per row count (1024x1024 is 4224 tokens: 1, 2 and 4 ranks see 4224, 2112, 1056): the block's matmuls as diffusers
runs them (q, k, v, out, w1, w3, w2), the same with q/k/v and w1/w3 each fused into one wider matmul, each through
cuBLAS (F.linear) and, with --autotune, through inductor's max-autotune GEMM (Triton templates against cuBLAS);
and SDPA over the whole sequence with the heads one rank keeps (30, 15, 8 of Z-Image's 30, padded as Ulysses pads
them). Times are GPU time of calls replayed from a CUDA graph, as the denoising loop runs them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from ar import _graph_ms  # noqa: E402
from denoise import _machine  # noqa: E402

DIM, FFN, HEAD_DIM = 3840, 10240, 128  # Z-Image's DiT (shared/design.md)
# (name, in features, out features, calls per block)
SEPARATE = [("qkv", DIM, DIM, 3), ("out", DIM, DIM, 1), ("w1_w3", DIM, FFN, 2), ("w2", FFN, DIM, 1)]
FUSED = [("qkv", DIM, 3 * DIM, 1), ("out", DIM, DIM, 1), ("w1_w3", DIM, 2 * FFN, 1), ("w2", FFN, DIM, 1)]


def linear_ms(rows: int, k: int, n: int, autotune: bool) -> float:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=gen).mul_(0.02).to(torch.bfloat16)
    fn = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False) if autotune else F.linear
    fn(x, w)
    return _graph_ms(lambda: fn(x, w), 20)


def block_ms(rows: int, shapes: list, autotune: bool) -> dict:
    parts = {name: round(linear_ms(rows, k, n, autotune) * calls, 4) for name, k, n, calls in shapes}
    return {"total_ms": round(sum(parts.values()), 4), **parts}


def attention_ms(seq: int, heads: int) -> float:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, HEAD_DIM, device="cuda", generator=gen).to(torch.bfloat16)
               for _ in range(3))
    return _graph_ms(lambda: F.scaled_dot_product_attention(q, k, v), 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="4224,2112,1056", help="token rows per rank")
    p.add_argument("--sequence", type=int, default=4224, help="whole sequence length, for attention")
    p.add_argument("--heads", default="30,15,8", help="heads one rank keeps, for attention")
    p.add_argument("--autotune", action="store_true", help="also inductor max-autotune GEMMs (minutes)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = {"machine": _machine("cuda"), "config": vars(args), "gemms": [], "attention": []}
    for rows in (int(r) for r in args.rows.split(",")):
        row = {"rows": rows, "cublas": block_ms(rows, SEPARATE, False), "cublas_fused": block_ms(rows, FUSED, False)}
        if args.autotune:
            row["autotune"] = block_ms(rows, SEPARATE, True)
            row["autotune_fused"] = block_ms(rows, FUSED, True)
        result["gemms"].append(row)
        print(json.dumps(row), flush=True)
    for heads in (int(h) for h in args.heads.split(",")):
        result["attention"].append({"sequence": args.sequence, "heads": heads,
                                    "ms": round(attention_ms(args.sequence, heads), 4)})
        print(json.dumps(result["attention"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
