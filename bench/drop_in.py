"""The cost of sampling from the host, one request per step (Z-Image Parallel MODEL under KSampler), against one
request for the whole loop (our Z-Image Denoise node), on the same model, size, steps and runner.

    python bench/drop_in.py --sizes 1024x1024 --steps 8 --out FILE.json            # one GPU
    python bench/drop_in.py --device cpu --scale tiny --sizes 64x64 --out FILE.json  # a check on CPU

Both run the DiT the same number of times on the same inputs. "denoise": the zimage.denoise stage (the loop in the
workers). "per_step": models/zimage/comfyui_model.DiTClient's zimage.predict once per step, with ComfyUI's Euler
update (k-diffusion's sample_euler: x += (x - denoised) / sigma * (next sigma - sigma)) on the host between calls,
as KSampler with euler runs it. The host keeps the latents and the caption on --device, as ComfyUI keeps them on its
GPU: done on the host's CPU, that update competed for the cores with the worker's threads and cost up to 38 ms a step
on a 16-core H200 host, which ComfyUI never pays. ComfyUI's own Python around each call (its sampler, cond batching)
is not included (no ComfyUI on the benchmark machines). Runners: "local" (in the host process, what 1 GPU uses) and
"group" (a worker group of the given size: the request, its tensors and the reply cross processes as with several
GPUs). The two run in turn, each figure the median of --repeats after --warmup;
overhead_per_step_ms = (per_step - denoise) / steps, and the host's share of a step is split into
sampler_ms (the Euler update), client_ms (DiTClient deciding what to send) and request_ms (the request's round trip,
the DiT call included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from comfyui_parallel_diffusion.models.zimage import tiny as zimage_tiny  # noqa: E402
from comfyui_parallel_diffusion.models.zimage.comfyui_model import DiTClient  # noqa: E402
from comfyui_parallel_diffusion.models.zimage.stages import _scheduler  # noqa: E402
from comfyui_parallel_diffusion.parallel import Layout, LocalRunner  # noqa: E402
from comfyui_parallel_diffusion.parallel.group import WorkerGroup  # noqa: E402
import denoise as denoise_bench  # noqa: E402
import random_models  # noqa: E402


def runners(args, dtype):
    for kind in args.runners.split(","):
        if kind == "local":
            yield "local", LocalRunner(random_models, args.device, dtype)
        else:
            gpus = int(kind.removeprefix("group"))
            yield kind, WorkerGroup(Layout.for_world(gpus), args.device, dtype, **denoise_bench.PLUGIN)


def per_step(runner, latents, caption, steps, split: dict[str, float] | None = None) -> torch.Tensor:
    """The sampler loop on the host: one zimage.predict per step, Euler between them. `split` (if given) gets the
    seconds spent in each part of the host's loop (see the module's docstring)."""
    split = {} if split is None else split
    split.update(sampler_ms=0.0, client_ms=0.0, request_ms=0.0)

    def run(stage, inputs):
        started = time.perf_counter()
        result = runner.run(stage, "bench", inputs)
        split["request_ms"] += time.perf_counter() - started
        return result

    client = DiTClient(run)
    # the sigmas the denoise stage runs: random_models' Z-Image keeps the tiny model's scheduler config
    scheduler, timesteps = _scheduler(SimpleNamespace(scheduler_config=zimage_tiny.SCHEDULER_CONFIG), latents, steps,
                                      1.0)
    sigmas = scheduler.sigmas.to(caption.device)
    x = latents.to(caption.device)
    for i in range(len(timesteps)):
        started = time.perf_counter()
        sigma = sigmas[i].reshape(1).expand(x.shape[0])
        (out,) = client.predict(x, sigma, [[caption] * x.shape[0]], [])
        called = time.perf_counter()
        denoised = x - out.to(x) * sigmas[i]
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        _synchronize(x)
        split["sampler_ms"] += time.perf_counter() - called
        split["client_ms"] += called - started
    split["client_ms"] -= split["request_ms"]
    for part in split:
        split[part] *= 1e3 / steps
    return x.cpu()


def _synchronize(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def alternating(fns, warmup: int, repeats: int) -> list[tuple[float, list[float], object]]:
    """Each function's median time and last result, the functions run in turn (so a slow phase of the machine hits
    both alike)."""
    times, results = [[] for _ in fns], [None] * len(fns)
    for i in range(warmup + repeats):
        for j, fn in enumerate(fns):
            started = time.perf_counter()
            results[j] = fn()
            if i >= warmup:
                times[j].append(time.perf_counter() - started)
    return [(statistics.median(t), t, r) for t, r in zip(times, results)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024x1024", help="HxW list")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--caption-tokens", type=int, default=128)
    p.add_argument("--runners", default="local,group1", help="local and/or groupN (a worker group of N ranks)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--scale", choices=sorted(random_models.SCALES), default="full")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "drop_in.json")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cap_dim = random_models.SCALES[args.scale]["dit"]["cap_feat_dim"]
    caption = torch.randn(args.caption_tokens, cap_dim, generator=torch.Generator().manual_seed(0)).to(args.device)
    results = []
    for kind, runner in runners(args, dtype):
        try:
            runner.load("bench", "zimage_random", scale=args.scale)
            for size in args.sizes.split(","):
                height, width = (int(v) for v in size.split("x"))
                latents = runner.run("zimage.prepare", "bench", {"batch": 1, "height": height, "width": width,
                                                                 "seed": 0})
                stage_inputs = {"latents": latents, "prompt_embeds": [caption], "negative_prompt_embeds": [],
                                "steps": args.steps, "guidance": 0.0}
                split: dict[str, float] = {}
                (loop_s, loop_runs, loop_out), (step_s, step_runs, step_out) = alternating(
                    [lambda: runner.run("zimage.denoise", "bench", stage_inputs),
                     lambda: per_step(runner, latents, caption, args.steps, split)], args.warmup, args.repeats)
                row = {"runner": kind, "height": height, "width": width, "steps": args.steps,
                       "denoise_s": loop_s, "per_step_s": step_s, "ratio": step_s / loop_s,
                       "overhead_per_step_ms": (step_s - loop_s) / args.steps * 1e3,
                       "host_split_last_run_ms_per_step": split,
                       "denoise_runs_s": loop_runs, "per_step_runs_s": step_runs,
                       "latents_max_abs_diff": (step_out.float() - loop_out.float()).abs().max().item()}
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("runs_s")}), flush=True)
        finally:
            runner.close()
    report = {"machine": denoise_bench._machine(args.device), "config": {k: str(v) for k, v in vars(args).items()},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
