"""The prepare stage (glm_image.prepare): what the denoising loop takes besides the prior tokens: glyph embeddings,
seeded noise, size conditioning and the condition images' latents."""
from __future__ import annotations

import re
from typing import Any

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from ...parallel import StageContext
from . import latent_format
from .inputs import as_pil_images, check_size, prompt_list
from .model import GlmImage

MAX_SEQUENCE_LENGTH = 2048  # diffusers' default for the glyph encoder


@torch.no_grad()
def prepare(ctx: StageContext, model: GlmImage, *, prompt: str | list[str], height: int, width: int, seed: int,
            negative_prompt: str | list[str] | None = None, images: list | None = None) -> dict[str, Any]:
    """Everything the denoising loop takes besides the prior tokens and the step count, on rank 0, which alone holds
    the glyph encoder and the VAE; the host sends it to every rank with the denoise request. Independent of steps
    and guidance, so changing those reruns the denoising only."""
    check_size(height, width)
    prompts = prompt_list(prompt)
    batch, dev, dtype = len(prompts), ctx.device, ctx.dtype
    # diffusers' uncond branch: the glyph texts of the negative prompt, "" by default; a one-token T5 pass, so it
    # is made whether or not the guidance will use it
    negative = prompt_list(negative_prompt) if negative_prompt is not None else [""]
    negative = negative * batch if len(negative) == 1 else negative
    if len(negative) != batch:
        raise ValueError(f"{batch} prompts but {len(negative)} negative prompts")
    out: dict[str, Any] = {"prompt_embeds": _glyph_embeds(model, prompts, dev, dtype).cpu(),
                           "negative_prompt_embeds": _glyph_embeds(model, negative, dev, dtype).cpu()}

    shape = (batch, model.transformer.config.in_channels, height // model.vae_scale_factor,
             width // model.vae_scale_factor)
    generator = torch.Generator("cpu").manual_seed(seed)
    out["latents"] = torch.randn(shape, generator=generator, dtype=dtype)  # diffusers' randn_tensor on the CPU

    out["target_size"] = torch.tensor([[height, width]], dtype=dtype).repeat(batch, 1)
    out["crop_coords"] = torch.tensor([[0, 0]], dtype=dtype).repeat(batch, 1)
    images = as_pil_images(images)
    out["condition_latents"] = _condition_latents(model, images, dev, dtype) if images else None
    return out



def glyph_texts(prompt: str) -> list[str]:
    """The quoted substrings diffusers renders as glyphs, in its order: '...', “...”, "...", 「...」."""
    return (re.findall(r"'([^']*)'", prompt) + re.findall(r"\u201c([^\u201c\u201d]*)\u201d", prompt)
            + re.findall(r'"([^"]*)"', prompt) + re.findall(r"「([^「」]*)」", prompt))


def _glyph_embeds(model: GlmImage, prompts: list[str], dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' _get_glyph_embeds: every glyph text of a prompt through the T5 encoder, padding dropped and the
    texts concatenated; prompts left-padded with zeros to one length. (B, L, text_embed_dim), L >= 1."""
    tok = model.tokenizer
    embeds = []
    for prompt in prompts:
        texts = glyph_texts(prompt) or [""]
        ids = tok(texts, max_length=MAX_SEQUENCE_LENGTH, truncation=True).input_ids
        ids = [[tok.pad_token_id] * ((len(ids) + 1) % 2) + x for x in ids]  # sic: parity of the text count
        longest = max(len(x) for x in ids)
        mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids], device=dev)
        ids = torch.tensor([x + [tok.pad_token_id] * (longest - len(x)) for x in ids], device=dev)
        hidden = model.text_encoder(ids, attention_mask=mask).last_hidden_state
        embeds.append(hidden[mask.bool()].unsqueeze(0))
    longest = max(e.shape[1] for e in embeds)
    embeds = [torch.cat([e.new_zeros(1, longest - e.shape[1], e.shape[2]), e], dim=1) for e in embeds]
    return torch.cat(embeds).to(dev, dtype)


def _condition_latents(model: GlmImage, images: list[PIL.Image.Image], dev: torch.device, dtype: torch.dtype
                       ) -> list[torch.Tensor]:
    """Each condition image cropped to a multiple of 16, VAE-encoded (mode) and normalised: (1, 16, h/8, w/8)."""
    vae = model.vae
    multiple = model.vae_scale_factor * model.transformer.config.patch_size
    processor = VaeImageProcessor(vae_scale_factor=model.vae_scale_factor)
    latents = []
    for img in images:
        h, w = (img.height // multiple) * multiple, (img.width // multiple) * multiple
        pixels = processor.preprocess(img, height=h, width=w).to(dev, dtype)
        latent = vae.encode(pixels).latent_dist.mode()
        latents.append(latent_format.from_vae(latent, vae.config).cpu())
    return latents
