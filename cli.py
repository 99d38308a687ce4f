"""`parallel-diffusion`: generate with a diffusers model folder or Z-Image's split files on N ranks, or run the
built-in tiny demo."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from .models import checks, fp8, offload, pipelines
from .models.glm_image import model as glm_image_model
from .models.zimage import comfyui_files as zimage_files
from .parallel import Layout
from .parallel.pool import get_runner, release

DEMO_CACHE = Path.home() / ".cache" / "comfyui-parallel-diffusion" / "tiny"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except (ValueError, RuntimeError) as exc:  # user-facing errors: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        release()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallel-diffusion", description=__doc__)
    sub = parser.add_subparsers(required=True)

    gen = sub.add_parser("generate", help="generate one image from a diffusers model folder or Z-Image's split "
                                          "files")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="diffusers folder with model_index.json (Z-Image or GLM-Image)")
    source.add_argument("--transformer", type=Path,
                        help="Z-Image from ComfyUI's split files: the diffusion model file (e.g. "
                             "z_image_turbo_bf16.safetensors); needs --text-encoder, --vae and --tokenizer")
    gen.add_argument("--text-encoder", type=Path, help="with --transformer: the Qwen3 file (qwen_3_4b.safetensors)")
    gen.add_argument("--vae", type=Path, help="with --transformer: the Flux VAE file (ae.safetensors)")
    gen.add_argument("--tokenizer", type=Path,
                     help="with --transformer: a folder of Qwen tokenizer files, e.g. a diffusers Z-Image folder's "
                          "tokenizer/ or ComfyUI's comfy/text_encoders/qwen25_tokenizer")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--height", type=_integer(16), default=1024,
                     help="a multiple of 16 (Z-Image) or 32 (GLM-Image), at most 4096")
    gen.add_argument("--width", type=_integer(16), default=1024, help="as --height")
    gen.add_argument("--steps", type=_integer(1), default=None,
                     help="default: the model's own (Z-Image-Turbo 8, GLM 50)")
    gen.add_argument("--guidance", type=_guidance, default=None, help="default: the model's own")
    gen.add_argument("--seed", type=_integer(0, checks.MAX_SEED), default=0)
    _add_layout_args(gen)
    gen.add_argument("--ar", choices=glm_image_model.AR_PLACEMENTS, default=None,
                     help="GLM-Image only: where its AR model runs. auto (default): tensor parallel over the "
                          "largest GPU count it splits over evenly (1, 2, 4, 8...) on several CUDA GPUs, else rank "
                          "0; rank0: rank 0 alone; tensor_parallel: as auto, on the CPU too")
    gen.add_argument("--offload", choices=offload.MODES, default="auto",
                     help="whether weights only some stages use (text encoder or AR model, DiT) take turns on the "
                          "GPU, waiting in pinned host memory between them (same images). auto (default): where the "
                          "free GPU memory does not hold them all; resident: never; offload: always")
    gen.add_argument("--weight-dtype", choices=fp8.WEIGHT_DTYPES, default="default",
                     help="fp8_e4m3fn: the DiT's (and GLM-Image's AR decoder's) Linear weights stored in fp8 and "
                          "computed in bf16, as ComfyUI's weight_dtype: about half their memory")
    gen.add_argument("--out", type=Path, default=Path("image.png"))
    gen.add_argument("--latents-out", type=Path, default=None,
                     help="also save the final latents (key 'latents'), as diffusers' output_type='latent'")
    gen.set_defaults(command=_generate)

    demo = sub.add_parser("demo", help="build tiny random-weight models (no downloads) and generate with both")
    demo.add_argument("--cache", type=Path, default=DEMO_CACHE, help="where the tiny models are built")
    demo.add_argument("--out-dir", type=Path, default=Path("parallel-diffusion-demo"))
    _add_layout_args(demo)
    demo.set_defaults(command=_demo)
    return parser


def _integer(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi], refused with the range otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            allowed = f"from {lo} to {hi}" if hi is not None else f"{lo} or more"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value
    return parse


def _guidance(text: str) -> float:
    try:
        checks.number("guidance", float(text), 0.0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return float(text)


def _add_layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=_integer(1), default=1, help="ranks (one per GPU with --device cuda)")
    parser.add_argument("--cfg-parallel", action="store_true", help="guidance branches on two rank groups")
    parser.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: the rest of the world)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")


def _runner(args: argparse.Namespace):
    layout = Layout.for_world(args.world_size, cfg=2 if args.cfg_parallel else 1,
                              ulysses=args.ulysses)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return get_runner(layout, args.device, dtype)


def _generate(args: argparse.Namespace) -> int:
    family, loader, source = _source(args)
    source.update(offload=args.offload, weight_dtype=args.weight_dtype)
    values = {"height": args.height, "width": args.width,
              "steps": family.DEFAULT_STEPS if args.steps is None else args.steps,
              "guidance": family.DEFAULT_GUIDANCE if args.guidance is None else args.guidance, "seed": args.seed}
    family.check_inputs(prompts=[args.prompt], **values)  # before minutes of loading
    if args.ar is not None and family is not pipelines.glm_image:
        raise ValueError("--ar applies to GLM-Image only (Z-Image has no AR model)")
    if family is pipelines.glm_image:
        source["ar"] = args.ar or "auto"
        placement = glm_image_model.ar_placement(source["ar"], args.device, args.world_size,
                                                 glm_image_model.ar_text_config(source["path"]))[1]
        print(placement, file=sys.stderr)
    runner = _runner(args)
    started = time.perf_counter()
    runner.load("model", loader, **source)
    images, latents = family.generate(runner, "model", prompt=args.prompt, negative_prompt=args.negative_prompt,
                                      **values, on_progress=_print_progress)
    print(file=sys.stderr)
    save_png(images[0], args.out)
    if args.latents_out:
        save_file({"latents": latents.contiguous()}, str(args.latents_out))
    print(f"wrote {args.out} ({args.width}x{args.height}, {runner.layout.describe()}, "
          f"{time.perf_counter() - started:.1f} s)")
    return 0


def _source(args: argparse.Namespace) -> tuple:
    """(model family, runner loader, its arguments) for --model or for the split files."""
    files = {"text_encoder": args.text_encoder, "vae": args.vae, "tokenizer": args.tokenizer}
    if args.model is not None:
        given = [f"--{name.replace('_', '-')}" for name, value in files.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} go with --transformer, not with --model")
        family = pipelines.for_folder(args.model)
        return family, family.LOADER, {"path": str(Path(args.model).resolve())}
    lacking = [f"--{name.replace('_', '-')}" for name, value in files.items() if value is None]
    if lacking:
        raise ValueError(f"--transformer needs {', '.join(lacking)} too")
    files = {"transformer": args.transformer, **files}
    zimage_files.inspect_files(*(str(files[name]) for name in ("transformer", "text_encoder", "vae")))
    return pipelines.zimage, zimage_files.LOADER.name, {name: str(p.resolve()) for name, p in files.items()}


def _demo(args: argparse.Namespace) -> int:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runner = _runner(args)
    for family in pipelines.ALL:
        folder = family.build_tiny(args.cache / family.LOADER)
        runner.load(str(folder), family.LOADER, path=str(folder))
        images, _ = family.generate(runner, str(folder), prompt='a red "HELLO" sign on a blue door',
                                    negative_prompt=None, height=64, width=96, steps=4,
                                    guidance=family.DEFAULT_GUIDANCE, seed=0, on_progress=_print_progress)
        out = args.out_dir / f"{family.LOADER}.png"
        save_png(images[0], out)
        print(f"\n{family.LOADER}: wrote {out.resolve()} (tiny random weights from {folder})")
    return 0


def save_png(image: torch.Tensor, path: Path) -> None:
    """(H, W, 3) float in [0, 1] -> 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.numpy() * 255).round().clip(0, 255).astype(np.uint8)).save(path)


def _print_progress(what: str, done: int, total: int) -> None:
    print(f"\r{what} {done}/{total}", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
