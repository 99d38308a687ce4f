"""GPU memory per rank per stage, and host memory, for the loaders' offload and weight_dtype settings, with the GPU
capped to a consumer card's size.

    python bench/memory.py --model zimage --gpus 1 --caps 24,16 --configs resident,offload,fp8,fp8_offload \
        --sizes 1024,2048 --out $OUT/memory_zimage_1gpu.json [--root /tmp/memory-models]
    python bench/memory.py --model zimage --tiny --out /tmp/memory_tiny.json    # a CPU check of this script

Full-size random-weight models in the published layouts (bench/load.py writes them once under --root: Z-Image as
ComfyUI's three bf16 files, GLM-Image as its diffusers folder, DiT and AR decoder at full size) are loaded by the
project's own loaders (zimage_files, glm_image) with the setting under test, and one image per size is generated
through the project's stages (models/<family>/pipeline.py's generate), twice per size: the first prompt compiles,
the second shows what a prompt costs (offload: its transfers, in the stage times). After loading and after every
stage each rank reports its peak GPU allocation and reservation since the previous report (torch's allocator
statistics, reset there), what stays allocated, and its host RSS now and at its peak (VmRSS, VmHWM: page-locked
offload copies included).

Each (config, cap) runs in a fresh process (a fresh worker group for several GPUs), so peaks and the cap are its
own. A cap emulates a card: torch.cuda.set_per_process_memory_fraction on every rank, before anything is
allocated, at the card's memory less CONTEXT_MIB for the CUDA context a real card also spends outside torch's
allocator. A run that fails (out of memory) records the error and the last report before it: what held the memory.
Every image and its latents are kept under --root/images; each run's are compared with every default-weights run's
of the same size and seed (this invocation's or an earlier one's): offload must equal resident exactly, fp8 gives a
PSNR against bf16.

configs: resident (offload=resident), offload (offload=offload), auto (offload=auto: what the loader chooses for
the cap), fp8 (weight_dtype=fp8_e4m3fn, resident), fp8_offload (both).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from comfyui_parallel_diffusion import models  # noqa: E402
from comfyui_parallel_diffusion.parallel import Layout, Loader, Parallelism, Stage  # noqa: E402

PLUGIN = {"plugin": "memory", "extra_sys_path": [str(BENCH)]}  # this file, imported by the workers
CONFIGS = {"resident": ("resident", "default"), "offload": ("offload", "default"), "auto": ("auto", "default"),
           "fp8": ("resident", "fp8_e4m3fn"), "fp8_offload": ("offload", "fp8_e4m3fn")}
# Cards by their memory as CUDA reports it (RTX 4090 / 3090: 24564 MiB; 4060 Ti 16 GB / 4080: 16380 MiB)
CARDS_MIB = {24: 24564, 16: 16380, 32: 32607}
CONTEXT_MIB = 600  # the CUDA context and cuBLAS/NCCL workspaces outside torch's allocator, about this on a card
STEPS = {"zimage": 8, "glm_image": 4}  # a stage's memory does not grow with steps: GLM-Image's 50 would add minutes
PROMPT = 'a red "SALE" sign on a blue door'
GiB = 1 << 30


# -- the worker side: a capped loader and a memory report stage ---------------------------------------------------

def _host_memory() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[name].split()[0]) * 1024 / GiB for key, name in (("rss_gib", "VmRSS"),
                                                                             ("rss_peak_gib", "VmHWM"))}


def _indexed(device: torch.device) -> torch.device:
    """In the host process (1 GPU) the device is plain "cuda"; the memory-fraction call needs an index."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def capped(ctx, *, inner: str, cap_mib: int | None, **args):
    """The loader `inner` with this rank's GPU capped to cap_mib first (None: uncapped)."""
    if ctx.device.type == "cuda":
        dev = _indexed(ctx.device)
        if cap_mib:
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(cap_mib * (1 << 20) / total, dev)
        torch.cuda.reset_peak_memory_stats(dev)
    return models.LOADERS[inner].fn(ctx, **args)


