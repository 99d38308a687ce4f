"""A tiny random-weight Z-Image pipeline, built offline, for tests and CPU smoke runs.

It keeps Z-Image's real geometry (VAE x8 with 4 levels, patch 2, 16 latent channels, Qwen3 chat template,
hidden_states[-2] as caption features) and shrinks widths and depths. Every setting that a weights file does not
determine (head dim 128 and its rotary axes, norm groups 32, Qwen3's vocabulary and rotary base) is the published
one, so the same weights also load from ComfyUI's split files through models/zimage/comfyui_files.py. The DiT has
3 heads, a head count that is not a power of two, so Ulysses head padding is exercised at degree 2 and 4.
"""
import json
from pathlib import Path

import torch


# Bump when anything below changes, so existing builds are rebuilt instead of reused.
TINY_ZIMAGE_VERSION = 2
MARKER = "tiny_zimage_build.json"

# What ZImagePipeline renders for one user message with enable_thinking=True, as Qwen3's own template does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

TEXT_HIDDEN = 48

TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=384,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=3,
    n_kv_heads=3,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=TEXT_HIDDEN,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],  # sums to the head dim, 384 / 3 = 128, as published
    axes_lens=[1536, 512, 512],
)

# Z-Image's VAE is Flux's: 16 latent channels, 4 levels (x8), no quant convs, Flux's scale and shift.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# Z-Image-Turbo's scheduler: a fixed shift of 3, no resolution-dependent shift.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def build_tiny_zimage(folder) -> Path:
    """Build the tiny pipeline into `folder` (a diffusers model folder) unless a complete build is there."""
    folder = Path(folder)
    if _is_complete(folder):
        return folder
    from diffusers import ZImagePipeline

    tokenizer = _tiny_tokenizer()
    pipeline = ZImagePipeline(
        scheduler=_scheduler(),
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(),
        tokenizer=tokenizer,
        transformer=_tiny_transformer(),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    # Written last: its presence means every component above was saved completely.
    (folder / MARKER).write_text(json.dumps({"version": TINY_ZIMAGE_VERSION}))
    return folder


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text())["version"] == TINY_ZIMAGE_VERSION
    except (OSError, ValueError, KeyError):
        return False


def _tiny_tokenizer():
    """Byte-level BPE with no merges: every byte is one token, so any prompt tokenizes without a real vocab."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(char, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=CHAT_TEMPLATE)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return tokenizer


# Qwen3's vocabulary, so that the Qwen tokenizer ComfyUI ships can drive the tiny encoder too (the tiny tokenizer
# uses its first few hundred ids).
TEXT_VOCAB = 151936


def _tiny_text_encoder():
    from transformers import Qwen3Config, Qwen3Model

    # 2 layers: hidden_states[-2], which the pipeline takes, is then a layer's output (not the embeddings) that
    # has not been through the final norm, as in the real 36-layer model.
    config = Qwen3Config(
        vocab_size=TEXT_VOCAB,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(1)
    return Qwen3Model(config).eval()


def _tiny_transformer():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(2)
    model = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
    _perturb_zero_parameters(model, seed=3)
    return model.eval()


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(4)
    model = AutoencoderKL(**VAE_CONFIG)
    _perturb_zero_parameters(model, seed=5)
    return model.eval()


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def _perturb_zero_parameters(model: torch.nn.Module, seed: int) -> None:
    """Give all-zero parameters (Z-Image's pad tokens, any zero-initialised bias) small random values.

    Trained weights are never exactly zero; a zero pad token would hide a sharding bug that moves padding."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
