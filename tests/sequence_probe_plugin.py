"""A plugin for the sequence-parallel tests: stages that look inside the sharding instead of only at its result.
Workers import it by name through WorkerGroup(extra_sys_path=[tests/])."""
import torch
import torch.nn.functional as F
from dynamo_check import blocks_compiled_by_dynamo, graphs_made

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.parallel import Parallelism, Stage
from comfyui_parallel_diffusion.parallel.sequence import Region, Stream, ulysses_attention


def ulysses_error(ctx, model, *, batch: int, length: int, heads: int, head_dim: int, padded_from: int | None):
    """Ulysses over random q/k/v against full-sequence SDPA, as the routed attention calls it. With `padded_from`,
    batch item -1 has its keys from there on masked (a device mask); without, the only non-keys are the sharding's
    own padding, which the region drops by position (real_keys)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, length, heads, head_dim, generator=gen) for _ in range(3))
    valid = torch.ones(batch, length, dtype=torch.bool)
    if padded_from is not None:
        valid[-1, padded_from:] = False
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :]).transpose(1, 2)
    rank = ctx.comm.sp_rank
    stream = Stream.plan(length, ctx.comm.layout.sp, None if padded_from is None else valid, batch, q.device)
    region = Region(ctx.comm, {"x": stream}, ["x"], batch, q.device)
    region.key_index = region.real_keys()  # as shard_blocks sets it on entry
    index, mask = region.attention_keys()
    if (index is None) != (padded_from is not None):
        raise AssertionError(f"real keys {index} for padded_from={padded_from}")
    local = [stream.split(t, rank, dim=1) for t in (q, k, v)]
    out = ulysses_attention(ctx.comm, *local, mask, key_index=index)
    out = stream.gather(ctx.comm, out, dim=1)
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


def block_compiles(ctx, model, *, glyph_lengths: list[int]) -> list[int]:
    """GLM-Image DiT calls with these glyph-text lengths, its blocks compiled by dynamo (dynamo_check.py): how many
    graphs dynamo made during each call. Hitting dynamo's recompile limit raises here (on a GPU, dynamo would run
    the blocks uncompiled from then on)."""
    from comfyui_parallel_diffusion.models.glm_image.model import forward

    transformer, gen = model.transformer, torch.Generator().manual_seed(0)
    config = transformer.config
    x = torch.randn(1, config.in_channels, 8, 12, generator=gen)
    prior = torch.randint(0, config.prior_vq_quantizer_codebook_size, (1, 24), generator=gen)
    fixed = (torch.full((1,), 500.0), torch.tensor([[64.0, 96.0]]), torch.zeros(1, 2), transformer.rope(x))
    made = []
    with blocks_compiled_by_dynamo(list(transformer.transformer_blocks)):
        for length in glyph_lengths:
            before = graphs_made()
            embeds = torch.randn(1, length, config.text_embed_dim, generator=gen)
            with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                forward(transformer, False, x, prior, embeds, *fixed)
            made.append(graphs_made() - before)
    return made


STAGES = {**models.STAGES,
          "probe.block_compiles": Stage("probe.block_compiles", Parallelism.EVERY_RANK, block_compiles),
          "probe.ulysses_error": Stage("probe.ulysses_error", Parallelism.EVERY_RANK, ulysses_error),
          "probe.shard_lengths": Stage("probe.shard_lengths", Parallelism.EVERY_RANK, shard_lengths)}
LOADERS = models.LOADERS
