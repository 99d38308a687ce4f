"""The decode stage (glm_image.decode): the VAE turns the final latents into images."""
from __future__ import annotations

import torch

from ...parallel import StageContext
from . import latent_format
from .model import GlmImage


@torch.no_grad()
def decode(ctx: StageContext, model: GlmImage, *, latents: torch.Tensor,
           latent_space: str = latent_format.DIFFUSERS) -> torch.Tensor:
    """Latents in `latent_space` (diffusers' de-normalised here first), decoded -> (B, H, W, 3) float in [0, 1],
    CPU."""
    latent_format.check_space(latent_space)
    vae = model.vae
    z = latents.to(ctx.device, vae.dtype)
    if latent_space == latent_format.DIFFUSERS:
        z = latent_format.to_vae(z, vae.config)
    image = vae.decode(z, return_dict=False)[0]
    # diffusers' VaeImageProcessor.denormalize, in the VAE's dtype as diffusers runs it
    return (image * 0.5 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).cpu()
