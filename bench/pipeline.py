"""Whole-pipeline time per model: this project's stages on 1, 2, 4, ... GPUs, side by side with diffusers' own
pipeline on one GPU, in one run.

    python bench/pipeline.py --model zimage --gpus 1,2,4 --out bench/results/zimage_pipeline.json
    python bench/pipeline.py --model glm_image --gpus 1,2,4 --cfg-parallel --out bench/results/glm_pipeline.json
    python bench/pipeline.py --model zimage --scale tiny --device cpu --gpus 1,2 --size 64x64 --steps 2 --out p.json

Every component at full size with random weights (bench/random_models.py; speed does not depend on weight values):
Z-Image's DiT, a Qwen3-4B-shaped text encoder and the VAE; GLM-Image's DiT, glyph encoder, VAE and the ~10 B AR
decoder of bench/ar.py. Tokenizers and the GLM processor are the tiny offline ones (token ids are all they supply;
the tiny Z-Image tokenizer is byte-level, so the prompt below is 140 caption tokens).

Per world size, through the project's worker group (one GPU: in-process) and the same generate() the CLI runs, the
host's wall clock around each stage of one generation (Z-Image: encode, prepare, denoise, decode; GLM-Image: ar,
prepare, denoise, decode) and around the whole call; medians of --repeats after --warmup calls (warm-up calls are
kept in the JSON: on CUDA the first GLM call compiles the AR decode step, ~25 s, once per worker process).

In the same run, on one GPU: diffusers' ZImagePipeline / GlmImagePipeline assembled in this process from the same
random modules (same configs and seeds), called as a user would (torch.Generator("cpu").manual_seed(seed),
output_type="np"), timed the same way; its AR / text encoding / VAE decode are timed inside the call too. Each
phase frees its GPU memory before the next. The images are compared with diffusers' (PSNR): on CPU (fp32) the
project equals diffusers; on GPU (bf16) Z-Image stays close, GLM-Image's compiled AR may sample other tokens than
diffusers' eager generate() (bench/ar.py), so its images differ and its token agreement is reported instead.

GLM-Image at 1024x1024 samples 1281 AR tokens: diffusers' plain generate() takes ~33 s of a ~47 s call on an H200,
so GLM defaults to --warmup 1 --repeats 1 (the estimate printed at the start covers the whole run, ~6 min at the
defaults); Z-Image defaults to --warmup 1 --repeats 3 (~1.5 min).
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the host imports the plugin too when it runs 1 GPU in-process

from comfyui_parallel_diffusion.models.glm_image import pipeline as glm_image_pipeline  # noqa: E402
from comfyui_parallel_diffusion.models.glm_image import inputs as glm_image_inputs  # noqa: E402
from comfyui_parallel_diffusion.models.glm_image import tiny as glm_tiny  # noqa: E402
from comfyui_parallel_diffusion.models.zimage import pipeline as zimage_pipeline  # noqa: E402
from comfyui_parallel_diffusion.models.zimage import stages as zimage_stages  # noqa: E402
from comfyui_parallel_diffusion.models.zimage import tiny as zimage_tiny  # noqa: E402
from comfyui_parallel_diffusion.parallel import Layout  # noqa: E402
from comfyui_parallel_diffusion.parallel.pool import get_runner, release  # noqa: E402
import random_models  # noqa: E402
from denoise import _machine  # noqa: E402

PLUGIN = {"plugin": "random_models", "extra_sys_path": [str(BENCH)]}
KEY = "bench"


class ZImageBench:
    name, loader, stages = "zimage", "zimage_random_pipeline", ("encode", "prepare", "denoise", "decode")
    defaults = {"steps": 8, "guidance": 0.0, "repeats": 3, "warmup": 1}  # Z-Image-Turbo
    prompt = ("A lighthouse on a rocky coast at dusk, warm light in its windows, waves breaking on the rocks below, "
              "gulls over the water")
    size_multiple = zimage_stages.SIZE_MULTIPLE

    def __init__(self, args):
        self.args = args

    def uses_cfg(self) -> bool:
        return self.args.guidance > 0

    def project(self, runner) -> torch.Tensor:
        a = self.args
        images, _ = zimage_pipeline.generate(runner, KEY, prompt=a.prompt or self.prompt, height=a.height,
                                             width=a.width, steps=a.steps, guidance=a.guidance, seed=a.seed)
        return images

    def diffusers_pipeline(self, device, dtype):
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        modules = random_models.zimage_modules(self.args.scale, device, dtype, text=True)
        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**zimage_tiny.SCHEDULER_CONFIG), **modules)

    def diffusers_timers(self, pipe) -> dict:
        return {"encode": (pipe, "encode_prompt"), "decode": (pipe.vae, "decode")}

    def diffusers(self, pipe) -> torch.Tensor:
        a = self.args
        out = pipe(a.prompt or self.prompt, height=a.height, width=a.width, num_inference_steps=a.steps,
                   guidance_scale=a.guidance, generator=torch.Generator("cpu").manual_seed(a.seed), output_type="np")
        return torch.from_numpy(out.images)

    def workload(self) -> dict:
        tokenizer = zimage_tiny._tiny_tokenizer()
        text = tokenizer.apply_chat_template([{"role": "user", "content": self.args.prompt or self.prompt}],
                                             tokenize=False, add_generation_prompt=True, enable_thinking=True)
        return {"prompt": self.args.prompt or self.prompt, "caption_tokens": len(tokenizer(text).input_ids),
                "text_encoder_tokens": zimage_stages.MAX_SEQUENCE_LENGTH,
                "negative_prompt": '""' if self.uses_cfg() else None}


class GlmImageBench:
    name, loader, stages = "glm_image", "glm_image_random_pipeline", ("ar", "prepare", "denoise", "decode")
    defaults = {"steps": 50, "guidance": 1.5, "repeats": 1, "warmup": 1}  # diffusers' GlmImagePipeline defaults
    prompt = 'A cozy cafe at night with a neon sign that says "OPEN", rain on the window, people reading inside'
    size_multiple = glm_image_inputs.SIZE_MULTIPLE

    def __init__(self, args):
        self.args = args

    def uses_cfg(self) -> bool:
        return self.args.guidance > 1

    def project(self, runner) -> torch.Tensor:
        a = self.args
        images, _ = glm_image_pipeline.generate(runner, KEY, prompt=a.prompt or self.prompt, height=a.height,
                                                width=a.width, steps=a.steps, guidance=a.guidance, seed=a.seed)
        return images

    def diffusers_pipeline(self, device, dtype):
        from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline

        modules = random_models.glm_image_modules(self.args.scale, device, dtype)
        del modules["vae_config"]  # the pipeline reads it from its VAE
        ar_model, processor = random_models.glm_image_ar(self.args.scale, device, dtype)
        return GlmImagePipeline(vision_language_encoder=ar_model, processor=processor,
                                scheduler=FlowMatchEulerDiscreteScheduler(**random_models.GLM_SCHEDULER), **modules)

    def diffusers_timers(self, pipe) -> dict:
        return {"ar": (pipe, "generate_prior_tokens"), "encode": (pipe, "encode_prompt"),
                "decode": (pipe.vae, "decode")}

    def diffusers(self, pipe) -> torch.Tensor:
        a = self.args
        out = pipe(prompt=a.prompt or self.prompt, height=a.height, width=a.width, num_inference_steps=a.steps,
                   guidance_scale=a.guidance, generator=torch.Generator("cpu").manual_seed(a.seed), output_type="np")
        return torch.from_numpy(out.images)

    def workload(self) -> dict:
        return {"prompt": self.args.prompt or self.prompt, **ar_request(self.args.prompt or self.prompt,
                                                                         self.args.height, self.args.width)}


BENCHES = {"zimage": ZImageBench, "glm_image": GlmImageBench}


def ar_request(prompt: str, height: int, width: int) -> dict:
    """What the AR stage is asked for: prompt tokens (tiny processor) and tokens sampled (target + preview grid + 1)."""
    processor, _ = glm_tiny._processor()
    messages = [[{"role": "user", "content": [{"type": "text", "text": prompt}]}]]
    inputs = processor.apply_chat_template(messages, tokenize=True, target_h=height, target_w=width,
                                           return_dict=True, return_tensors="pt")
    grids = inputs["image_grid_thw"].tolist()
    return {"ar_prompt_tokens": int(inputs["input_ids"].shape[1]), "ar_grids": grids,
            "ar_new_tokens": sum(h * w for _, h, w in grids) + 1}


# -- measuring ---------------------------------------------------------------------------------------------------

class TimedRunner:
    """The runner as generate() sees it, with the host's wall clock around every stage request."""

    def __init__(self, runner):
        self.runner, self.layout = runner, runner.layout
        self.times: dict[str, float] = {}
        self.outputs: dict[str, object] = {}
        self.inputs: dict[str, dict] = {}

    def run(self, stage: str, model_key, inputs: dict, **kwargs):
        self.inputs[stage] = inputs
        started = time.perf_counter()
        out = self.runner.run(stage, model_key, inputs, **kwargs)
        self.times[stage.rpartition(".")[2]] = time.perf_counter() - started
        self.outputs[stage] = out
        return out


