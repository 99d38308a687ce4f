"""What the worker group costs by itself: starting the group, one request's round trip through a stage that does no
work, and tearing the group down, for 1, 2 and 4 ranks. Prints a table and writes JSON (--out).

    python bench/runtime_overhead.py [--out PATH] [--requests 200] [--repeats 3]
    python bench/runtime_overhead.py --device cuda --payload 1024x1024 --ranks 1,2,4 --out PATH

--payload HxW sends what a Z-Image denoise request of that size carries (latents and a 128-token caption) and
returns latents, as bench/denoise.py's requests do, and records where each request's time goes: the wall-clock
moments (one clock for every process of the host) at which the host sent it, rank 0 received it, each rank
finished the request broadcast, entered and left the stage, and finished the closing collective, rank 0 began its
reply, and the host had the reply.

This file is also the plugin its workers load (the stages below), so a worker imports nothing but torch and the
runtime: the start time is the runtime's own, not a model library's."""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from comfyui_parallel_diffusion.parallel import Layout, Loader, Parallelism, Stage, get_runner, release
from comfyui_parallel_diffusion.parallel import channel, comm

HERE = os.path.dirname(os.path.abspath(__file__))
CAPTION = (128, 2560)  # a Z-Image caption: tokens x Qwen3-4B hidden size
# Per request, the moments each rank records, in order (rank 0 alone receives and replies). "closed": the
# collective that ends a request on every rank.
RANK0_MOMENTS = ("received", "broadcast", "entered", "left", "closed", "replying")
OTHER_MOMENTS = ("broadcast", "entered", "left", "closed")


def echo(ctx, model, **inputs):
    """What a denoise stage does with its payload, minus the denoising: latents to the device and back."""
    if model is not None:
        model.append(("entered", time.time()))
    latents = inputs["latents"].to(ctx.device).cpu() if "latents" in inputs else None
    if model is not None:
        model.append(("left", time.time()))
    return latents


def trace(ctx, **_):
    """A list the request path appends (moment, wall time) to on this rank: the runtime's own functions are
    wrapped, so the requests traced are the ones a user's take."""
    moments: list[tuple[str, float]] = []

    def mark(cls, name, moment, before=False):
        original = getattr(cls, name, None)
        if original is None:
            return

        def wrapped(self, *args, **kwargs):
            if before:
                moments.append((moment, time.time()))
            out = original(self, *args, **kwargs)
            if not before:
                moments.append((moment, time.time()))
            return out
        setattr(cls, name, wrapped)

    mark(comm.Comm, "broadcast_object", "broadcast")
    # The closing collective: a gather for collect="all" (and for every request before commit c4354f7), else a barrier.
    mark(comm.Comm, "all_gather_object", "closed")
    mark(comm.Comm, "barrier", "closed")
    if ctx.comm.is_main and ctx.comm.distributed:
        mark(channel.Channel, "recv", "received")
        # Before the send: once the host has the reply it sends the next request, which the reader thread may
        # receive before this thread would get to append a moment after the send.
        mark(channel.Channel, "send", "replying", before=True)
    return moments


def traced_moments(ctx, model):
    """This rank's moments of the requests before this one, one dict per request."""
    names = RANK0_MOMENTS if ctx.comm.is_main else OTHER_MOMENTS
    if not ctx.comm.distributed:
        names = ("entered", "left")
    done = [i for i, (name, _) in enumerate(model) if name == names[-1]]
    finished, model[:] = model[:done[-1] + 1], model[done[-1] + 1:]  # this request's first moments stay
    # The reader thread was already waiting in recv when it was wrapped: the first request has no "received".
    while finished and finished[0][0] != names[0]:
        finished.pop(0)
    return [dict(finished[i:i + len(names)]) for i in range(0, len(finished), len(names))]


STAGES = {
    "echo": Stage("echo", Parallelism.EVERY_RANK, echo),
    "traced_moments": Stage("traced_moments", Parallelism.EVERY_RANK, traced_moments),
}
LOADERS = {"trace": Loader("trace", trace)}


def payload(size: str | None, seed: int = 0) -> dict:
    if size is None:
        return {}
    height, width = (int(v) for v in size.split("x"))
    gen = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(1, 16, height // 8, width // 8, generator=gen),
            "prompt_embeds": [torch.randn(*CAPTION, generator=gen)], "negative_prompt_embeds": [],
            "steps": 8, "guidance": 0.0}


