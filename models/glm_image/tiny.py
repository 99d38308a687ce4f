"""A tiny random-weight GLM-Image, built offline, for tests: every component of diffusers' GlmImagePipeline.

The geometry is real (VAE x8 with 4 levels, patch 2, 16 latent channels, AR grid H/32 x W/32 upsampled 2x, a
16x16 vision patch so condition images land on the same grid); widths and depths are shrunk. The DiT has 3 heads
(not a power of two) so Ulysses head padding is exercised. Weights are deterministic (fixed seeds) and scaled so the
sampled prior tokens, the glyph embeddings and hence the image depend on prompt and seed.

    build_tiny_glm_image(folder) -> folder   # then GlmImagePipeline.from_pretrained(folder) works

The AR tokenizer is a byte-level BPE (no merges) whose first ids are the real `<|dit_token_i|>` strings, as in
GLM-Image, where `<|dit_token_{V}|>` (image start, the AR's bos) and `<|dit_token_{V+1}|>` (image end, the eos)
follow the V sampled vision tokens: the AR's lm_head has V outputs, so eos is never sampled and the token grid is
always complete.

The processor folder is laid out as the published zai-org/GLM-Image's: a flat preprocessor_config.json naming
GlmImageImageProcessor (transformers' torchvision class) with the published keys and values, pixel limits shrunk.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

VISION_VOCAB = 64  # sampled AR tokens == the DiT's prior codebook == the AR VQ codebook
IMAGE_START = VISION_VOCAB  # <|dit_token_64|>: image start, the AR's bos
IMAGE_END = VISION_VOCAB + 1  # <|dit_token_65|>: image end, the AR's eos (outside the sampled range)
DIT_HEADS = 3  # not a power of two: Ulysses pads heads for degree 2 and 4
MARKER = "tiny_glm_image.json"
VERSION = 3  # bump on any change: folders built by an older version are rebuilt
# The published processor/preprocessor_config.json, but for min_pixels and max_pixels
PREPROCESSOR_CONFIG = {
    "min_pixels": 32 * 32, "max_pixels": 1024 * 1024, "do_rescale": True, "do_normalize": True, "do_resize": True,
    "patch_size": 16, "temporal_patch_size": 1, "merge_size": 1, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "image_processor_type": "GlmImageImageProcessor",
    "processor_class": "GlmImageProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
}

CHAT_TEMPLATE = (
    "[gMASK]<|user|>\n"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|dit_token_" + str(IMAGE_START) + "|><|image|><|dit_token_" + str(IMAGE_END)
    + "|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "<|assistant|>\n"
)


def build_tiny_glm_image(folder: str | os.PathLike) -> str:
    """Write a tiny GLM-Image pipeline folder (diffusers layout, safetensors); a finished folder is left alone."""
    folder = Path(folder)
    marker = folder / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("version") == VERSION:
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)

    from diffusers import GlmImagePipeline

    with torch.random.fork_rng(devices=[]):
        components = _components()
    pipe = GlmImagePipeline(**components)
    pipe.save_pretrained(folder, safe_serialization=True)
    _publish_processor_layout(folder / "processor")
    marker.write_text(json.dumps({"version": VERSION}))
    return str(folder)


def _components() -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )).eval()

    torch.manual_seed(1)
    transformer = GlmImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=DIT_HEADS, text_embed_dim=text_encoder.config.d_model, time_embed_dim=32,
        condition_dim=16, prior_vq_quantizer_codebook_size=VISION_VOCAB,
    ).eval()
    _scale_up(transformer, seed=11)

    torch.manual_seed(2)
    mean = torch.linspace(-0.3, 0.3, 16)
    std = torch.linspace(0.6, 1.4, 16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
        sample_size=64, latents_mean=[round(v, 4) for v in mean.tolist()],
        latents_std=[round(v, 4) for v in std.tolist()],
    ).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="linear",
    )

    processor, ar_tokenizer = _processor()
    vision_language_encoder = _ar_model(ar_tokenizer)
    return dict(tokenizer=tokenizer, processor=processor, text_encoder=text_encoder,
                vision_language_encoder=vision_language_encoder, vae=vae, transformer=transformer,
                scheduler=scheduler)


def _processor():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GlmImageImageProcessorPil, GlmImageProcessor, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab: dict[str, int] = {}
    for i in range(IMAGE_END + 1):
        vocab[f"<|dit_token_{i}|>"] = len(vocab)
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    specials = ["<|endoftext|>", "[gMASK]", "<sop>", "<eop>", "<|user|>", "<|assistant|>", "<|image|>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([f"<|dit_token_{i}|>" for i in range(IMAGE_END + 1)] + specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=f"<|dit_token_{IMAGE_START}|>",
        eos_token=f"<|dit_token_{IMAGE_END}|>", pad_token="<|endoftext|>", image_token="<|image|>",
        grid_bos_token="<sop>", grid_eos_token="<eop>", padding_side="left",
    )
    image_processor = GlmImageImageProcessorPil(**{k: v for k, v in PREPROCESSOR_CONFIG.items()
                                                   if k not in ("image_processor_type", "processor_class")})
    processor = GlmImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return processor, tokenizer


def _publish_processor_layout(folder: Path) -> None:
    """save_pretrained nests the image processor's settings in processor_config.json; the published folder keeps
    them in a flat preprocessor_config.json, which transformers reads where processor_config.json nests none."""
    processor_config = folder / "processor_config.json"
    if set(json.loads(processor_config.read_text())) != {"image_processor", "processor_class"}:
        raise RuntimeError(f"{processor_config} holds more than the image processor: the layout would lose it")
    processor_config.unlink()
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")


def _ar_model(tokenizer):
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    config = GlmImageConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
            vision_vocab_size=VISION_VOCAB, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [4, 2, 2]},
            pad_token_id=tokenizer.pad_token_id, eos_token_id=IMAGE_END,
        ),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, image_size=64, patch_size=16,
                           intermediate_size=64, spatial_merge_size=1),
        vq_config=dict(embed_dim=16, num_embeddings=VISION_VOCAB, latent_channels=32),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        image_start_token_id=IMAGE_START, image_end_token_id=IMAGE_END,
    )
    torch.manual_seed(3)
    model = GlmImageForConditionalGeneration(config).eval()
    _scale_up(model, seed=13)
    with torch.no_grad():  # sharper attention and logits: the sampled grid then follows the prompt, not just the seed
        for name, p in model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(2.0)
        model.lm_head.weight.mul_(3.0)
    gen = model.generation_config
    gen.eos_token_id = IMAGE_END
    gen.bos_token_id = IMAGE_START
    gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample = True
    gen.top_k = None
    gen.top_p = None
    gen.temperature = 1.0
    return model


@torch.no_grad()
def _scale_up(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight at unit-variance-preserving scale and every (often zero-initialised) bias as small noise:
    the default 0.02-std or zero inits make logits nearly uniform and adaLN modulations nearly zero, so prompt and
    seed would barely matter."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            if isinstance(_owner(model, name), torch.nn.Embedding):
                fan_in = 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
