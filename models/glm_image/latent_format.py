"""GLM-Image's two latent spaces, and the conversion between them.

- DIFFUSERS: what diffusers' GlmImagePipeline denoises in and returns with output_type="latent" (the CLI's
  --latents-out): the VAE's latents normalised per channel by its config's latents_mean and latents_std.
- VAE: the VAE's raw space, what vae.decode takes directly: ComfyUI's convention for LATENT["samples"].

    raw = latents * latents_std + latents_mean    (GlmImagePipeline, before vae.decode)
"""
from __future__ import annotations

import torch

DIFFUSERS = "diffusers"
VAE = "vae"
SPACES = (DIFFUSERS, VAE)


def check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"latent_space must be one of {SPACES}, got {space!r}")


def to_vae(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """DIFFUSERS -> VAE, in the latents' dtype (diffusers casts them to the VAE's dtype first)."""
    mean, std = _stats(vae_config, latents)
    return latents * std + mean


def from_vae(raw: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE -> DIFFUSERS, in the latents' dtype (as diffusers normalises the condition images' latents)."""
    mean, std = _stats(vae_config, raw)
    return (raw - mean) / std


def _stats(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae_config.latent_channels, 1, 1)
    mean = torch.tensor(vae_config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae_config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std