def measure(world_size: int, args) -> dict:
    begin = time.perf_counter()
    group = get_runner(Layout.for_world(world_size), args.device, plugin="runtime_overhead", extra_sys_path=[HERE])
    start_s = time.perf_counter() - begin
    inputs = payload(args.payload)
    group.load("trace", "trace")
    group.run("echo", "trace", inputs)  # the first request of a group also connects gloo pairs lazily
    round_trips_ms, host = [], []
    for _ in range(args.requests):
        sent = time.time()
        begin = time.perf_counter()
        group.run("echo", "trace", inputs)
        round_trips_ms.append((time.perf_counter() - begin) * 1e3)
        host.append({"sent": sent, "replied": time.time()})
    ranks = group.run("traced_moments", "trace", {}, collect="all")
    begin = time.perf_counter()
    release()
    teardown_s = time.perf_counter() - begin
    return {"start_s": start_s, "round_trip_ms": round_trips_ms, "teardown_s": teardown_s,
            "phases_ms": phases(host, ranks)}


def phases(host: list[dict], ranks: list[list[dict]]) -> list[dict]:
    """Each request's time split at the moments traced: a phase ends when the last rank passed its moment (and not
    before the previous phase ended), so the phases add up to the round trip."""
    out = []
    count = min(len(rank) for rank in ranks)  # every rank has the last requests; the first may lack moments
    for i, times in enumerate(host[-count:]):
        per_rank = [rank[len(rank) - count + i] for rank in ranks]
        marks = [("sent", times["sent"])]
        for moment in RANK0_MOMENTS:
            seen = [r[moment] for r in per_rank if moment in r]
            if seen:  # rank 0 may pass the closing collective before the last rank returns from it
                marks.append((moment, max(seen + [marks[-1][1]])))
        marks.append(("host has reply", times["replied"]))
        out.append({f"{a}->{b}": (tb - ta) * 1e3 for (a, ta), (b, tb) in zip(marks, marks[1:])})
    return out


def summarise(world_size: int, runs: list[dict]) -> dict:
    trips = sorted(ms for run in runs for ms in run["round_trip_ms"])
    phase_rows = [row for run in runs for row in run["phases_ms"]]
    return {
        "world_size": world_size,
        "start_s": {"median": statistics.median(r["start_s"] for r in runs), "all": [r["start_s"] for r in runs]},
        "round_trip_ms": {"median": statistics.median(trips), "p90": trips[int(0.9 * (len(trips) - 1))],
                          "min": trips[0], "count": len(trips)},
        "phases_ms_median": {k: statistics.median(row[k] for row in phase_rows) for k in phase_rows[0]},
        "teardown_s": {"median": statistics.median(r["teardown_s"] for r in runs),
                       "all": [r["teardown_s"] for r in runs]},
    }


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "load_average_at_start": os.getloadavg(), "python": sys.version.split()[0], "torch": torch.__version__,
            "backend": "nccl + gloo" if device == "cuda" else "gloo", "device": device}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "runtime_overhead_cpu.json"))
    parser.add_argument("--requests", type=int, default=200, help="timed round trips per group")
    parser.add_argument("--repeats", type=int, default=3, help="groups started per world size")
    parser.add_argument("--ranks", default="1,2,4", help="world sizes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--payload", metavar="HxW", help="carry a Z-Image denoise request of this size")
    parser.add_argument("--note", default="", help="what the JSON should say about this run")
    args = parser.parse_args()
    info = machine(args.device)
    results = [summarise(n, [measure(n, args) for _ in range(args.repeats)]) for n in map(int, args.ranks.split(","))]
    print(f"{'ranks':>5} {'start s':>8} {'round trip ms (median / p90)':>30} {'teardown s':>11}")
    for r in results:
        trip = r["round_trip_ms"]
        print(f"{r['world_size']:>5} {r['start_s']['median']:>8.2f} {trip['median']:>20.2f} / {trip['p90']:<7.2f}"
              f" {r['teardown_s']['median']:>11.3f}")
        print("      " + ", ".join(f"{k} {v:.3f}" for k, v in r["phases_ms_median"].items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "runtime_overhead", "note": args.note, "machine": info,
                   "config": {k: v for k, v in vars(args).items() if k != "note"}, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
