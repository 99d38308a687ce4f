"""Denoising speed on 1, 2, 4, ... GPUs side by side in one run, with parity against the 1-GPU result.

    python bench/denoise.py --model zimage --gpus 1,2,4 --sizes 1024x1024,2048x2048,720x1280 --out FILE.json

Full-size models with random weights (bench/random_models.py) run through the project's own stages and worker
group; each timing is the host's wall clock around one denoise request (what a user waits for), median of
--repeats after --warmup. Then two requests with a new text length each, as a user's next prompts (new_text_s,
later_text_s): Z-Image's caption 5 and 40 tokens longer (40: another multiple of 32, to which Z-Image pads
captions), GLM-Image's quoted glyph text longer. On CUDA each has a new DiT call signature, so its CUDA graph is
captured anew (models/cuda_graph.py); the first also recompiles the text-dependent blocks for a dynamic length.
Parity: cosine of final latents and PSNR of decoded images against 1 GPU, next to the same figures for a 1-GPU run
that differs only in the attention kernel (SDPA's default vs memory-efficient on CUDA; compiled code and CUDA
graphs are made anew for it, since both fix the kernel when they are made).
Where the time goes, per size and GPU count, on every rank: --profile (torch.profiler: GPU time per kernel family
and the costliest kernels; the profiler itself slows the run) and --timeline (no profiler: CUDA events around each
DiT call, so the DiT's GPU time per step, what the stage spends outside it, and the host's wall time of the request).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the host imports the plugin too when it runs 1 GPU in-process

from comfyui_parallel_diffusion.parallel import Layout  # noqa: E402
from comfyui_parallel_diffusion.parallel.pool import get_runner, release  # noqa: E402
import random_models  # noqa: E402

# The 1-GPU control: the same run with another attention kernel than SDPA's default (an SDPBackend name).
SWAP_KERNEL = {"cuda": "EFFICIENT_ATTENTION", "cpu": "MATH"}
PLUGIN = {"plugin": "random_models", "extra_sys_path": [str(BENCH)]}


class ZImageWorkload:
    loader, prefix = "zimage_random", "zimage"

    def __init__(self, args):
        self.args = args
        self.cap_dim = random_models.SCALES[args.scale]["dit"]["cap_feat_dim"]

    def inputs(self, runner, height: int, width: int, text: int = 0) -> dict:
        gen = torch.Generator().manual_seed(0)
        latents = runner.run("zimage.prepare", "bench", {"batch": 1, "height": height, "width": width, "seed": 0})
        embeds = [torch.randn(self.args.caption_tokens + (0, 5, 40)[text], self.cap_dim, generator=gen)]
        negative = [torch.randn(16, self.cap_dim, generator=gen)] if self.args.guidance > 0 else []
        return {"latents": latents, "prompt_embeds": embeds, "negative_prompt_embeds": negative,
                "steps": self.args.steps, "guidance": self.args.guidance}


class GlmImageWorkload:
    """The real prepare stage (glyph text, seeded latents, shifted schedule), random AR tokens in the codebook."""
    loader, prefix = "glm_image_random", "glm_image"

    def __init__(self, args):
        self.args = args
        self.codebook = random_models.SCALES[args.scale]["glm_dit"]["prior_vq_quantizer_codebook_size"]

    GLYPHS = ("OPEN", "OPEN LATE", "OPEN EVERY DAY UNTIL MIDNIGHT")

    def inputs(self, runner, height: int, width: int, text: int = 0) -> dict:
        prepared = runner.run("glm_image.prepare", "bench", {
            "prompt": f'a shop sign that says "{self.GLYPHS[text]}"', "height": height, "width": width, "seed": 0})
        tokens = torch.randint(0, self.codebook, (1, (height // 16) * (width // 16)),
                               generator=torch.Generator().manual_seed(0))
        return {**prepared, "prior_token_ids": tokens, "steps": self.args.steps, "guidance": self.args.guidance}


WORKLOADS = {"zimage": ZImageWorkload, "glm_image": GlmImageWorkload}


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.timeline and args.device != "cuda":
        parser.error("--timeline times the GPU: it needs --device cuda")
    workload = WORKLOADS[args.model](args)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    results, reference = [], {}
    for gpus in [int(g) for g in args.gpus.split(",")]:
        layout = Layout.for_world(gpus, cfg=2 if args.cfg_parallel and gpus > 1 else 1)
        started = time.perf_counter()
        runner = get_runner(layout, args.device, dtype, **PLUGIN)
        runner.load("bench", workload.loader, scale=args.scale)
        load_s = time.perf_counter() - started
        for height, width in sizes:
            inputs = workload.inputs(runner, height, width)
            row = _measure(runner, workload, inputs, args)
            # before the new texts: their new signatures would make these runs capture CUDA graphs anew
            for flag, stage in (("profile", "bench.profile"), ("timeline", "bench.timeline")):
                if getattr(args, flag):
                    started = time.perf_counter()
                    row[flag] = runner.run(stage, "bench", {"stage": f"{workload.prefix}.denoise", "inputs": inputs},
                                           collect="all")
                    row[f"{flag}_request_ms"] = (time.perf_counter() - started) * 1e3
            for key, text in (("new_text_s", 1), ("later_text_s", 2)):
                started = time.perf_counter()
                runner.run(f"{workload.prefix}.denoise", "bench", workload.inputs(runner, height, width, text))
                row[key] = time.perf_counter() - started
            row.update(gpus=gpus, layout=layout.describe(), height=height, width=width, group_start_and_load_s=load_s)
            if gpus == 1:
                reference[height, width] = row.pop("latents"), row.pop("image")
                swap = _measure(runner, workload, inputs, args, repeats=0, kernel=SWAP_KERNEL[args.device])
                row["kernel_swap_vs_flash"] = _parity(swap["latents"], swap["image"], *reference[height, width])
            elif (height, width) in reference:
                row["parity_vs_1gpu"] = _parity(row.pop("latents"), row.pop("image"), *reference[height, width])
            else:
                row.pop("latents"), row.pop("image")
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("runs_s", "profile", "timeline")}), flush=True)
        release()
    report = {"machine": _machine(args.device), "config": {k: str(v) for k, v in vars(args).items()}, "results": results,
              "speedup_vs_1gpu": _speedups(results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["speedup_vs_1gpu"], indent=1))
    print(f"wrote {args.out}")


def _measure(runner, workload, inputs, args, repeats=None, kernel=None) -> dict:
    """Denoise timings and result; with `kernel`, attention on that SDPA backend (bench.attention_kernel)."""
    repeats = args.repeats if repeats is None else repeats
    stage = f"{workload.prefix}.denoise"
    stage, inputs = (stage, inputs) if kernel is None else (
        "bench.attention_kernel", {"backend": kernel, "stage": stage, "inputs": inputs})
    times, latents = [], None
    for i in range(args.warmup + max(repeats, 1)):
        started = time.perf_counter()
        latents = runner.run(stage, "bench", inputs)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    started = time.perf_counter()
    image = runner.run(f"{workload.prefix}.decode", "bench", {"latents": latents})
    decode_s = time.perf_counter() - started
    return {"denoise_s": statistics.median(times), "runs_s": times, "decode_s": decode_s,
            "latents": latents.float(), "image": image.float()}


def _parity(latents, image, ref_latents, ref_image) -> dict:
    cosine = torch.nn.functional.cosine_similarity(latents.flatten(), ref_latents.flatten(), dim=0).item()
    mse = (image - ref_image).pow(2).mean().item()
    return {"latents_cosine": cosine, "image_psnr_db": float("inf") if mse == 0 else 10 * torch.log10(
        torch.tensor(1.0 / mse)).item(), "latents_max_abs_diff": (latents - ref_latents).abs().max().item()}


def _speedups(results) -> dict:
    base = {(r["height"], r["width"]): r["denoise_s"] for r in results if r["gpus"] == 1}
    out = {}
    for r in results:
        key = f'{r["height"]}x{r["width"]}'
        if (r["height"], r["width"]) in base:
            out.setdefault(key, {})[str(r["gpus"])] = round(base[r["height"], r["width"]] / r["denoise_s"], 3)
    return out


def _machine(device: str) -> dict:
    import diffusers
    import transformers
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(WORKLOADS), default="zimage")
    p.add_argument("--gpus", default="1,2,4", help="world sizes, side by side; include 1 for ratios and parity")
    p.add_argument("--sizes", default="1024x1024,2048x2048,720x1280", help="HxW list")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--cfg-parallel", action="store_true", help="cfg 2 (x ulysses N/2) on more than one GPU")
    p.add_argument("--caption-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="also profile one denoise per size on every rank")
    p.add_argument("--timeline", action="store_true",
                   help="also time one denoise per size with CUDA events around each DiT call, on every rank (CUDA)")
    p.add_argument("--scale", choices=sorted(random_models.SCALES), default="full")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "denoise.json")
    return p


if __name__ == "__main__":
    main()
