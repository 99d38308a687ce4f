"""GLM-Image's pipeline: the order of its stages and what each request holds, defined once. `generate` runs all of
it through a runner (the CLI, the benchmarks); the ComfyUI nodes call the steps one by one, each through their own
`run(stage, inputs)` (one per node), so a node never builds a stage's request itself."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ...parallel import Layout
from . import latent_format
from .inputs import as_pil_images, check_inputs
from .tiny import build_tiny_glm_image as build_tiny  # noqa: F401  the family surface (see models/pipelines.py)

LOADER = "glm_image"
DEFAULT_STEPS = 50  # diffusers' GlmImagePipeline defaults
DEFAULT_GUIDANCE = 1.5
PRIOR = ("prior_token_ids", "condition_prior_token_ids")  # what sample_prior returns, which denoise takes

Run = Callable[[str, dict[str, Any]], Any]  # runs one stage of the model on its runner


def sample_prior(run: Run, *, prompts: list[str], height: int, width: int, seed: int, images: list | None = None
                 ) -> dict[str, Any]:
    """The AR's prior tokens (every rank agrees on them): {"prior_token_ids", "condition_prior_token_ids"}."""
    return run("glm_image.ar", {"prompt": prompts, "height": height, "width": width, "seed": seed, "images": images})


def prepare(run: Run, *, prompts: list[str], height: int, width: int, seed: int, images: list | None = None,
            negative_prompt: str | list[str] | None = None) -> dict[str, Any]:
    """Glyph embeddings, seeded noise, size conditioning and condition latents: the denoising loop's inputs."""
    return run("glm_image.prepare", {"prompt": prompts, "negative_prompt": negative_prompt, "height": height,
                                     "width": width, "seed": seed, "images": images})


def denoise(run: Run, prepared: dict[str, Any], prior: dict[str, Any], *, steps: int, guidance: float,
            latent_space: str = latent_format.DIFFUSERS) -> torch.Tensor:
    """The denoising loop from prepare's and sample_prior's results; latents in `latent_space`."""
    return run("glm_image.denoise", {**prepared, **{name: prior[name] for name in PRIOR}, "steps": steps,
                                     "guidance": guidance, "latent_space": latent_space})


def decode(run: Run, latents: torch.Tensor, latent_space: str = latent_format.DIFFUSERS) -> torch.Tensor:
    """Images (B, H, W, 3) in [0, 1] from latents in `latent_space`."""
    return run("glm_image.decode", {"latents": latents, "latent_space": latent_space})


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

    def run(stage: str, inputs: dict[str, Any]) -> Any:
        return runner.run(stage, model_key, inputs, on_progress=on_progress, should_cancel=should_cancel)

    prior = sample_prior(run, prompts=prompts, height=height, width=width, seed=seed, images=images)
    prepared = prepare(run, prompts=prompts, height=height, width=width, seed=seed, images=images,
                       negative_prompt=negative_prompt)
    latents = denoise(run, prepared, prior, steps=steps, guidance=guidance)
    return decode(run, latents), latents


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
