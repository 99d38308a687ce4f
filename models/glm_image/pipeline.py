"""GLM-Image end to end through a runner (LocalRunner or WorkerGroup): the CLI's path; the ComfyUI nodes call the
same four stages one by one."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ...parallel import Layout
from .inputs import as_pil_images, check_inputs
from .tiny import build_tiny_glm_image as build_tiny  # noqa: F401  the family surface (see models/pipelines.py)

LOADER = "glm_image"
DEFAULT_STEPS = 50  # diffusers' GlmImagePipeline defaults
DEFAULT_GUIDANCE = 1.5


def generate(runner, model_key: str, *, prompt: str | list[str], height: int, width: int, steps: int,
             guidance: float, seed: int, images: Any = None, negative_prompt: str | list[str] | None = None,
             on_progress: Callable[[str, int, int], None] | None = None,
             should_cancel: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image per prompt (editing: one prompt, `images` its condition images). Returns (images (B, H, W, 3)
    float in [0, 1], final latents (B, 16, H/8, W/8)), equal to diffusers' GlmImagePipeline with
    generator=torch.Generator("cpu").manual_seed(seed).

    on_progress sees ("tokens", n, total) while the AR samples, then ("step", i, steps) while the DiT denoises.
    `negative_prompt` only matters through its quoted glyph texts (diffusers always uses "")."""
    prompts, images = check_request(runner.layout, prompt=prompt, height=height, width=width, steps=steps,
                                    guidance=guidance, seed=seed, images=images, negative_prompt=negative_prompt)
    progress = {"on_progress": on_progress, "should_cancel": should_cancel}

    prior = runner.run("glm_image.ar", model_key,
                       {"prompt": prompts, "height": height, "width": width, "seed": seed, "images": images},
                       **progress)
    prepared = runner.run("glm_image.prepare", model_key,
                          {"prompt": prompts, "negative_prompt": negative_prompt, "height": height, "width": width,
                           "seed": seed, "images": images})
    latents = runner.run("glm_image.denoise", model_key,
                         {**prepared, "prior_token_ids": prior["prior_token_ids"],
                          "condition_prior_token_ids": prior["condition_prior_token_ids"], "steps": steps,
                          "guidance": guidance},
                         **progress)
    decoded = runner.run("glm_image.decode", model_key, {"latents": latents})
    return decoded, latents


def check_request(layout: Layout, *, prompt: str | list[str], height: int, width: int, steps: int,
                  guidance: float, seed: int, images: Any = None,
                  negative_prompt: str | list[str] | None = None) -> tuple[list[str], list | None]:
    """Every check that can run on the host, before anything is sent: a bad request must not reach the workers
    (an exception there in a stage that every rank runs costs a restart of the group). Returns the prompts as a
    list and the condition images as PIL images (None for text-to-image)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    check_inputs(prompts=prompts, height=height, width=width, steps=steps, guidance=guidance, seed=seed)
    layout.check_branches(2 if guidance > 1 else 1)
    images = as_pil_images(images)
    if images and len(prompts) != 1:
        raise ValueError(f"editing takes one prompt, got {len(prompts)}")
    if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) not in (1, len(prompts)):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompt)} negative prompts")
    return prompts, images