def measure(call, warmup: int, repeats: int) -> dict:
    """call() -> (per-stage seconds, image, extras) for one generation; timed around the whole call too."""
    runs, image, extras = [], None, {}
    for _ in range(warmup + repeats):
        started = time.perf_counter()
        stages, image, extras = call()
        total = time.perf_counter() - started
        runs.append({**{k: round(v, 4) for k, v in stages.items()}, "total": round(total, 4)})
    timed = runs[warmup:]
    medians = {k: round(statistics.median(r[k] for r in timed), 4) for k in timed[0]}
    return {"total_s": medians.pop("total"), "stages_s": medians, "runs_s": timed, "warmup_runs_s": runs[:warmup],
            "image": image, **extras}


def run_project(bench, args, gpus: int, dtype: torch.dtype) -> dict:
    layout = Layout.for_world(gpus, cfg=2 if args.cfg_parallel and gpus > 1 else 1)
    started = time.perf_counter()
    runner = get_runner(layout, args.device, dtype, **PLUGIN)
    runner.load(KEY, bench.loader, scale=args.scale)
    load_s = time.perf_counter() - started
    host_memory = _reset_peak(args.device)

    last = {}

    def call():
        timed = TimedRunner(runner)
        image = bench.project(timed)
        last["inputs"] = timed.inputs
        extras = {}
        if "glm_image.ar" in timed.outputs:
            extras["prior_token_ids"] = timed.outputs["glm_image.ar"]["prior_token_ids"]
        return timed.times, image, extras

    row = {"gpus": gpus, "layout": layout.describe(), "group_start_and_load_s": round(load_s, 2),
           **measure(call, args.warmup, args.repeats)}
    if args.profile:  # the stage once more, as the last call asked for it, under torch.profiler on every rank
        row["profile"] = runner.run("bench.profile", KEY, {"stage": args.profile, "inputs": last["inputs"][args.profile]},
                                    collect="all")
        print(json.dumps(row["profile"][0]["kernels_s"]), flush=True)
    if gpus == 1 and host_memory:  # in-process: the host's own peak
        row["peak_memory_gib"] = _peak_gib(args.device)
    release()
    _free(args.device)
    return row


