"""Worker plugin for the benchmarks: the project's own stages, plus loaders that build full-size models with
random weights on the GPU (speed does not depend on weight values; nothing can be downloaded here).

Every rank seeds the same generator before drawing weights, so all ranks hold identical models, as they would
after loading one checkpoint. Weights are N(0, 0.02) so activations stay finite in bf16 and parity can be
measured on real numbers, not NaNs.
"""
from __future__ import annotations

import time

import torch
from diffusers import AutoencoderKL, GlmImageTransformer2DModel, ZImageTransformer2DModel
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.models.glm_image import plan as glm_plan
from comfyui_parallel_diffusion.models.glm_image.stages import GlmImage
from comfyui_parallel_diffusion.models.zimage import tiny as zimage_tiny
from comfyui_parallel_diffusion.models.zimage.plan import apply_sequence_parallel
from comfyui_parallel_diffusion.models.zimage.stages import ZImage
from comfyui_parallel_diffusion.parallel import Loader, Parallelism, Stage

# Shapes of the released Z-Image (6.16 B DiT; Flux's VAE), from shared/design.md.
ZIMAGE_DIT = dict(zimage_tiny.TRANSFORMER_CONFIG, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
                  n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
FLUX_VAE = dict(zimage_tiny.VAE_CONFIG, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                norm_num_groups=32)
# GLM-Image: 6.93 B DiT, 30 layers of 32 heads x 128; glyph encoder T5 d_model 1472, 12 layers (shared/design.md).
GLM_DIT = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=128,
               num_attention_heads=32, text_embed_dim=1472, time_embed_dim=512, condition_dim=256,
               prior_vq_quantizer_codebook_size=16384)
GLYPH_T5 = dict(d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, dropout_rate=0.0)
GLM_VAE = dict(FLUX_VAE, latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
GLM_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.25,
                     max_shift=0.75, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="linear")
SCALES = {
    "full": {"dit": ZIMAGE_DIT, "vae": FLUX_VAE, "glm_dit": GLM_DIT, "glyph": GLYPH_T5, "glm_vae": GLM_VAE},
    "tiny": {"dit": zimage_tiny.TRANSFORMER_CONFIG, "vae": zimage_tiny.VAE_CONFIG,  # CPU smoke runs
             "glm_dit": dict(GLM_DIT, num_layers=2, attention_head_dim=8, num_attention_heads=3, text_embed_dim=32,
                             time_embed_dim=32, condition_dim=16, prior_vq_quantizer_codebook_size=64),
             "glyph": dict(GLYPH_T5, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
             "glm_vae": dict(zimage_tiny.VAE_CONFIG, latents_mean=[0.0] * 16, latents_std=[1.0] * 16)},
}


def random_module(cls, config: dict, ctx, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(ctx.device):
        module = cls(**config).to(ctx.dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.eval()


def load_zimage(ctx, *, scale: str) -> ZImage:
    shapes = SCALES[scale]
    transformer = random_module(ZImageTransformer2DModel, shapes["dit"], ctx, seed=0)
    apply_sequence_parallel(transformer, ctx.comm)
    model = ZImage(transformer, dict(zimage_tiny.SCHEDULER_CONFIG))
    if ctx.is_main:
        model.vae = random_module(AutoencoderKL, shapes["vae"], ctx, seed=1)
    return model


def load_glm_image(ctx, *, scale: str) -> GlmImage:
    """The DiT, glyph encoder and VAE that prepare/denoise/decode use; the AR model is benchmarked in bench/ar.py."""
    shapes = SCALES[scale]
    tokenizer = ByT5Tokenizer()
    model = GlmImage(
        transformer=random_module(GlmImageTransformer2DModel, shapes["glm_dit"], ctx, seed=0),
        text_encoder=random_module(lambda **c: T5EncoderModel(T5Config(vocab_size=len(tokenizer), **c)),
                                   shapes["glyph"], ctx, seed=1),
        tokenizer=tokenizer,
        vae=random_module(AutoencoderKL, shapes["glm_vae"], ctx, seed=2),
        scheduler_config=dict(GLM_SCHEDULER),
    )
    model.sp_hooks = glm_plan.apply_sequence_parallel(model.transformer, ctx.comm)
    return model


def profile(ctx, model, *, stage: str, inputs: dict) -> dict:
    """Run one stage under torch.profiler on every rank; rank 0 returns where its time went."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    torch.cuda.synchronize() if ctx.device.type == "cuda" else None
    with torch_profile(activities=activities) as prof:
        started = time.perf_counter()
        STAGES[stage].fn(ctx, model, **inputs)
        torch.cuda.synchronize() if ctx.device.type == "cuda" else None
        wall = time.perf_counter() - started
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    comm_us = sum(e.self_device_time_total for e in events if "nccl" in e.key.lower())
    attention_us = sum(e.self_device_time_total for e in events if "flash" in e.key.lower() or "attention" in e.key.lower())
    return {"rank": ctx.comm.rank, "wall_s": wall, "device_busy_s": device_us / 1e6, "nccl_s": comm_us / 1e6,
            "attention_kernels_s": attention_us / 1e6,
            "top": events.table(sort_by="self_device_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total",
                                row_limit=14, max_name_column_width=60)}


STAGES = {**models.STAGES, "bench.profile": Stage("bench.profile", Parallelism.SEQUENCE_PARALLEL, profile)}
LOADERS = {**models.LOADERS, "zimage_random": Loader("zimage_random", load_zimage),
           "glm_image_random": Loader("glm_image_random", load_glm_image)}
