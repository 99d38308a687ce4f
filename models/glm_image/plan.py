"""GLM-Image's sequence-parallel plan: the DiT's transformer blocks run sharded over the joint sequence.

Each GlmImageTransformerBlock takes two token streams, which diffusers' GlmImageAttnProcessor concatenates glyph
text first, image second; both are split across the SP group on entry to `transformer_blocks.0` (each padded to a
multiple of the SP degree, the padding masked as keys, so the 1-token negative glyph prompt works on any degree),
the image rotary tables (cos, sin), whose sequence dim is 0, are split with the image stream, and both outputs
are gathered after the last block, before `norm_out`/`proj_out`. Attention is diffusers' own processor; its
module-level `dispatch_attention_fn` is routed through Ulysses while a sharded region is active.

Image editing adds the condition-image KV cache: in "write" mode each rank stores its *local* condition keys and
values, padding included; in "read" mode the processor prepends them to the local keys, so the gathered key
sequence holds, per rank, [that rank's cache, its glyph tokens, its image tokens]. A second pre-hook on the first
block records which cached positions are real when the cache is written and hands that mask to the region
(`Region.key_prefix`) when it is read; "skip" (the unconditional branch) adds no keys.
"""
from __future__ import annotations

import torch
from diffusers.models.transformers import transformer_glm_image

from ...parallel.comm import Comm
from ...parallel.sequence import BlockSpec, active_region, routed_attention, shard_blocks

TEXT, IMAGE = "encoder_hidden_states", "hidden_states"
BLOCK = BlockSpec(
    streams=[TEXT, IMAGE],  # the order GlmImageAttnProcessor concatenates them
    outputs=[IMAGE, TEXT],  # GlmImageTransformerBlock returns (hidden_states, encoder_hidden_states)
    masks={"attention_mask": TEXT},  # the processor's optional (B, text_len) glyph mask
    rope={"image_rotary_emb": (IMAGE, 0)},  # (cos, sin), each (image_len, head_dim)
)
CACHE_VALID = "_sequence_parallel_key_valid"  # on layer 0's GlmImageLayerKVCache: per write, per SP rank


def apply_sequence_parallel(transformer, comm: Comm) -> list:
    """Install the plan on a loaded GlmImageTransformer2DModel (a no-op on one SP rank); returns hook handles."""
    if comm.layout.sp == 1:
        return []
    transformer_glm_image.dispatch_attention_fn = routed_attention(transformer_glm_image.dispatch_attention_fn)
    blocks = list(transformer.transformer_blocks)
    handles = shard_blocks(blocks, comm, BLOCK)
    # Registered after shard_blocks' entry hook, so the region it opens is active when this runs.
    handles.append(blocks[0].register_forward_pre_hook(_condition_cache_keys, with_kwargs=True))
    return handles


def _condition_cache_keys(module, args, kwargs):
    cache = kwargs.get("kv_cache")
    region = active_region()
    if cache is None or region is None or cache.mode not in ("write", "read"):
        return None
    sp = region.comm.layout.sp
    if cache.mode == "write":
        if region.streams[TEXT].full_len:
            raise NotImplementedError("GLM-Image writes the condition-image KV cache without glyph tokens")
        if cache.current_sample_idx:
            raise NotImplementedError("sequence-parallel GLM-Image editing supports one sample per batch")
        image = region.streams[IMAGE]
        writes = getattr(cache, CACHE_VALID, [])
        writes.append([image.local_valid(r, 1, region.device) for r in range(sp)])
        setattr(cache, CACHE_VALID, writes)
    elif cache.k_caches:  # "read" with something cached: every rank's gathered keys start with its cache
        writes = getattr(cache, CACHE_VALID)
        region.key_prefix = [torch.cat([w[r] for w in writes], dim=1).expand(region.batch, -1) for r in range(sp)]
    return None
