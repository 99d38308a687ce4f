"""ComfyUI's LATENT space for Z-Image and diffusers' latent space, converted both ways.

ComfyUI keeps LATENT["samples"] in the VAE's raw space (what VAE Encode gives and VAE Decode takes); diffusers'
pipelines and our stages work on normalised latents. For Z-Image ComfyUI uses the Flux latent format.
"""
from __future__ import annotations

import torch

# ComfyUI 0.8.0 comfy/latent_formats.py, class Flux (Z-Image's latent_format in comfy/supported_models.py)
LATENT_CHANNELS = 16
SCALE_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159


def to_comfy(latents: torch.Tensor) -> torch.Tensor:
    """diffusers -> ComfyUI, as Flux.process_out (same operations in the same order, so the same floats)."""
    return latents / SCALE_FACTOR + SHIFT_FACTOR


def from_comfy(samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI -> diffusers, as Flux.process_in."""
    return (samples - SHIFT_FACTOR) * SCALE_FACTOR


def init_latents_from_comfy(samples: torch.Tensor) -> torch.Tensor:
    """A LATENT as KSampler starts sampling from it, in diffusers' space. An all-zero one (EmptySD3LatentImage,
    EmptyLatentImage) is not shifted (comfy/samplers.py inner_sample: "Don't shift the empty latent image") and takes
    the model's channel count (comfy/sample.py fix_empty_latent_channels): it stays zeros."""
    if not torch.any(samples):
        return samples.new_zeros(samples.shape[0], LATENT_CHANNELS, *samples.shape[2:])
    return from_comfy(samples)
