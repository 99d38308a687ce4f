"""Z-Image's attention with its rotary embedding in real arithmetic.

diffusers' ZSingleStreamAttnProcessor rotates queries and keys by multiplying complex numbers. Inductor cannot
generate code for complex operators, so in the compiled blocks the product ran as an eager kernel on float32 copies
that the norm wrote and a later kernel cast back. Written as the same products of real and imaginary parts (the
same float32 operations; bit-identical on CPU), the rotation is element-wise arithmetic that inductor fuses with the
norm and the cast into one kernel (measured: bench/README.md, Z-Image denoising).
Everything else is diffusers' processor, step for step, but the attention call: inside a sequence-parallel region
(plan.py shards the blocks) it attends over every rank's tokens (parallel/sequence.py), else it is diffusers' call.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers import transformer_z_image

from ...parallel.sequence import active_region
from ..processors import replace_processors


class RealRotaryAttnProcessor:
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = rotate(query, freqs_cis), rotate(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        region = active_region()
        if region is None:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False)
        else:
            hidden_states = region.attention(query, key, value, attn_mask=attention_mask)
        output = attn.to_out[0](hidden_states.flatten(2, 3).to(query.dtype))
        return attn.to_out[1](output) if len(attn.to_out) > 1 else output


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) rotated by freqs_cis (B, S, D / 2, complex): each pair (x[2j], x[2j + 1]) taken as
    x[2j] + i x[2j + 1] and multiplied by freqs_cis[j], in float32 as diffusers does, then cast back."""
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    freqs = torch.view_as_real(freqs_cis).unsqueeze(2)  # (B, S, 1, D / 2, 2)
    cos, sin = freqs[..., 0], freqs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).type_as(x)


def use_real_rotary(transformer) -> None:
    """Give every attention module of a loaded Z-Image DiT the real-arithmetic processor."""
    replace_processors(transformer, transformer_z_image.ZSingleStreamAttnProcessor, RealRotaryAttnProcessor())