def report(ctx, model) -> dict:
    """This rank's memory since the previous report; resets the peaks."""
    out = {"rank": ctx.comm.rank, **_host_memory()}
    if ctx.device.type == "cuda":
        dev = _indexed(ctx.device)
        torch.cuda.synchronize(dev)
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated(dev) / GiB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / GiB,
                   allocated_gib=torch.cuda.memory_allocated(dev) / GiB)
        torch.cuda.reset_peak_memory_stats(dev)
    return out


STAGES = {**models.STAGES, "bench.memory": Stage("bench.memory", Parallelism.EVERY_RANK, report)}
LOADERS = {**models.LOADERS, "capped": Loader("capped", capped)}


# -- one measurement, in its own process --------------------------------------------------------------------------

class Measured:
    """A runner whose every stage is followed by a memory report of every rank, recorded with its time."""

    def __init__(self, runner, records: list):
        self.runner, self.records, self.layout = runner, records, runner.layout

    def run(self, stage: str, key, inputs, **kwargs):
        started = time.perf_counter()
        result = self.runner.run(stage, key, inputs, **kwargs)
        self.note(stage, time.perf_counter() - started)
        return result

    def note(self, what: str, seconds: float, **extra) -> None:
        ranks = self.runner.run("bench.memory", None, {}, collect="all")
        self.records.append({"stage": what, "seconds": round(seconds, 3), **extra, "ranks": ranks})


def measure(spec: dict) -> dict:
    from comfyui_parallel_diffusion.models import pipelines
    from comfyui_parallel_diffusion.parallel.pool import get_runner, release

    device = spec["device"]
    runner = get_runner(Layout.for_world(spec["gpus"]), device, torch.bfloat16 if device == "cuda" else torch.float32,
                        **PLUGIN)
    records: list = []
    measured = Measured(runner, records)
    offload, weight_dtype = CONFIGS[spec["config"]]
    family = pipelines.zimage if spec["model"] == "zimage" else pipelines.glm_image
    result = {"config": spec["config"], "offload": offload, "weight_dtype": weight_dtype, "cap_gb": spec["cap"],
              "cap_mib": spec["cap_mib"], "stages": records}
    try:
        started = time.perf_counter()
        runner.load("m", "capped", inner=spec["loader"], cap_mib=spec["cap_mib"], offload=offload,
                    weight_dtype=weight_dtype, **spec["source"])
        measured.note("load", time.perf_counter() - started)
        for size in spec["sizes"]:
            for prompt in range(2):
                records.append({"stage": "prompt", "size": size, "prompt": prompt + 1})
                images, latents = family.generate(measured, "m", prompt=PROMPT, height=size, width=size,
                                                  steps=spec["steps"], guidance=family.DEFAULT_GUIDANCE, seed=prompt)
                torch.save({"images": images, "latents": latents},
                           Path(spec["images"]) / f"{spec['config']}-{spec['cap']}-{size}-{prompt}.pt")
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - an out-of-memory is a result: what failed, after what
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    finally:
        release()
    return result


# -- the orchestration ----------------------------------------------------------------------------------------------

def write_models(model: str, root: Path, scale: str) -> tuple[str, dict]:
    """(loader, its file arguments), the files written once under root (bench/load.py's writers)."""
    import load as load_bench  # bench/load.py

    marker = root / f"{model}-{scale}.json"
    if marker.is_file():
        return tuple(json.loads(marker.read_text()))
    root.mkdir(parents=True, exist_ok=True)
    if model == "zimage":
        from comfyui_parallel_diffusion.models.zimage.tiny import build_tiny_zimage

        paths = load_bench.write_zimage(root / scale, scale, folder_too=False)
        build_tiny_zimage(Path(paths["folder"]))  # its tokenizer (bench/load.py's note: only ids reach weights)
        written = ("zimage_files", {k: paths[k] for k in ("transformer", "text_encoder", "vae", "tokenizer")})
    else:
        written = ("glm_image", {"path": load_bench.write_glm_image(root / scale, scale)["folder"]})
    marker.write_text(json.dumps(written))
    return written


