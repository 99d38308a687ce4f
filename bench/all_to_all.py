"""Ulysses all-to-all (NCCL, through Comm) at the DiT's real sizes, alone and overlapped with a GEMM.

    python3 bench/all_to_all.py --gpus 4 --out bench/results/all_to_all_h200x4.json

Each rank sends (p - 1) / p of a buffer shaped as ulysses_attention's send buffer (q, k and v of its sequence
shard; or the attention output, a third of that) to the other members of its Ulysses group of p ranks (p = 2 uses
ranks {0,1} and {2,3} at once, as a 4-GPU cfg 2 x ulysses 2 layout would). Timed alone; then, on CUDA, a GEMM the
size of the shard's q/k/v projection alone, and the pair: the all-to-all launched first on a side stream, the GEMM
after it on the compute stream, neither waiting for the other. The pair takes the sum of the two times when nothing
overlaps, their maximum when everything does. cuBLAS may be told to leave SMs free for NCCL
(torch._C._set_sm_carveout_experimental): each --carveouts value is timed. Times: CUDA events around 20 calls after
a warm-up, median of 5 such batches, on rank 0.

all_to_all_h200x4.json and all_to_all_h200x4_nccl_env.json were made by earlier versions: the first also timed a
copy-engine pull through CUDA symmetric memory (no faster than NCCL, so it was removed); their
"nccl_next_to_gemm_ms" made each all-to-all wait for the previous GEMM, so it measured serialisation, not overlap.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from comfyui_parallel_diffusion.parallel import Layout
from comfyui_parallel_diffusion.parallel.comm import Comm
from comfyui_parallel_diffusion.parallel.group import free_port
from comfyui_parallel_diffusion.parallel.worker import join_process_group

HIDDEN, HEAD_DIM = 3840, 128  # Z-Image's DiT; 30 heads are padded to 32 on 4 ranks


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    mp.spawn(_rank_main, args=(args,), nprocs=args.gpus)


def _rank_main(rank: int, args) -> None:
    carveouts = [int(v) for v in args.carveouts.split(",")]
    device = join_process_group(args.device, rank, args.gpus)
    rows = []
    for p in [int(v) for v in args.degrees.split(",")]:
        layout = Layout.for_world(args.gpus, cfg=args.gpus // p)
        comm = Comm(layout, rank, device, distributed=True)
        for tokens in [int(v) for v in args.tokens.split(",")]:
            for tensors, what in ((3, "qkv"), (1, "out")):
                rows.append(_measure(comm, p, tokens, tensors, device, carveouts) | {"what": what})
                if rank == 0:
                    print(json.dumps(rows[-1]), flush=True)
        dist.barrier()
    if rank == 0:
        machine = {"host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if device.type == "cuda":
            machine |= {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                        "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
        report = {"machine": machine, "config": vars(args) | {"out": str(args.out)}, "results": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    dist.destroy_process_group()


def _measure(comm: Comm, p: int, tokens: int, tensors: int, device, carveouts: list[int]) -> dict:
    heads = -(-HIDDEN // HEAD_DIM // p) * p
    local = -(-tokens // p)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    send = torch.randn(p, tensors, 1, local, heads // p, HEAD_DIM, device=device, dtype=dtype)
    sent_bytes = send.numel() * send.element_size() * (p - 1) // p
    ms = _ms(lambda: comm.all_to_all(send, "ulysses"), device)
    row = {"ulysses": p, "tokens": tokens, "bytes_sent_per_rank": sent_bytes, "nccl_ms": ms,
           "nccl_gb_per_s": round(sent_bytes / ms / 1e6, 1)}
    if device.type == "cuda":
        row["overlap"] = [_overlap(comm, send, local, carveout, device) for carveout in carveouts]
    return row


def _overlap(comm: Comm, send: torch.Tensor, local: int, carveout: int, device) -> dict:
    """The all-to-all beside the shard's q/k/v projection, cuBLAS leaving `carveout` SMs unused."""
    x = torch.randn(local, HIDDEN, device=device, dtype=send.dtype)
    w = torch.randn(HIDDEN, 3 * HIDDEN, device=device, dtype=send.dtype)
    side = torch.cuda.Stream()

    def pair():
        with torch.cuda.stream(side):
            comm.all_to_all(send, "ulysses")
        x @ w
        torch.cuda.current_stream().wait_stream(side)

    torch._C._set_sm_carveout_experimental(carveout or None)
    try:
        return {"carveout_sms": carveout, "gemm_ms": _ms(lambda: x @ w, device), "pair_ms": _ms(pair, device)}
    finally:
        torch._C._set_sm_carveout_experimental(None)


def _ms(fn, device, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        dist.barrier()
        if device.type == "cpu":
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - started) * 1e3 / calls)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return round(statistics.median(times), 4)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--degrees", default="2,4", help="Ulysses degrees to measure (each divides --gpus)")
    p.add_argument("--tokens", default="4224,16512,3744",
                   help="unified sequence lengths: Z-Image at 1024x1024, 2048x2048, 720x1280 with a 128-token caption")
    p.add_argument("--carveouts", default="0,16,32", help="SMs cuBLAS leaves free in the overlapped pair")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, NCCL path only (checks the script)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "all_to_all.json")
    return p


if __name__ == "__main__":
    sys.exit(main())
