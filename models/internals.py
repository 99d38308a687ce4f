"""The transformers and diffusers internals the models rely on, the versions they were tested with (the gate itself:
parallel/versions.py; tests/test_versions.py checks each against the installed libraries)."""
from __future__ import annotations

from ..parallel.versions import Internal, Path

_GLM = "transformers.models.glm_image.modeling_glm_image"

# glm_image/ar_decode.py runs generate() with its own decoding loop (a copy of GenerationMixin._sample's, given as
# generate's custom_generate), calling generate()'s private prefill and reading GLM-Image's decode position table;
# decode_step.py reimplements GlmImageTextModel.forward for one token; logits_processors.py replaces two processors
# by equivalents built from their attributes. Off: plain generate() on one rank (ar_decode.enabled, model.ar_placement).
FAST_AR = Path(
    name="GLM-Image's fast AR decoding",
    package="transformers",
    tested=("5.23", "5.24"),
    internals=(
        Internal("transformers.generation.utils.GenerationMixin._sample",
                 ("self", "input_ids", "logits_processor", "stopping_criteria", "generation_config"),
                 mentions=("_pad_token_tensor", "_prefill", "multinomial", "argmax")),
        Internal("transformers.generation.utils.GenerationMixin._prefill",
                 ("self", "input_ids", "generation_config", "model_kwargs")),
        Internal("transformers.generation.utils.GenerationMixin._prepare_special_tokens",
                 mentions=("_pad_token_tensor",)),
        Internal("transformers.generation.utils.GenerationMixin.generate", mentions=("custom_generate",)),
        Internal(f"{_GLM}.GlmImageModel", mentions=("_cached_decode_position_ids", "rope_deltas", "_prefill_len")),
        Internal(f"{_GLM}.GlmImageModel.compute_3d_position_ids"),
        Internal(f"{_GLM}.GlmImageTextModel.forward", mentions=("embed_tokens", "rotary_emb", "norm")),
        Internal(f"{_GLM}.GlmImageTextDecoderLayer.forward",
                 mentions=("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                           "post_mlp_layernorm")),
        Internal(f"{_GLM}.GlmImageTextAttention.forward", mentions=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "scaling", "apply_rotary_pos_emb")),
        Internal(f"{_GLM}.GlmImageTextMLP.forward", mentions=("gate_up_proj", "activation_fn", "down_proj")),
        Internal(f"{_GLM}.apply_rotary_pos_emb", ("q", "k", "cos", "sin")),
        Internal("transformers.cache_utils.StaticLayer.update", mentions=("cumulative_length",)),
        Internal("transformers.SuppressTokensLogitsProcessor.__init__", mentions=("self.suppress_tokens",)),
        Internal("transformers.TopKLogitsWarper.__init__", mentions=("self.top_k", "self.filter_value")),
    ),
    fallback="The AR runs plain generate() on GPU 0 (same tokens, slower).",
)

# Sequence parallelism attends through the project's processors (zimage/attention.py, glm_image/attention.py:
# diffusers' ZSingleStreamAttnProcessor and GlmImageAttnProcessor step for step, but the attention call), installed
# with Attention.set_processor in place of diffusers' own (processors.py). A diffusers whose processors changed
# would leave the copies computing what diffusers no longer does: requirements.txt pins diffusers to 0.42.x, and a
# plan that shards the DiT checks SEQUENCE_PARALLEL_ATTENTION.available() (processors.check_sequence_parallel)
# and refuses to shard without it.
_DISPATCH = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_Z = "diffusers.models.transformers.transformer_z_image"
_GLM_DIT = "diffusers.models.transformers.transformer_glm_image"
SEQUENCE_PARALLEL_ATTENTION = Path(
    name="Sequence-parallel attention through the project's copies of diffusers' attention processors",
    package="diffusers",
    tested=("0.42",),
    internals=(
        Internal("diffusers.models.attention_processor.Attention.set_processor", ("self", "processor"),
                 mentions=("self.processor = processor",)),
        Internal("diffusers.models.attention_dispatch.dispatch_attention_fn", _DISPATCH),
        Internal(f"{_Z}.ZSingleStreamAttnProcessor.__call__",
                 ("self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "freqs_cis"),
                 mentions=("to_q", "norm_q", "norm_k", "view_as_complex", "dispatch_attention_fn(", "to_out")),
        Internal(f"{_GLM_DIT}.GlmImageAttnProcessor.__call__",
                 ("self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb",
                  "kv_cache"),
                 mentions=("to_q", "norm_q", "norm_k", "apply_rotary_emb", "kv_cache.store", "kv_cache.get",
                           "mix_attn_mask", "dispatch_attention_fn(", "to_out")),
        Internal("diffusers.models.embeddings.apply_rotary_emb", ("x", "freqs_cis", "use_real",
                                                                  "use_real_unbind_dim", "sequence_dim")),
    ),
    fallback="Use gpus 1 or cfg_parallel without sequence parallelism, or diffusers 0.42.x.",
)