def compare_images(runs: list[dict], images: Path) -> None:
    """Each run's images and the latents they were decoded from against every default-weights run's of the same
    size and seed (any cap): offload must equal resident bit for bit; fp8 is reported as PSNR (dB, images in
    [0, 1]) against bf16. The latents tell the DiT's part from the VAE's."""
    saved = {tuple(p.stem.split("-")): p for p in images.glob("*.pt")}  # (config, cap, size, seed) -> file
    for run in runs:
        if not run.get("ok"):
            continue
        run["images"] = {}
        for (config, cap, size, seed), file in sorted(saved.items()):
            if config != run["config"] or cap != str(run["cap_gb"]):
                continue
            mine = torch.load(file)
            for (c, k, z, e), reference in sorted(saved.items()):
                if (z, e) != (size, seed) or CONFIGS[c][1] != "default" or reference == file:
                    continue
                theirs = torch.load(reference)
                mse = (mine["images"] - theirs["images"]).double().pow(2).mean().item()
                run["images"].setdefault(f"{size}-{seed}", []).append({
                    "against": reference.stem, "equal": torch.equal(mine["images"], theirs["images"]),
                    "psnr_db": None if mse == 0 else round(10 * math.log10(1 / mse), 2),
                    "latents_equal": torch.equal(mine["latents"], theirs["latents"]),
                    "latents_max_diff": (mine["latents"].float() - theirs["latents"].float()).abs().max().item()})


def write_results(out: Path, model: str, gpus: int, scale: str, device: str, runs: list) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "what": __doc__.split("\n\n")[0], "model": model, "gpus": gpus, "scale": scale,
        "context_mib": CONTEXT_MIB, "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.node(),
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runs": runs}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["zimage", "glm_image"], required=True)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--configs", default="resident,offload,fp8,fp8_offload", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--caps", default="24,16", help=f"GB cards of {sorted(CARDS_MIB)}, or none (uncapped)")
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--steps", type=int, default=None, help="default: Z-Image 8, GLM-Image 4")
    parser.add_argument("--root", type=Path, default=Path("/tmp/memory-models"), help="where the models are written")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU: a check of this script")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per measured process")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(json.loads(args.measure))), flush=True)
        return
    scale, device = ("tiny", "cpu") if args.tiny else ("full", "cuda")
    loader, source = write_models(args.model, args.root, scale)
    caps = [None if c == "none" else int(c) for c in args.caps.split(",")]
    images = args.root / "images"
    images.mkdir(parents=True, exist_ok=True)
    runs = []
    for config in args.configs.split(","):
        for cap in caps:
            spec = {"model": args.model, "gpus": args.gpus, "config": config, "cap": cap,
                    "cap_mib": CARDS_MIB[cap] - CONTEXT_MIB if cap and not args.tiny else None,
                    "sizes": [int(s) for s in args.sizes.split(",")], "steps": args.steps or STEPS[args.model],
                    "device": device, "loader": loader, "source": source, "images": str(images)}
            started = time.perf_counter()
            try:
                done = subprocess.run([sys.executable, __file__, "--model", args.model, "--out", str(args.out),
                                       "--measure", json.dumps(spec)], capture_output=True, text=True,
                                      timeout=args.timeout)
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
                run = json.loads(line[7:]) if line else {"config": config, "cap_gb": cap, "ok": False,
                                                         "error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
            except subprocess.TimeoutExpired:
                run = {"config": config, "cap_gb": cap, "ok": False, "error": f"over {args.timeout} s"}
            run["wall_s"] = round(time.perf_counter() - started, 1)
            runs.append(run)
            print(f"{args.model} {args.gpus} GPU(s) {config} cap {cap}: {'ok' if run['ok'] else run['error'][:200]} "
                  f"({run['wall_s']} s)", file=sys.stderr, flush=True)
            write_results(args.out, args.model, args.gpus, scale, device, runs)  # a killed invocation keeps these
    compare_images(runs, images)
    write_results(args.out, args.model, args.gpus, scale, device, runs)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
