"""The denoise stage (glm_image.denoise): diffusers' flow-matching loop over the DiT, with the condition images' KV
cache when editing."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

from ...parallel import StageContext
from ...parallel.cfg import run_branches
from . import latent_format
from .model import GlmImage, forward


@torch.no_grad()
def denoise(ctx: StageContext, model: GlmImage, *, latents: torch.Tensor, prior_token_ids: torch.Tensor,
            prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor, steps: int,
            target_size: torch.Tensor, crop_coords: torch.Tensor, guidance: float,
            condition_latents: list[torch.Tensor] | None = None,
            condition_prior_token_ids: list[torch.Tensor] | None = None,
            latent_space: str = latent_format.DIFFUSERS) -> torch.Tensor:
    """The flow-matching Euler loop of diffusers' GlmImagePipeline: per step a conditional DiT call (reading the
    condition-image KV cache when editing) and, with guidance > 1, an unconditional one (prior tokens dropped,
    cache skipped). Returns the final latents (B, 16, H/8, W/8) on the CPU, in `latent_space` (float32 there)."""
    latent_format.check_space(latent_space)
    use_cfg = guidance > 1
    ctx.comm.layout.check_branches(2 if use_cfg else 1)
    timesteps, sigmas = schedule(model, latents, steps)
    editing = bool(condition_latents)
    if editing and (condition_prior_token_ids is None or len(condition_prior_token_ids) != len(condition_latents)):
        raise ValueError("editing needs one condition_prior_token_ids entry per condition latent")
    model.weights.use("transformer")
    dev, dtype = ctx.device, model.transformer.dtype
    transformer = model.transformer
    latents = latents.to(dev)
    prior = prior_token_ids.to(dev)
    cond_embeds = prompt_embeds.to(dev, dtype)
    uncond_embeds = negative_prompt_embeds.to(dev, dtype) if use_cfg else None
    target_size, crop_coords = target_size.to(dev), crop_coords.to(dev)

    kv_caches = None
    if editing:
        kv_caches = GlmImageKVCache(num_layers=transformer.config.num_layers)
        kv_caches.set_mode("write")
        for latent, ids in zip(condition_latents, condition_prior_token_ids):
            latent, ids = latent.to(dev, dtype), ids.to(dev)
            with torch.compiler.set_stance("force_eager"):
                forward(transformer, False, latent, ids, cond_embeds.new_zeros(1, 0, cond_embeds.shape[2]),
                         torch.zeros((1,), device=dev),
                         torch.tensor([latent.shape[-2:]], device=dev) * model.vae_scale_factor,
                         torch.zeros((1, 2), device=dev), None, kv_caches)
        kv_caches.next_sample()

    # The DiT computes its rotary tables on the CPU at every call; once per request on the device instead keeps the
    # CPU (shared by all ranks) and host-to-device copies out of the loop.
    rope = tuple(t.to(dev) for t in transformer.rope(latents))

    def branch(embeds, drop_prior: bool, mode: str):
        def call() -> torch.Tensor:
            args = (x, prior, embeds, timestep, target_size, crop_coords, rope)
            if not editing:
                return model.predict[drop_prior](*args)
            # The condition-image KV cache is Python state, which compiled code and graphs would freeze: eager
            kv_caches.set_mode(mode)
            with torch.compiler.set_stance("force_eager"):
                return forward(transformer, drop_prior, *args, kv_caches)
        return call

    total = len(timesteps)
    # Per-step sigma differences moved once: a host-to-device copy inside the loop would stall the GPU queue
    step_sizes = (sigmas[1:] - sigmas[:-1]).to(dev)
    for i, t in enumerate(timesteps.to(dev)):
        x = latents.to(dtype)
        timestep = t.expand(latents.shape[0]) - 1
        branches = [branch(cond_embeds, False, "read")]
        if use_cfg:
            branches.append(branch(uncond_embeds, True, "skip"))
        preds = run_branches(ctx.comm, branches)
        noise_pred = preds[1] + guidance * (preds[0] - preds[1]) if use_cfg else preds[0]
        # FlowMatchEulerDiscreteScheduler.step: float32 Euler update, cast to the prediction's dtype
        latents = (latents.float() + step_sizes[i] * noise_pred).to(noise_pred.dtype)
        ctx.step(i + 1, total)
    if editing:
        kv_caches.clear()
    if latent_space == latent_format.VAE:
        # Computed in the VAE's dtype as diffusers does before decoding; float32 holds those values exactly, so
        # decoding them equals decoding diffusers' latents
        latents = latent_format.to_vae(latents.to(ctx.dtype), model.vae_config).float()  # ctx.dtype: the VAE's
    return latents.cpu()



def schedule(model: GlmImage, latents: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' GlmImagePipeline timesteps and sigmas, with the resolution-dependent shift."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    image_seq_len = (latents.shape[2] * latents.shape[3]) // model.transformer.config.patch_size ** 2
    train_steps = scheduler.config.num_train_timesteps
    timesteps = np.linspace(train_steps, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("base_shift", 0.25), scheduler.config.get("max_shift", 0.75))
    retrieve_timesteps(scheduler, steps, "cpu", timesteps, timesteps / train_steps, mu=mu)
    return scheduler.timesteps, scheduler.sigmas
