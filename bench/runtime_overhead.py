"""What the worker group costs by itself on CPU (gloo): starting the group, one request's round trip through an
empty stage, and tearing the group down, for 1, 2 and 4 ranks. Prints a table and writes JSON (--out).

    python bench/runtime_overhead.py [--out PATH] [--requests 200] [--repeats 3]

This file is also the plugin its workers load (the empty stage below), so a worker imports nothing but torch and
the runtime: the start time is the runtime's own, not a model library's."""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from comfyui_parallel_diffusion.parallel import Layout, Parallelism, Stage, WorkerGroup

STAGES = {"empty": Stage("empty", Parallelism.REPLICATED, lambda ctx, model: None)}
LOADERS: dict = {}
HERE = os.path.dirname(os.path.abspath(__file__))
WORLD_SIZES = (1, 2, 4)


def measure(world_size: int, requests: int) -> dict:
    begin = time.perf_counter()
    group = WorkerGroup(Layout.for_world(world_size), plugin="runtime_overhead", extra_sys_path=[HERE])
    start_s = time.perf_counter() - begin
    group.run("empty", None, {})  # the first request of a group also connects gloo pairs lazily
    round_trips_ms = []
    for _ in range(requests):
        begin = time.perf_counter()
        group.run("empty", None, {})
        round_trips_ms.append((time.perf_counter() - begin) * 1e3)
    begin = time.perf_counter()
    group.close()
    teardown_s = time.perf_counter() - begin
    return {"start_s": start_s, "round_trip_ms": round_trips_ms, "teardown_s": teardown_s}


def summarise(world_size: int, runs: list[dict]) -> dict:
    trips = sorted(ms for run in runs for ms in run["round_trip_ms"])
    return {
        "world_size": world_size,
        "start_s": {"median": statistics.median(r["start_s"] for r in runs), "all": [r["start_s"] for r in runs]},
        "round_trip_ms": {"median": statistics.median(trips), "p90": trips[int(0.9 * (len(trips) - 1))],
                          "min": trips[0], "count": len(trips)},
        "teardown_s": {"median": statistics.median(r["teardown_s"] for r in runs),
                       "all": [r["teardown_s"] for r in runs]},
    }


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "load_average_at_start": os.getloadavg(), "python": sys.version.split()[0], "torch": torch.__version__,
            "backend": "gloo", "device": "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "runtime_overhead_cpu.json"))
    parser.add_argument("--requests", type=int, default=200, help="timed round trips per group")
    parser.add_argument("--repeats", type=int, default=3, help="groups started per world size")
    args = parser.parse_args()
    info = machine()
    results = [summarise(n, [measure(n, args.requests) for _ in range(args.repeats)]) for n in WORLD_SIZES]
    print(f"{'ranks':>5} {'start s':>8} {'round trip ms (median / p90)':>30} {'teardown s':>11}")
    for r in results:
        trip = r["round_trip_ms"]
        print(f"{r['world_size']:>5} {r['start_s']['median']:>8.2f} {trip['median']:>20.2f} / {trip['p90']:<7.2f}"
              f" {r['teardown_s']['median']:>11.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "runtime_overhead", "machine": info, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
