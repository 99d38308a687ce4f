"""Random-weight Z-Image files that ComfyUI 0.8.0's own loaders accept as Z-Image, for tests/test_comfyui_files.py.

ComfyUI recognises a DiT as Z-Image only at width 3840 and always builds 2 noise and 2 context refiner layers, and
it hard-codes the Flux VAE's geometry, so these keep those sizes and shrink only what ComfyUI reads from the file
(the number of main layers; the text encoder, which ComfyUI is never asked to load here). The models are built from
diffusers' / transformers' own classes on the meta device (names and shapes only), filled tensor by tensor in the
file's dtype (no float32 copy of the whole model), and written through tests/comfyui_layout.py's writers: the
inverses of the converters diffusers (and our loader) read ComfyUI's files with.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

import comfyui_layout

# The same published configs ship with the loader; read them from there so the tests need no shared folder.
CONFIGS = Path(__file__).resolve().parents[1] / "models" / "zimage" / "configs"
COMFYUI_MIN_LAYERS = 1  # our loader needs layers.0; ComfyUI counts whatever is there
TEXT_VOCAB = 151936  # Qwen3's: ComfyUI's Qwen tokenizer gives ids up to here
TEXT_HIDDEN = 2560  # Qwen3-4B's width = the DiT's cap_feat_dim, which ComfyUI reads from the DiT file


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if not k.startswith("_")}


def _fill(shapes: dict[str, torch.Size], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random values for each named shape, drawn straight in `dtype` (no float32 copy of the model).

    Matrices: uniform within +-1/sqrt(fan_in), PyTorch's default Linear/Conv init, so activations keep their size
    through the layers; 1-D weights (norm scales) 1 +- 0.03; biases +-0.03. Nothing is zero: a zero pad token or
    bias would hide a bug that moves or drops it."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        value = torch.empty(shape, dtype=dtype)
        if len(shape) >= 2:
            bound = 1 / math.sqrt(math.prod(shape[1:]))
            value.uniform_(-bound, bound, generator=gen)
        elif name.endswith("bias"):
            value.uniform_(-0.03, 0.03, generator=gen)
        else:
            value.uniform_(0.97, 1.03, generator=gen)
        out[name] = value
    return out


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in model.state_dict().items()}


def zimage_dit_state_dict(*, n_layers: int = COMFYUI_MIN_LAYERS, dtype: torch.dtype = torch.bfloat16,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Diffusers' ZImageTransformer2DModel state dict at the published Z-Image-Turbo settings (dim 3840, 2+2
    refiners, cap_feat_dim 2560) with `n_layers` main layers: about 0.91 B parameters at 1 layer."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**{**_config("transformer"), "n_layers": n_layers})
    return _fill(_shapes(model), dtype, seed)


def flux_vae_state_dict(*, dtype: torch.dtype = torch.float32, seed: int = 1) -> dict[str, torch.Tensor]:
    """Diffusers' AutoencoderKL state dict with the published (Flux) VAE config, the geometry ComfyUI hard-codes."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**_config("vae"))
    return _fill(_shapes(model), dtype, seed)


def text_encoder_state_dict(*, dtype: torch.dtype = torch.bfloat16, seed: int = 2) -> dict[str, torch.Tensor]:
    """A bare Qwen3Model state dict as small as our loader takes with this DiT: Qwen3's vocabulary (ComfyUI's
    tokenizer drives it) and width 2560 (the DiT's caption width); otherwise models/zimage/tiny.py's text encoder
    (2 layers, 3 heads of 16, 1 KV head, FFN 96). About 0.39 B parameters, nearly all the embedding."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=TEXT_VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         rope_theta=1_000_000.0, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen3Model(config)
    return _fill(_shapes(model), dtype, seed)


FILE_NAMES = {  # distinct from the tiny model's files test_comfyui_e2e.py writes into the same folders
    "diffusion_models": "pd_test_z_image_1layer_bf16.safetensors",
    "text_encoders": "pd_test_qwen3_2560_bf16.safetensors",
    "vae": "pd_test_flux_ae.safetensors",
}


def write_zimage_files(folder: Path | str) -> dict[str, Path]:
    """The three files (DiT bf16 ~1.8 GB, text encoder bf16 ~0.8 GB, VAE float32 ~0.34 GB) in ComfyUI's layouts,
    under folder/<ComfyUI folder kind>/FILE_NAMES[kind]. Returns {kind: path}. One state dict in memory at a time."""
    folder = Path(folder)
    paths = {}
    for kind, build, write in (("diffusion_models", zimage_dit_state_dict,
                                comfyui_layout.comfyui_transformer_state_dict),
                               ("text_encoders", text_encoder_state_dict, comfyui_layout.causal_lm_state_dict),
                               ("vae", flux_vae_state_dict, comfyui_layout.ldm_vae_state_dict)):
        path = folder / kind / FILE_NAMES[kind]
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = write(build())
        save_file(sd, path)
        del sd
        paths[kind] = path
    return paths


LORA_NAME = "pd_test_z_image_lora.safetensors"
LORA_RANK = 4


def zimage_lora_state_dict(*, seed: int = 4) -> dict[str, torch.Tensor]:
    """A Z-Image LoRA for the DiT of zimage_dit_state_dict in two of the key formats ComfyUI's LoRA loader reads:
    diffusers / PEFT names (`diffusion_model.<diffusers key>.lora_A/B.weight`, no alpha; to_q / to_k / to_v land in
    slices of ComfyUI's fused qkv) and kohya's (`lora_unet_<ComfyUI key>.lora_up/down.weight` with an alpha) on a
    fused qkv weight itself."""
    gen = torch.Generator().manual_seed(seed)
    dim, ffn = 3840, 10240
    sd = {}

    def factors(prefix, up_name, down_name, rows, cols):
        sd[f"{prefix}.{up_name}"] = torch.randn(rows, LORA_RANK, generator=gen) * 0.05
        sd[f"{prefix}.{down_name}"] = torch.randn(LORA_RANK, cols, generator=gen) * 0.05

    for part in ("to_q", "to_k", "to_v", "to_out.0"):
        factors(f"diffusion_model.layers.0.attention.{part}", "lora_B.weight", "lora_A.weight", dim, dim)
    factors("diffusion_model.layers.0.feed_forward.w1", "lora_B.weight", "lora_A.weight", ffn, dim)
    factors("lora_unet_noise_refiner_0_attention_qkv", "lora_up.weight", "lora_down.weight", 3 * dim, dim)
    sd["lora_unet_noise_refiner_0_attention_qkv.alpha"] = torch.tensor(2.0)
    return sd
