"""GLM-Image's parallel plans: the DiT's blocks sharded over the joint sequence (sequence parallel), and the AR
decoder's layers sharded over the ranks (tensor parallel).

The DiT: each GlmImageTransformerBlock takes two token streams, which diffusers' GlmImageAttnProcessor concatenates
glyph text first, image second; both are split across the SP group on entry to `transformer_blocks.0` (each padded to a
multiple of the SP degree, the padding left out of the keys (masked when editing reads the cache, below), so the
1-token negative glyph prompt works on any degree),
the image rotary tables (cos, sin), whose sequence dim is 0, are split with the image stream, and both outputs
are gathered after the last block, before `norm_out`/`proj_out`. Attention runs through Ulysses by the project's
processor (attention.py: diffusers' GlmImageAttnProcessor but for its attention call), which model.py installs
whatever the degree.

Image editing adds the condition-image KV cache: in "write" mode each rank stores its *local* condition keys and
values, padding included; in "read" mode the processor prepends them to the local keys, so the gathered key
sequence holds, per rank, [that rank's cache, its glyph tokens, its image tokens]. A second pre-hook on the first
block records which cached positions are real when the cache is written and hands that mask to the region
(`Region.key_prefix`) when it is read; "skip" (the unconditional branch) adds no keys.
"""
from __future__ import annotations

import torch

from ...parallel.comm import Comm
from ...parallel.sequence import BlockSpec, active_region, shard_blocks
from ...parallel.tensor_parallel import (GatheredColumnLinear, RowParallelLinear, features_of_heads,
                                         keep_output_features)
from ..processors import check_sequence_parallel
from .ar_decode import TP_GROUP

TEXT, IMAGE = "encoder_hidden_states", "hidden_states"
BLOCK = BlockSpec(
    streams=[TEXT, IMAGE],  # the order GlmImageAttnProcessor concatenates them
    outputs=[IMAGE, TEXT],  # GlmImageTransformerBlock returns (hidden_states, encoder_hidden_states)
    masks={"attention_mask": TEXT},  # the processor's optional (B, text_len) glyph mask
    rope={"image_rotary_emb": (IMAGE, 0)},  # (cos, sin), each (image_len, head_dim)
)
CACHE_VALID = "_sequence_parallel_key_valid"  # on layer 0's GlmImageLayerKVCache: per write, per SP rank


def apply_sequence_parallel(transformer, comm: Comm) -> None:
    """Install the plan on a loaded GlmImageTransformer2DModel (a no-op on one SP rank)."""
    if comm.layout.sp == 1:
        return
    check_sequence_parallel("GLM-Image")
    blocks = list(transformer.transformer_blocks)
    shard_blocks(blocks, comm, BLOCK)
    # Registered after shard_blocks' entry hook, so the region it opens is active when this runs.
    blocks[0].register_forward_pre_hook(_condition_cache_keys, with_kwargs=True)


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


def ar_split_sizes(text_config) -> list[int]:
    """The group sizes GLM-Image's AR decoder shards over evenly, ascending: those dividing its query heads and FFN
    width whose KV heads split or replicate evenly (the published model: 1, 2, 4, 8, 16, 32)."""
    heads, kv_heads, ffn = text_config.num_attention_heads, text_config.num_key_value_heads, \
        text_config.intermediate_size
    return [n for n in range(1, heads + 1) if not (heads % n or (kv_heads % n and n % kv_heads) or ffn % n)]


def largest_ar_split(text_config, world_size: int) -> int:
    """The largest group of at most `world_size` ranks the AR decoder shards over (1: none)."""
    return max(n for n in ar_split_sizes(text_config) if n <= world_size)


def apply_ar_tensor_parallel(model, comm: Comm) -> None:
    """Shard a loaded GlmImageForConditionalGeneration's text decoder over the AR's group (ar_decode.TP_GROUP, ranks
    0..n-1 for an n of ar_split_sizes; the decoder broadcasts rank 0's tokens over it): in every layer, rank r keeps
    query heads [r*H/N, (r+1)*H/N) and the KV heads they read (replicated where N > KV heads), the matching o_proj
    inputs, and 1/N of the MLP (gate and up rows alike, down_proj's inputs); o_proj and down_proj sum over the
    group (through symmetric memory where the GPUs allow it: 4.6 -> 3.9 ms/token on 4 H200s). lm_head is split by
    vocabulary and gathered. Embeddings, norms and the vision tower stay whole."""
    group = TP_GROUP
    n, rank = comm.group_size(group), comm.group_rank(group)
    if n == 1:
        return
    text = model.config.text_config
    heads, kv_heads, head_dim, ffn = (text.num_attention_heads, text.num_key_value_heads, text.head_dim,
                                      text.intermediate_size)
    if n not in ar_split_sizes(text):
        raise ValueError(f"GLM-Image's AR decoder ({heads} heads, {kv_heads} KV heads, FFN {ffn}) cannot be split "
                         f"over {n} ranks; largest_ar_split gives the group to use")
    query = range(rank * heads // n, (rank + 1) * heads // n)
    per_kv = heads // kv_heads
    kv = sorted({h // per_kv for h in query})
    ffn_rows = torch.arange(rank * ffn // n, (rank + 1) * ffn // n)
    for layer in model.model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        keep_output_features(attn.q_proj, features_of_heads(query, head_dim))
        keep_output_features(attn.k_proj, features_of_heads(kv, head_dim))
        keep_output_features(attn.v_proj, features_of_heads(kv, head_dim))
        attn.num_key_value_groups = len(query) // len(kv)  # the attention kernels' GQA ratio, now per rank
        attn.o_proj = RowParallelLinear(attn.o_proj, features_of_heads(query, head_dim), comm, group)
        keep_output_features(mlp.gate_up_proj, torch.cat([ffn_rows, ffn + ffn_rows]))  # chunk(2) -> gate, up
        mlp.down_proj = RowParallelLinear(mlp.down_proj, ffn_rows, comm, group)
    if model.lm_head.out_features % n == 0:
        model.lm_head = GatheredColumnLinear(model.lm_head, comm, group)
    comm.enable_small_all_reduce(group, model.dtype)  # a decode step's sums are one token's: latency-bound
