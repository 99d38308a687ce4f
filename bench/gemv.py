"""One-row matmuls of GLM-Image's AR decode step: cuBLAS (F.linear) against models/glm_image/gemv.py's Triton kernel, on the
decoder's weight shapes for 1, 2 and 4 tensor-parallel ranks, on one GPU.

    python3 bench/gemv.py --out bench/results/gemv_h200.json

Per shape: microseconds per call and the bandwidth that is (weight bytes / time), for cuBLAS, for every kernel
configuration of the sweep and for the one models.glm_image.gemv uses (CONFIG); and each one's largest error against a
float32 matmul, next to cuBLAS's. Calls are replayed from a CUDA graph (GPU time, as in the compiled decode step)
and cycle through enough copies of the weight to exceed the L2 cache, as a decoder reads each layer's weights once
per token. Per TP degree: the microseconds per token these shapes add up
to (40 layers + lm_head) for cuBLAS, the best configuration per shape and CONFIG.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from comfyui_parallel_diffusion.models.glm_image import gemv  # noqa: E402
from ar import FULL_TEXT, _graph_ms  # noqa: E402
from denoise import _machine  # noqa: E402

SWEEP = dict(block_n=(1, 2, 4, 8, 16, 32), block_k=(128, 256, 512, 1024), warps=(2, 4, 8))


def decoder_shapes(tp: int) -> list[dict]:
    """(rows, columns, bias, calls per token) of each matmul one rank runs, as plan.apply_ar_tensor_parallel
    shards the decoder over `tp` ranks."""
    t = FULL_TEXT
    d, heads, kv, ffn, vocab = (t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"],
                                t["intermediate_size"], t["vision_vocab_size"])
    hidden, layers = t["hidden_size"], t["num_hidden_layers"]
    kv_rank = max(1, kv // tp)
    return [dict(name="qkv", n=(heads // tp + 2 * kv_rank) * d, k=hidden, bias=True, calls=layers),
            dict(name="o_proj", n=hidden, k=heads // tp * d, bias=False, calls=layers),
            dict(name="gate_up", n=2 * ffn // tp, k=hidden, bias=False, calls=layers),
            dict(name="down", n=hidden, k=ffn // tp, bias=False, calls=layers),
            dict(name="lm_head", n=vocab // tp, k=hidden, bias=False, calls=1)]


def time_us(fn, copies: list, calls: int) -> float:
    """GPU microseconds per call, the calls captured in a CUDA graph as the decode step runs them (timed eagerly,
    the host's launch time would be measured instead), each round over every copy."""
    return _graph_ms(lambda: [fn(*c) for c in copies], -(-calls // len(copies))) * 1000 / len(copies)


def measure_shape(shape: dict, args, device) -> dict:
    n, k = shape["n"], shape["k"]
    gen = torch.Generator(device=device).manual_seed(0)
    nbytes = n * k * 2
    copies = []
    for _ in range(max(2, -(-args.cycle_mb * 2**20 // nbytes))):
        w = torch.randn(n, k, device=device, generator=gen).mul_(0.02).to(torch.bfloat16)
        b = torch.randn(n, device=device, generator=gen).to(torch.bfloat16) if shape["bias"] else None
        copies.append((w, b))
    x = torch.randn(1, 1, k, device=device, generator=gen).to(torch.bfloat16)
    reference = F.linear(x.float(), copies[0][0].float(), None if copies[0][1] is None else copies[0][1].float())

    def row(fn) -> dict:
        us = time_us(lambda w, b: fn(x, w, b), copies, args.calls)
        err = (fn(x, *copies[0]).float() - reference).abs().max().item()
        return {"us": round(us, 2), "tb_per_s": round(nbytes / us / 1e6, 3), "max_abs_err": err}

    result = {**shape, "weight_mb": round(nbytes / 2**20, 1), "cublas": row(F.linear), "sweep": []}
    for block_n, block_k, warps in itertools.product(*SWEEP.values()):
        if block_n * block_k > 8192 or block_k > 2 * k:
            continue
        result["sweep"].append({"block_n": block_n, "block_k": block_k, "warps": warps, **row(
            lambda x_, w, b: gemv.run_kernel(x_, w, b, block_n, block_k, warps))})
    result["sweep"].sort(key=lambda r: r["us"])
    result["best"] = result["sweep"][0]
    result["picked"] = {"config": gemv.CONFIG, **row(lambda x_, w, b: gemv.run_kernel(x_, w, b, *gemv.CONFIG))}
    result["linear_uses_kernel"] = gemv.applies(x, copies[0][0])
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", default="1,2,4", help="tensor-parallel degrees whose per-rank shapes to measure")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--cycle-mb", type=int, default=1024, help="weight copies cycled through, in MiB")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    started = time.perf_counter()
    out = {"benchmark": "gemv", "machine": _machine("cuda"), "command": " ".join(["bench/gemv.py", *(argv or sys.argv[1:])]),
           "dtype": "bfloat16", "sweep": SWEEP, "per_tp": {}}
    for tp in (int(t) for t in args.tp.split(",")):
        shapes = [measure_shape(s, args, device) for s in decoder_shapes(tp)]
        total = lambda key: round(sum(s["calls"] * s[key]["us"] for s in shapes), 1)  # noqa: E731
        out["per_tp"][str(tp)] = {"shapes": shapes, "us_per_token": {
            "cublas": total("cublas"), "best": total("best"), "picked": total("picked")}}
        print(f"tp {tp}: us/token " + json.dumps(out["per_tp"][str(tp)]["us_per_token"]), flush=True)
        for s in shapes:
            print(f"  {s['name']:8s} {s['n']}x{s['k']}: cublas {s['cublas']['us']} us ({s['cublas']['tb_per_s']} TB/s)"
                  f", best {s['best']['us']} us {s['best']['tb_per_s']} TB/s "
                  f"(n{s['best']['block_n']} k{s['best']['block_k']} w{s['best']['warps']}), picked "
                  f"{s['picked']['us']}; err cublas {s['cublas']['max_abs_err']:.3g} best "
                  f"{s['best']['max_abs_err']:.3g}", flush=True)
    out["elapsed_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
