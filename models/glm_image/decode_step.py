"""GLM-Image's text decoder for one new token per sequence: the step FastDecoder (ar_decode.py) compiles and replays.

    fuse_qkv(model)                                   # once, before the step is compiled
    logits = decode_step(model, input_ids, position_ids, attention_mask, cache)

It is GlmImageTextModel.forward + lm_head (transformers 5.23) for the decode case, the same operations in the same
order, except for what a one-token step does not need or can do in fewer kernels (a profile of the compiled
step on an H200, bench/results/glm_ar_profile_*.json, showed the time inside kernels, not between them):
- q, k and v are one matmul: their weights are concatenated once (fuse_qkv), and the three Linear layers are left as
  views of the result, so the prefill and plain generate() read the same numbers from the same memory. The 256-row
  k and v projections alone ran at a tenth of the GPU's bandwidth, each with its own split-K reduction kernel.
- attention packs the query heads onto their KV head, (B, H, 1, D) -> (B, KV, H/KV, D), and is matmul - float32
  softmax - matmul, as transformers' eager attention computes it: K and V are read once, by kernels that spread over
  the whole cache (SDPA's fused kernels ran one block per KV head, 2 of 132 SMs, for one query token).
- the mask is built once per step from the cache position and the request's attention mask, and the new keys go
  into the static cache through its own update().
- every matmul is one row times a weight: gemv.py's kernel reads the weight once, where cuBLAS's split-K
  kernels took 9-25% longer per token (bench/results/gemv_h200.json). It applies to 16-bit weights on CUDA only, so
  float32 keeps F.linear and generate()'s exact numbers.
Norms, rope and activation are the model's own modules and functions, and o_proj, down_proj and lm_head are called
as modules (with the kernel as their matmul), so a tensor-parallel plan that replaced o_proj / down_proj / lm_head
and sharded q/k/v (plan.apply_ar_tensor_parallel, before fuse_qkv) holds here.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.glm_image.modeling_glm_image import apply_rotary_pos_emb

from . import gemv

_QKV_WEIGHT, _QKV_BIAS = "_fused_qkv_weight", "_fused_qkv_bias"  # non-persistent buffers: not in the state dict


def fuse_qkv(model) -> None:
    """Concatenate every text layer's q/k/v projections into one weight (and bias), the three Linear layers becoming
    views of it. Idempotent; redone where the layers no longer view it (a tensor-parallel plan replaced them)."""
    for layer in model.model.language_model.layers:
        attn = layer.self_attn
        linears = (attn.q_proj, attn.k_proj, attn.v_proj)
        fused = getattr(attn, _QKV_WEIGHT, None)
        if fused is not None and linears[0].weight.data_ptr() == fused.data_ptr():
            continue
        rows = [linear.out_features for linear in linears]
        weight = torch.cat([linear.weight.detach() for linear in linears])
        bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
        for linear, w, b in zip(linears, weight.split(rows), bias.split(rows) if bias is not None else [None] * 3):
            linear.weight = nn.Parameter(w, requires_grad=False)
            if b is not None:
                linear.bias = nn.Parameter(b, requires_grad=False)
        # buffers, not attributes: the compiled step treats them as fixed addresses (no copy into a CUDA graph)
        attn.register_buffer(_QKV_WEIGHT, weight, persistent=False)
        attn.register_buffer(_QKV_BIAS, bias, persistent=False)


def decode_step(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache) -> torch.Tensor:
    """Logits (B, 1, vocab) for `input_ids` (B, 1) at GLM-Image's 3D positions `position_ids` (3, B, 1); the new
    keys and values are written into the StaticCache `cache` at its current length. attention_mask: (B, cache
    length), 1 where a key may be attended (the request's padding 0), as generate() keeps it."""
    text = model.model.language_model
    hidden = text.embed_tokens(input_ids)
    cos, sin = text.rotary_emb(hidden, position_ids)
    position = cache.layers[0].cumulative_length  # where this token's keys go: every key up to it is visible
    keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    visible = ((keys <= position) & attention_mask.bool())[:, None, None, :]  # (B, 1, 1, L)
    for layer, layer_cache in zip(text.layers, cache.layers):
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        hidden = _attention(layer.self_attn, hidden, cos, sin, visible, layer_cache)
        hidden = residual + layer.post_self_attn_layernorm(hidden)
        residual = hidden
        hidden = _mlp(layer.mlp, layer.post_attention_layernorm(hidden))
        hidden = residual + layer.post_mlp_layernorm(hidden)
    return _project(model.lm_head, text.norm(hidden))


def _project(module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for an nn.Linear or a tensor-parallel layer (parallel/tensor_parallel.py), its matmul the kernel."""
    if isinstance(module, nn.Linear):
        return gemv.linear(x, module.weight, module.bias)
    return module(x, linear=gemv.linear)


def _mlp(mlp, hidden: torch.Tensor) -> torch.Tensor:
    """GlmImageTextMLP.forward."""
    gate, up = _project(mlp.gate_up_proj, hidden).chunk(2, dim=-1)
    return _project(mlp.down_proj, up * mlp.activation_fn(gate))


def _attention(attn, hidden, cos, sin, visible, layer_cache) -> torch.Tensor:
    batch, dim = hidden.shape[0], attn.head_dim
    qkv = gemv.linear(hidden, getattr(attn, _QKV_WEIGHT), getattr(attn, _QKV_BIAS))
    query, key, value = qkv.split([attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features],
                                  dim=-1)
    query, key, value = (t.view(batch, 1, -1, dim).transpose(1, 2) for t in (query, key, value))
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    keys, values = layer_cache.update(key, value)
    out = packed_gqa_attention(query, keys, values, visible, attn.scaling)
    return _project(attn.o_proj, out.reshape(batch, 1, -1))


def packed_gqa_attention(query, key, value, visible, scale: float) -> torch.Tensor:
    """Attention of one query token per sequence over a KV cache with grouped heads: query (B, H, 1, D), key and
    value (B, KV, L, D), visible (B, 1, 1, L) bool -> (B, 1, H, D). The scores are rounded to the model's dtype and
    the softmax is float32, as in transformers' eager attention: the cache is read as it is stored (a float32 copy
    of K and a float32 matmul took half of the attention's time)."""
    batch, heads, _, dim = query.shape
    groups = heads // key.shape[1]
    query = query.reshape(batch, heads // groups, groups, dim)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale  # (B, KV, H/KV, L)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, KV, H/KV, D)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2)
