"""A plugin for the sequence-parallel tests: stages that look inside the sharding instead of only at its result.
Workers import it by name through WorkerGroup(extra_sys_path=[tests/])."""
import torch
import torch.nn.functional as F

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.parallel import Parallelism, Stage
from comfyui_parallel_diffusion.parallel.sequence import Stream, ulysses_attention


def ulysses_error(ctx, model, *, batch: int, length: int, heads: int, head_dim: int, padded_from: int):
    """Ulysses over random q/k/v against full-sequence SDPA; batch item 1 has its keys past `padded_from` masked."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, length, heads, head_dim, generator=gen) for _ in range(3))
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[-1, padded_from:] = False
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :]).transpose(1, 2)
    sp, rank = ctx.comm.layout.sp, ctx.comm.sp_rank
    stream = Stream.plan(length, sp, valid, batch, q.device)
    local = [stream.split(t, rank, dim=1) for t in (q, k, v)]
    key_valid = torch.cat([stream.local_valid(r, batch, q.device) for r in range(sp)], dim=1)
    out = stream.gather(ctx.comm, ulysses_attention(ctx.comm, *local, key_valid), dim=1)
    real = valid[..., None, None]
    return ((out - ref).abs() * real).max().item()


def shard_lengths(ctx, model, *, height: int, width: int, prompt_embeds):
    """The sequence length each sharded block sees during one denoising step of the real Z-Image stages."""
    seen = {}

    def record(name):  # runs after the sharding hook, which passes every argument by name
        def hook(module, args, kwargs):
            seen.setdefault(name, (args[0] if args else kwargs["x"]).shape[1])
        return hook

    blocks = {"noise_refiner": model.transformer.noise_refiner[0], "layers": model.transformer.layers[0],
              "context_refiner": model.transformer.context_refiner[0]}
    handles = [block.register_forward_pre_hook(record(name), with_kwargs=True) for name, block in blocks.items()]
    try:
        latents = models.STAGES["zimage.prepare"].fn(ctx, model, batch=1, height=height, width=width, seed=0)
        models.STAGES["zimage.denoise"].fn(ctx, model, latents=latents, prompt_embeds=prompt_embeds,
                                           negative_prompt_embeds=[], steps=1, guidance=0.0)
    finally:
        for handle in handles:
            handle.remove()
    return seen


STAGES = {**models.STAGES,
          "probe.ulysses_error": Stage("probe.ulysses_error", Parallelism.SEQUENCE_PARALLEL, ulysses_error),
          "probe.shard_lengths": Stage("probe.shard_lengths", Parallelism.SEQUENCE_PARALLEL, shard_lengths)}
LOADERS = models.LOADERS
