"""GLM-Image's attention processor: diffusers' GlmImageAttnProcessor, step for step, but the attention call: inside a
sequence-parallel region (plan.py shards the blocks) it attends over every rank's tokens (parallel/sequence.py),
else it is diffusers' call. tests/test_glm_image.py holds it equal to diffusers' processor.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor

from ...parallel.sequence import active_region
from ..processors import replace_processors


class SequenceParallelAttnProcessor:
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, kv_cache=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = encoder_hidden_states.dtype
        batch_size, text_seq_length, _ = encoder_hidden_states.shape
        image_seq_length = hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:  # the image stream only
            query[:, text_seq_length:] = apply_rotary_emb(query[:, text_seq_length:], image_rotary_emb,
                                                          sequence_dim=1, use_real_unbind_dim=-2)
            key[:, text_seq_length:] = apply_rotary_emb(key[:, text_seq_length:], image_rotary_emb,
                                                        sequence_dim=1, use_real_unbind_dim=-2)
        if kv_cache is not None:
            if kv_cache.mode == "write":
                kv_cache.store(key, value)
            elif kv_cache.mode == "read":
                key, value = kv_cache.get(key, value)

        if attention_mask is not None:  # (B, text_len) glyph mask -> (B, 1, L, L) over text + image
            text_mask = attention_mask.float().to(query.device)
            mix = torch.ones((batch_size, text_seq_length + image_seq_length), device=query.device)
            mix[:, :text_seq_length] = text_mask
            mix = mix.unsqueeze(2)
            attention_mask = ((mix @ mix.transpose(1, 2)) > 0).unsqueeze(1).to(query.dtype)

        region = active_region()
        if region is None:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False)
        else:
            hidden_states = region.attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


def use_sequence_parallel_attention(transformer) -> None:
    """Give every attention module of a loaded GLM-Image DiT the project's processor."""
    replace_processors(transformer, GlmImageAttnProcessor, SequenceParallelAttnProcessor())
