"""Z-Image's pipeline: the order of its stages and what each request holds, defined once. `generate` runs all of it
through a runner (the CLI, the benchmarks); the ComfyUI nodes call the steps one by one, each through their own
`run(stage, inputs)` (one per node), so a node never builds a stage's request itself."""
from __future__ import annotations

from typing import Any, Callable

import torch

from .stages import check_inputs, latent_image_size
from .tiny import build_tiny_zimage as build_tiny  # noqa: F401  the family surface (see models/pipelines.py)

LOADER = "zimage"
DEFAULT_STEPS = 8  # Z-Image-Turbo
DEFAULT_GUIDANCE = 0.0  # Turbo runs without guidance; base Z-Image uses ~4

Run = Callable[[str, dict[str, Any]], Any]  # runs one stage of the model on its runner


def encode_prompt(run: Run, prompts: list[str], negative_prompts: list[str] | None = None
                  ) -> dict[str, list[torch.Tensor]]:
    """{"prompt_embeds", "negative_prompt_embeds"}: each prompt's Qwen3 features (negative ones when given)."""
    return run("zimage.encode", {"prompts": prompts, "negative_prompts": negative_prompts})


def prepare_latents(run: Run, *, batch: int, height: int, width: int, seed: int, steps: int,
                    init_latents: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """The seeded starting latents (noise, or init_latents noised to `strength`), in diffusers' space."""
    return run("zimage.prepare", {"batch": batch, "height": height, "width": width, "seed": seed,
                                  "init_latents": init_latents, "strength": strength, "steps": steps})


def denoise(run: Run, latents: torch.Tensor, embeds: dict[str, list[torch.Tensor]], *, steps: int, guidance: float,
            strength: float = 1.0, lora: dict | None = None) -> torch.Tensor:
    """The denoising loop; embeds as encode_prompt returns them, one per image; lora: the DiT's LoRA factors."""
    return run("zimage.denoise", {"latents": latents, "steps": steps, "guidance": guidance, "strength": strength,
                                  "lora": lora, **embeds})


def decode(run: Run, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, H, W, 3) in [0, 1] from latents in diffusers' space."""
    return run("zimage.decode", {"latents": latents})


def generate(runner, model_key: str, *, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
             height: int, width: int, steps: int, guidance: float, seed: int,
             init_latents: torch.Tensor | None = None, strength: float = 1.0,
             on_progress: Callable[[str, int, int], None] | None = None,
             should_cancel: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of one image per prompt. Returns (images (B, H, W, 3) in [0, 1], final latents (B, 16, H/8, W/8)),
    latents in diffusers' space (output_type="latent"). Image-to-image: init_latents (1 or B, 16, H/8, W/8) in that
    space and a strength, as diffusers' ZImageImg2ImgPipeline with those latents as its image."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negative_prompts = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    check_inputs(prompts=prompts, height=height, width=width, steps=steps, guidance=guidance, seed=seed,
                 strength=strength, has_init_latents=init_latents is not None)
    if init_latents is not None:
        batch, init_height, init_width = latent_image_size(init_latents)
        if (init_height, init_width) != (height, width) or len(prompts) % batch:
            raise ValueError(f"init latents of {batch} {init_width}x{init_height} images do not fit "
                             f"{len(prompts)} prompts at {width}x{height}")
    runner.layout.check_branches(2 if guidance > 0 else 1)
    if guidance > 0:
        negative_prompts = negative_prompts or [""] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    else:
        negative_prompts = None

    def run(stage: str, inputs: dict[str, Any]) -> Any:
        return runner.run(stage, model_key, inputs, on_progress=on_progress, should_cancel=should_cancel)

    embeds = encode_prompt(run, prompts, negative_prompts)
    latents = prepare_latents(run, batch=len(prompts), height=height, width=width, seed=seed, steps=steps,
                              init_latents=init_latents, strength=strength)
    latents = denoise(run, latents, embeds, steps=steps, guidance=guidance, strength=strength)
    return decode(run, latents), latents
