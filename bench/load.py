"""Loading full-size checkpoints: the project's loader against diffusers' and transformers' from_pretrained.

    python bench/load.py --root /tmp/load-models --out FILE.json [--scale full] [--parts zimage,glm_image]

Writes random-weight models in the published layouts (speed and memory do not depend on values): Z-Image-Turbo as
its diffusers folder (float32 DiT in 3 shards with an index, Qwen3-4B text encoder in bf16 in 3 shards saved from
the causal LM, "model.*" keys, the Flux VAE) and as ComfyUI's three split files (bf16 DiT in ComfyUI's keys, the
same Qwen3 as one file, the VAE in LDM keys); GLM-Image as a diffusers folder (its DiT and AR decoder at full size;
glyph encoder, VAE, processor and scheduler as bench/random_models.py and the tiny model have them). The tokenizer
files are the tiny models' (a real Qwen vocabulary cannot be downloaded here; only ids reach the weights).

Each load runs in a fresh process (so peak memory is its own): the process's baseline RSS after importing torch
and initialising CUDA, its peak RSS (VmHWM, file pages mapped by mmap included) and peak anonymous RSS (RssAnon,
sampled every 20 ms), the GPU's peak allocation, and the seconds per component and in all. The project's load is
models/loading.py (per component) and the worker's loader (whole, through LocalRunner: the 1-GPU path); the
references are diffusers' from_pretrained(...).to("cuda") with accelerate (low_cpu_mem_usage=True, diffusers'
default when accelerate is installed) and without (low_cpu_mem_usage=False, diffusers' path when accelerate is
absent), and transformers' from_pretrained(...).to("cuda") for the text encoder and AR (transformers 5 builds on
the meta device either way). A last process loads Z-Image from its folder, then from the split files, as a second
model in the same runner, and records host memory after each.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))  # comfyui_layout: the diffusers -> ComfyUI layout writers

CONFIGS = REPO / "models" / "zimage" / "configs"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a check of this script only
SHARDS = 3


# -- memory of this process ----------------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    """Fields of /proc/self/status in bytes (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[name] = int(parts[0]) * 1024
    return out


class PeakAnon:
    """Samples RssAnon while a load runs: VmHWM alone mixes in the file pages mmap maps (page cache)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status().get("RssAnon", 0))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status().get("RssAnon", 0))


GB = 1e9


# -- writing random models in the published layouts -----------------------------------------------------------

def write_random(model: torch.nn.Module, folder: Path, weights_name: str, dtype: torch.dtype, shards: int,
                 rename=lambda sd: sd, seed=0) -> None:
    """Random N(0, 0.02) weights of a meta-built `model` written as `shards` safetensors files (with an index when
    more than one), in `dtype`; `rename` maps a chunk of the diffusers-layout state dict to the file's layout."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = list(model.state_dict())
    sizes = {n: model.state_dict()[n].numel() for n in names}
    budget, groups, current, acc = sum(sizes.values()) / shards, [], [], 0
    for n in names:
        current.append(n)
        acc += sizes[n]
        if acc >= budget * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    device = DEVICE
    gen = torch.Generator(device).manual_seed(seed)
    stem, suffix = weights_name.rsplit(".safetensors", 1)[0], ".safetensors"
    weight_map = {}
    for i, group in enumerate(groups):
        chunk = {}
        for n in group:
            t = model.state_dict()[n]
            chunk[n] = (torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
        chunk = rename(chunk)
        file = weights_name if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}{suffix}"
        save_file({k: v.contiguous() for k, v in chunk.items()}, str(folder / file))
        weight_map.update({k: file for k in chunk})
        del chunk
    if shards > 1:
        (folder / f"{weights_name}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _published(name: str) -> dict:
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def write_zimage(root: Path, scale: str, *, folder_too: bool = True, files_too: bool = True) -> dict:
    """The Z-Image-Turbo folder and/or ComfyUI's three files; returns their paths."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from comfyui_parallel_diffusion.models import weights
    from comfyui_parallel_diffusion.models.zimage import tiny

    folder = root / "Z-Image-Turbo"
    files = root / "comfyui"
    if folder_too:
        tiny.build_tiny_zimage(folder)  # tokenizer, scheduler, model_index; the three models are replaced below
    dit_config, vae_config, te_config = _published("transformer"), _published("vae"), _published("text_encoder")
    if scale == "tiny":  # a CPU check of this script: the tiny model's widths, the published layout
        dit_config.update(tiny.TRANSFORMER_CONFIG)
        vae_config.update(tiny.VAE_CONFIG)
        te_config.update(hidden_size=tiny.TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    files.mkdir(parents=True, exist_ok=True)
    dit = weights.empty_model(lambda: ZImageTransformer2DModel.from_config(dit_config))
    config = Qwen3Config(**{k: v for k, v in te_config.items() if k not in ("architectures", "torch_dtype")})
    config.architectures = ["Qwen3ForCausalLM"]
    te = weights.empty_model(lambda: Qwen3Model(config))
    vae = weights.empty_model(lambda: AutoencoderKL.from_config(vae_config))
    causal_lm = lambda sd: {f"model.{k}": v for k, v in sd.items()}
    if folder_too:
        for part in ("transformer", "text_encoder", "vae"):
            shutil.rmtree(folder / part, ignore_errors=True)
        dit.save_config(folder / "transformer")
        write_random(dit, folder / "transformer", "diffusion_pytorch_model.safetensors", torch.float32, SHARDS)
        config.save_pretrained(folder / "text_encoder")
        write_random(te, folder / "text_encoder", "model.safetensors", torch.bfloat16, SHARDS, rename=causal_lm,
                     seed=1)
        vae.save_config(folder / "vae")
        write_random(vae, folder / "vae", "diffusion_pytorch_model.safetensors", torch.float32, 1, seed=2)
    if files_too:
        import comfyui_layout

        write_random(dit, files, "z_image_turbo_bf16.safetensors", torch.bfloat16, 1,
                     rename=comfyui_layout.comfyui_transformer_state_dict)
        write_random(te, files, "qwen_3_4b.safetensors", torch.bfloat16, 1, rename=causal_lm, seed=1)
        write_random(vae, files, "ae.safetensors", torch.float32, 1, rename=comfyui_layout.ldm_vae_state_dict, seed=2)
    return {"folder": str(folder), "transformer": str(files / "z_image_turbo_bf16.safetensors"),
            "text_encoder": str(files / "qwen_3_4b.safetensors"), "vae": str(files / "ae.safetensors"),
            "tokenizer": str(folder / "tokenizer")}


def write_glm_image(root: Path, scale: str) -> dict:
    """A GLM-Image folder: the tiny model's processor and tokenizers, every model at full size (the DiT with the
    published config's values, bench/ar.py's AR decoder, the glyph encoder and VAE of bench/random_models.py) unless
    `scale` is tiny. The AR's generation config samples as bench/ar.py does, within the DiT's codebook (a random AR
    would sample past it)."""
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import GlmImageForConditionalGeneration, T5Config, T5EncoderModel

    import ar as ar_bench
    from comfyui_parallel_diffusion.models import weights
    from comfyui_parallel_diffusion.models.glm_image import tiny as glm_tiny

    folder = Path(glm_tiny.build_tiny_glm_image(root / "GLM-Image"))
    if scale == "tiny":
        return {"folder": str(folder)}
    import random_models

    def replace(name: str, model: torch.nn.Module, weights_name: str, **write) -> None:
        shutil.rmtree(folder / name)
        (model.save_config if hasattr(model, "save_config") else model.config.save_pretrained)(folder / name)
        write_random(model, folder / name, weights_name, torch.bfloat16, **write)

    replace("transformer", weights.empty_model(lambda: GlmImageTransformer2DModel.from_config(random_models.GLM_DIT)),
            "diffusion_pytorch_model.safetensors", shards=SHARDS)
    glyph = T5Config(**{**T5Config.from_pretrained(folder / "text_encoder").to_dict(),  # ByT5's vocabulary
                        **random_models.GLYPH_T5})
    replace("text_encoder", weights.empty_model(lambda: T5EncoderModel(glyph)), "model.safetensors", shards=1, seed=1)
    replace("vae", weights.empty_model(lambda: AutoencoderKL.from_config(random_models.GLM_VAE)),
            "diffusion_pytorch_model.safetensors", shards=1, seed=2)
    _, tokenizer = glm_tiny._processor()
    ar = weights.empty_model(lambda: GlmImageForConditionalGeneration(ar_bench.full_config(tokenizer)))
    random_models.sample_random_ar(ar.generation_config, ar.config, tokenizer, scale)
    replace("vision_language_encoder", ar, "model.safetensors", shards=4, seed=3)
    ar.generation_config.save_pretrained(folder / "vision_language_encoder")
    return {"folder": str(folder)}


# -- one load, in its own process --------------------------------------------------------------------------------

def _loads(method: str, paths: dict) -> list[tuple[str, object]]:
    """(component, thunk) pairs that load and return a model on the GPU."""
    from comfyui_parallel_diffusion.models import loading
    from comfyui_parallel_diffusion.models.zimage import comfyui_files as files

    dev, bf16, folder = DEVICE, torch.bfloat16, paths.get("folder")
    if method == "ours":
        return [(n, lambda n=n: loading.load_component(folder, n, bf16, dev)) for n in paths["components"]]
    if method == "ours_files":
        return [("transformer", lambda: files.load_transformer(paths["transformer"], bf16, dev)),
                ("text_encoder", lambda: files.load_text_encoder(paths["text_encoder"], bf16, dev)),
                ("vae", lambda: files.load_vae(paths["vae"], bf16, dev))]
    if method in ("from_pretrained_accelerate", "from_pretrained_no_accelerate"):
        import diffusers
        import transformers

        low_mem = method == "from_pretrained_accelerate"
        index = json.loads((Path(folder) / "model_index.json").read_text())

        def reference(name):
            library, cls_name = index[name]
            if library == "diffusers":
                cls = getattr(diffusers, cls_name)
                model = cls.from_pretrained(folder, subfolder=name, torch_dtype=bf16, low_cpu_mem_usage=low_mem)
            else:  # transformers 5 builds on the meta device with or without accelerate
                cls = getattr(transformers, cls_name)
                model = cls.from_pretrained(Path(folder) / name, dtype=bf16)
            return model.to(dev)
        return [(n, lambda n=n: reference(n)) for n in paths["components"]]
    raise ValueError(method)


def measure(method: str, paths: dict) -> dict:
    torch.zeros(1, device=DEVICE)  # CUDA's own host memory belongs to the baseline
    baseline = _status()
    out = {"method": method, "baseline_rss_gb": baseline["VmRSS"] / GB, "components": {}}
    started = time.perf_counter()
    keep = []
    with PeakAnon() as anon:
        if method.startswith("runner"):  # the worker's own loader, whole (what a loader node runs on 1 GPU)
            from comfyui_parallel_diffusion import models
            from comfyui_parallel_diffusion.parallel import LocalRunner

            runner = LocalRunner(models, DEVICE.type, torch.bfloat16)
            for key, loader, args in paths["runner_loads"]:
                t = time.perf_counter()
                runner.load(key, loader, **args)
                _sync()
                out["components"][key] = {"s": time.perf_counter() - t, "rss_after_gb": _status()["VmRSS"] / GB,
                                          "anon_after_gb": _status()["RssAnon"] / GB,
                                          "gpu_allocated_gb": _gpu(torch.cuda.memory_allocated)}
        else:
            for name, load in _loads(method, paths):
                t = time.perf_counter()
                keep.append(load())
                _sync()
                out["components"][name] = {"s": time.perf_counter() - t, "rss_after_gb": _status()["VmRSS"] / GB,
                                           "gpu_allocated_gb": _gpu(torch.cuda.memory_allocated)}
    end = _status()
    out.update(total_s=time.perf_counter() - started, peak_rss_gb=end["VmHWM"] / GB,
               peak_rss_over_baseline_gb=(end["VmHWM"] - baseline["VmRSS"]) / GB, peak_anon_gb=anon.peak / GB,
               peak_anon_over_baseline_gb=(anon.peak - baseline.get("RssAnon", 0)) / GB,
               end_rss_file_gb=end.get("RssFile", 0) / GB,
               gpu_peak_allocated_gb=_gpu(torch.cuda.max_memory_allocated))
    return out


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _gpu(stat) -> float | None:
    return stat() / GB if DEVICE.type == "cuda" else None


def _in_process(method: str, paths: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--measure", method, "--paths", json.dumps(paths)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"method": method, "error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/load-models"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--parts", default="zimage,zimage_files,glm_image")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per measured process")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, json.loads(args.paths))))
        return
    import diffusers
    import transformers

    result = {"date": datetime.date.today().isoformat(), "host": platform.node(), "scale": args.scale,
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "runs": {}}
    for part in args.parts.split(","):
        t = time.perf_counter()
        if part == "zimage":
            shutil.rmtree(args.root, ignore_errors=True)
            paths = write_zimage(args.root, args.scale, files_too=False)
        elif part == "zimage_files":  # beside the folder of the part before (the second model), if it ran
            paths = write_zimage(args.root, args.scale, folder_too=not (args.root / "Z-Image-Turbo").is_dir())
        else:  # the disk (64 GB on the lent machine) holds one model family at a time
            shutil.rmtree(args.root, ignore_errors=True)
            paths = write_glm_image(args.root, args.scale)
        run = {"write_s": time.perf_counter() - t, "disk_gb": _du(args.root) / GB, "loads": []}
        print(f"{part}: written in {run['write_s']:.0f} s, {run['disk_gb']:.1f} GB", flush=True)
        if part == "zimage":
            paths["components"] = ["transformer", "text_encoder", "vae"]
            methods = [("ours", paths), ("runner", {"runner_loads": [["zimage", "zimage", {"path": paths["folder"]}]]}),
                       ("from_pretrained_accelerate", paths), ("from_pretrained_no_accelerate", paths)]
        elif part == "zimage_files":
            folder_load = ["zimage-folder", "zimage", {"path": paths["folder"]}]
            files_load = ["zimage-files", "zimage_files", {k: paths[k] for k in
                                                           ("transformer", "text_encoder", "vae", "tokenizer")}]
            methods = [("ours_files", paths), ("runner_second_model", {"runner_loads": [files_load, folder_load]})]
        else:
            paths["components"] = ["transformer", "vision_language_encoder"]
            methods = [("ours", paths), ("from_pretrained_accelerate", paths),
                       ("from_pretrained_no_accelerate", paths)]
        for method, method_paths in methods:
            measured = _in_process(method, method_paths, args.timeout)
            print(json.dumps(measured), flush=True)
            run["loads"].append(measured)
        result["runs"][part] = run
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(args.root, ignore_errors=True)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
