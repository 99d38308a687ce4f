"""Where Ulysses' communication goes inside the compiled blocks: one DiT forward, compiled and replayed as a CUDA
graph, with each way of issuing the all-to-alls side by side.

    python3 bench/ulysses_layers.py --gpus 4 --layers 6 --out bench/results/ulysses_layers_h200x4.json

Z-Image's DiT at full width with --layers main layers (its 2 refiners and final layer as released), random bf16
weights, on Ulysses degrees 1, 2 and 4 (on 4 GPUs degree 2 runs two copies side by side, as cfg 2 would). For each
degree and size, every variant of
- head_groups: parallel/sequence.HEAD_GROUPS, the number of groups queries and outputs travel in;
- overlap: compile_blocks' inductor communication scheduling on, or inductor's defaults (each wait right after its
  launch);
is compiled anew and timed: CUDA events around 20 replays, median of 3 such batches. Then one replay under
torch.profiler on every rank: the time in NCCL kernels and in all kernels (more than the forward when kernels ran
at once), and rank 0's 40 costliest kernels. The ratio of a degree-1 forward to a degree-p one is the scaling the layers allow.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import ZImageTransformer2DModel
from torch.profiler import ProfilerActivity, profile

from comfyui_parallel_diffusion.models import compile_blocks as compile_module
from comfyui_parallel_diffusion.models.cuda_graph import GraphedCall
from comfyui_parallel_diffusion.models.zimage import stages
from comfyui_parallel_diffusion.models.zimage.plan import apply_sequence_parallel
from comfyui_parallel_diffusion.parallel import Layout, sequence
from comfyui_parallel_diffusion.parallel.comm import Comm
from comfyui_parallel_diffusion.parallel.group import free_port
from comfyui_parallel_diffusion.parallel.worker import join_process_group

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_models import ZIMAGE_DIT  # noqa: E402


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    mp.spawn(_rank_main, args=(args,), nprocs=args.gpus)


def _rank_main(rank: int, args) -> None:
    device = join_process_group("cuda", rank, args.gpus)
    rows = []
    for p in [int(v) for v in args.degrees.split(",")]:
        comm = (Comm(Layout.for_world(args.gpus, cfg=args.gpus // p), rank, device, distributed=True) if p > 1
                else Comm.single(device))
        torch.manual_seed(0)
        with torch.device(device):
            transformer = ZImageTransformer2DModel(**dict(ZIMAGE_DIT, n_layers=args.layers)).to(torch.bfloat16)
        transformer.eval().requires_grad_(False)
        apply_sequence_parallel(transformer, comm)
        blocks = [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers]
        for size in args.sizes.split(","):
            height, width = (int(v) for v in size.split("x"))
            gen = torch.Generator(device).manual_seed(0)
            x = torch.randn(1, 16, height // 8, width // 8, device=device, dtype=torch.bfloat16, generator=gen)
            embeds = [torch.randn(128, ZIMAGE_DIT["cap_feat_dim"], device=device, dtype=torch.bfloat16,
                                  generator=gen)]
            t = torch.full((1,), 0.5, device=device)
            for groups, overlap in (args.variants if p > 1 else args.variants[:1]):
                sequence.HEAD_GROUPS = groups
                torch._dynamo.reset()
                options = compile_module.OVERLAP_COMMUNICATION if overlap else {}
                compile_module.compile_blocks(blocks, options=options)
                call = GraphedCall(functools.partial(stages._forward, transformer))
                with torch.no_grad():
                    row = _measure(comm, call, (x, t, embeds))
                row |= {"ulysses": p, "size": size, "head_groups": groups, "overlap": overlap}
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
    if rank == 0:
        machine = {"host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        report = {"machine": machine, "config": vars(args) | {"out": str(args.out)}, "results": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    dist.destroy_process_group()


def _measure(comm: Comm, call: GraphedCall, inputs: tuple) -> dict:
    for _ in range(4):  # warm-up calls, capture, a first replay
        call(*inputs)
    times = []
    for _ in range(3):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            call(*inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 20)
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(*inputs)
        torch.cuda.synchronize()
    events = prof.key_averages()
    nccl = sum(e.self_device_time_total for e in events if "nccl" in e.key.lower()) / 1e3
    busy = sum(e.self_device_time_total for e in events) / 1e3
    per_rank = comm.all_gather_object({"nccl_ms": round(nccl, 3), "kernels_ms": round(busy, 3)})
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:40]
    return {"forward_ms": round(statistics.median(times), 3), "ranks": per_rank,
            "top_kernels_ms": {e.key[:120]: round(e.self_device_time_total / 1e3, 3) for e in top}}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--degrees", default="1,2,4", help="Ulysses degrees to measure (each divides --gpus)")
    p.add_argument("--layers", type=int, default=6, help="main layers (the released DiT has 30)")
    p.add_argument("--sizes", default="1024x1024,2048x2048", help="HxW list")
    p.add_argument("--variants", type=lambda v: [(int(g), o == "on") for g, o in (x.split(":") for x in v.split(","))],
                   default="1:off,1:on,2:off,2:on", help="head_groups:overlap pairs")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ulysses_layers.json")
    return p


if __name__ == "__main__":
    sys.exit(main())