def run_diffusers(bench, args, dtype: torch.dtype) -> dict:
    device = torch.device(args.device)
    started = time.perf_counter()
    pipe = bench.diffusers_pipeline(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - started
    _reset_peak(args.device)  # as for the project: the peak while generating, not while building
    times, captured = {}, {}
    for stage, (owner, attr) in bench.diffusers_timers(pipe).items():
        setattr(owner, attr, _timed(getattr(owner, attr), stage, times, captured, device))

    def call():
        times.clear()
        started = time.perf_counter()
        image = bench.diffusers(pipe)
        times["rest"] = time.perf_counter() - started - sum(times.values())  # latents, loop, postprocessing
        extras = {"prior_token_ids": captured["ar"][0].cpu()} if "ar" in captured else {}
        return dict(times), image, extras

    row = {"gpus": 1, "pipeline": type(pipe).__name__, "build_s": round(build_s, 2),
           **measure(call, args.warmup, args.repeats)}
    row["peak_memory_gib"] = _peak_gib(args.device)
    captured.clear()  # its last outputs (GPU tensors) go with the pipeline
    pipe = call = None  # noqa: F841  the last references: _free() can then release its memory
    _free(args.device)
    return row


def _timed(fn, stage: str, times: dict, captured: dict, device: torch.device):
    """fn, with the seconds it took (its GPU work finished) added to times[stage] and its last result kept."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - started
        captured[stage] = out
        return out
    return wrapper


def _reset_peak(device: str) -> bool:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch._dynamo.reset()  # an in-process GLM run compiled the AR decode step: its CUDA graphs hold memory
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def compare(image: torch.Tensor, ref: torch.Tensor) -> dict:
    image, ref = image.float(), ref.float()
    if image.shape != ref.shape:
        return {"error": f"shapes differ: {tuple(image.shape)} vs {tuple(ref.shape)}"}
    mse = (image - ref).pow(2).mean().item()
    return {"image_psnr_db": round(10 * math.log10(1.0 / mse), 2) if mse > 0 else "inf",
            "image_max_abs_diff": round((image - ref).abs().max().item(), 6)}


def token_agreement(tokens: torch.Tensor, ref: torch.Tensor) -> dict:
    if tokens.shape != ref.shape:
        return {"error": f"shapes differ: {tuple(tokens.shape)} vs {tuple(ref.shape)}"}
    same = (tokens == ref).flatten()
    differ = (~same).nonzero()
    return {"equal_fraction": round(same.float().mean().item(), 4),
            "identical_prefix": int(differ[0]) if len(differ) else int(same.numel()), "tokens": int(same.numel())}


# -- the run -----------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = _parse(argv)
    bench = BENCHES[args.model](args)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    worlds = [int(g) for g in args.gpus.split(",")]
    started = time.perf_counter()
    workload = {"height": args.height, "width": args.width, "steps": args.steps, "guidance": args.guidance,
                "seed": args.seed, "batch": 1, **bench.workload()}
    estimate = estimate_s(args, workload, worlds)
    print(f"{args.model} {args.width}x{args.height}, {args.steps} steps, guidance {args.guidance}, GPUs {worlds}, "
          f"warmup {args.warmup} + repeats {args.repeats}: estimated wall time on H200s ~{estimate['total_s']:.0f} s"
          + ("" if args.scale == "full" and args.device == "cuda" else " (an estimate for full size on CUDA)"),
          flush=True)
    print(json.dumps(estimate), flush=True)
    report = {"benchmark": "pipeline", "model": args.model, "machine": _machine(args.device),
              "command": " ".join(sys.argv), "config": {k: str(v) for k, v in vars(args).items()},
              "workload": workload, "weights": "random N(0, 0.02), bench/random_models.py (same seeds on both sides)",
              "timing": "host wall clock per stage request and per whole call; median of repeats after warm-up",
              "estimate_s": estimate, "diffusers_1gpu": None, "results": []}

    def save(phase: str) -> None:
        report["phase_done"], report["elapsed_s"] = phase, round(time.perf_counter() - started, 1)
        report["summary"] = summarize(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
        print(f"[{report['elapsed_s']:7.1f} s] {phase}", flush=True)

    reference = None
    if not args.no_diffusers:
        row = run_diffusers(bench, args, dtype)
        reference = row.pop("image"), row.pop("prior_token_ids", None)
        report["diffusers_1gpu"] = row
        print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
        save("diffusers 1 GPU")
    first = None
    for gpus in worlds:
        row = run_project(bench, args, gpus, dtype)
        image, tokens = row.pop("image"), row.pop("prior_token_ids", None)
        if reference is not None:
            row["vs_diffusers"] = compare(image, reference[0])
            if tokens is not None and reference[1] is not None:
                row["vs_diffusers"]["ar_tokens"] = token_agreement(tokens, reference[1])
        if first is None:
            first = gpus, image, tokens
        elif first[0] == 1:
            row["vs_project_1gpu"] = compare(image, first[1])
            if tokens is not None:
                row["vs_project_1gpu"]["ar_tokens"] = token_agreement(tokens, first[2])
        report["results"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
        save(f"project {gpus} GPU(s)")
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {args.out} after {report['elapsed_s']:.0f} s (estimated {estimate['total_s']:.0f} s)")


def summarize(report: dict) -> dict:
    diffusers = report["diffusers_1gpu"]
    base = diffusers["total_s"] if diffusers else None
    one = next((r["total_s"] for r in report["results"] if r["gpus"] == 1), None)
    out = {"diffusers_1gpu_s": base, "diffusers_1gpu_stages_s": diffusers["stages_s"] if diffusers else None,
           "total_s": {str(r["gpus"]): r["total_s"] for r in report["results"]},
           "stages_s": {str(r["gpus"]): r["stages_s"] for r in report["results"]}}
    if base:
        out["speedup_vs_diffusers_1gpu"] = {str(r["gpus"]): round(base / r["total_s"], 3) for r in report["results"]}
    if one:
        out["speedup_vs_project_1gpu"] = {str(r["gpus"]): round(one / r["total_s"], 3) for r in report["results"]}
    tokens = report["workload"].get("ar_new_tokens")
    if tokens:  # GLM-Image: ~25.6 ms/token is plain generate() on an H200, ~7.4 the project's compiled decode
        rows = ([("diffusers_1gpu", diffusers)] if diffusers else []) + [(str(r["gpus"]), r) for r in report["results"]]
        out["ar_ms_per_token"] = {k: round(r["stages_s"]["ar"] / tokens * 1e3, 2) for k, r in rows}
    return out


# -- the estimate ------------------------------------------------------------------------------------------------

# Measured on 4x H200 (bench/results, README): 1024x1024 DiT seconds per step on one GPU, both guidance branches
# where the model runs them; the speedup of the denoise on N GPUs; the AR's ms/token (plain generate() and the
# compiled decode) and its one-off compile; group start; building random modules on a GPU; the VAE decode.
H200 = {
    "zimage": {"step_s": 1.156 / 8, "cfg_factor": 2.35 / 1.156, "other_s": 0.35, "build_s": 15.0},
    "glm_image": {"step_s": 13.42 / 50, "cfg_factor": 2.0, "other_s": 0.45, "build_s": 20.0,
                  "ar_plain_ms": 25.6, "ar_fast_ms": 7.4, "ar_compile_s": 27.0},
}
SPEEDUP = {"cfg": {1: 1.0, 2: 1.97, 4: 3.19, 8: 5.0}, "ulysses": {1: 1.0, 2: 1.63, 4: 2.57, 8: 3.5}}
PIXEL_EXPONENT = 1.15  # DiT time per step grows a little faster than the token count (attention)
HOST_START_S, GROUP_START_S, DIFFUSERS_LOOP_FACTOR = 20.0, 12.0, 1.05


def estimate_s(args, workload: dict, worlds: list[int]) -> dict:
    """The run's wall time on H200s, from the timings measured so far (bench/results): a guide, not a result."""
    c = H200[args.model]
    uses_cfg = BENCHES[args.model](args).uses_cfg()
    step = c["step_s"] * (args.height * args.width / 1024 ** 2) ** PIXEL_EXPONENT
    if args.model == "zimage" and uses_cfg:  # measured without guidance (Turbo): a batch of two with it
        step *= c["cfg_factor"]
    if args.model == "glm_image" and not uses_cfg:  # measured with guidance: two DiT calls per step
        step /= c["cfg_factor"]
    denoise_1 = step * args.steps
    tokens = workload.get("ar_new_tokens", 0)
    calls = args.warmup + args.repeats
    diffusers_call = denoise_1 * DIFFUSERS_LOOP_FACTOR + c["other_s"] + tokens * c.get("ar_plain_ms", 0) / 1e3
    out = {"host_start_s": HOST_START_S, "diffusers_s": 0.0 if args.no_diffusers else
           round(c["build_s"] + calls * diffusers_call, 1), "diffusers_call_s": round(diffusers_call, 1)}
    for gpus in worlds:
        kind = "cfg" if args.cfg_parallel and gpus > 1 else "ulysses"
        speedup = SPEEDUP[kind].get(gpus, gpus * 0.6)
        call = denoise_1 / speedup + c["other_s"] + tokens * c.get("ar_fast_ms", 0) / 1e3
        once = (c["build_s"] if gpus == 1 else GROUP_START_S + c["build_s"] / 2) + c.get("ar_compile_s", 0)
        out[f"project_{gpus}gpu_s"] = round(once + calls * call, 1)
        out[f"project_{gpus}gpu_call_s"] = round(call, 1)
    out["total_s"] = round(sum(v for k, v in out.items() if k.endswith("_s") and not k.endswith("call_s")), 0)
    return out


# -- command line ------------------------------------------------------------------------------------------------

def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(BENCHES), default="zimage")
    p.add_argument("--gpus", default="1,2,4", help="world sizes, side by side; include 1 for the 1-GPU ratios")
    p.add_argument("--size", default="1024x1024", help="HxW")
    p.add_argument("--steps", type=int, help="default: 8 for zimage (Turbo), 50 for glm_image")
    p.add_argument("--guidance", type=float, help="default: 0 for zimage (Turbo), 1.5 for glm_image")
    p.add_argument("--cfg-parallel", action="store_true", help="cfg 2 (x ulysses N/2) on more than one GPU")
    p.add_argument("--repeats", type=int, help="timed calls (median); default 3 for zimage, 1 for glm_image")
    p.add_argument("--warmup", type=int, help="untimed calls first (kept in the JSON); default 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", help="another prompt than the built-in one")
    p.add_argument("--profile", metavar="STAGE",
                   help="after the timed calls, run this stage (e.g. glm_image.ar) once more under torch.profiler on "
                        "every rank (a stage every rank can run: the GLM-Image AR on 1 GPU or tensor-parallel)")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' own pipeline")
    p.add_argument("--scale", choices=sorted(random_models.SCALES), default="full")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", type=Path, help="JSON file (default bench/results/<model>_pipeline.json)")
    args = p.parse_args(argv)
    bench = BENCHES[args.model]
    for name, value in bench.defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.out = args.out or BENCH / "results" / f"{args.model}_pipeline.json"
    try:
        args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must be HxW, e.g. 1024x1024, got {args.size!r}")
    if args.height % bench.size_multiple or args.width % bench.size_multiple:
        p.error(f"{args.model} sizes must be multiples of {bench.size_multiple}, got {args.size}")
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1:
        p.error("--repeats and --steps must be >= 1, --warmup >= 0")
    worlds = [int(g) for g in args.gpus.split(",")]
    if args.cfg_parallel and not bench(args).uses_cfg():
        p.error(f"--cfg-parallel needs guidance that runs two branches ({args.model}: guidance "
                f"{'> 0' if args.model == 'zimage' else '> 1'}), got {args.guidance}")
    if args.cfg_parallel and any(g > 1 and g % 2 for g in worlds):
        p.error(f"--cfg-parallel needs even world sizes above 1, got {args.gpus}")
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        p.error(f"--gpus {args.gpus} needs {max(worlds)} GPUs, {torch.cuda.device_count()} visible")
    return args


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    main()
