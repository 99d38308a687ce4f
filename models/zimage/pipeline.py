"""Z-Image end to end through a runner (LocalRunner or WorkerGroup): the CLI's path; the nodes call the same
stages one by one."""
from __future__ import annotations

from typing import Callable

import torch

from .stages import check_inputs, latent_image_size
from .tiny import build_tiny_zimage as build_tiny  # noqa: F401  the family surface (see models/pipelines.py)

LOADER = "zimage"
DEFAULT_STEPS = 8  # Z-Image-Turbo
DEFAULT_GUIDANCE = 0.0  # Turbo runs without guidance; base Z-Image uses ~4


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
    embeds = runner.run("zimage.encode", model_key, {"prompts": prompts, "negative_prompts": negative_prompts})
    latents = runner.run("zimage.prepare", model_key,
                         {"batch": len(prompts), "height": height, "width": width, "seed": seed,
                          "init_latents": init_latents, "strength": strength, "steps": steps})
    latents = runner.run("zimage.denoise", model_key, {"latents": latents, "steps": steps, "guidance": guidance,
                                                       "strength": strength, **embeds},
                         on_progress=on_progress, should_cancel=should_cancel)
    images = runner.run("zimage.decode", model_key, {"latents": latents})
    return images, latents
