"""Z-Image from ComfyUI's split files: a diffusion model file (ComfyUI's key layout, e.g.
models/diffusion_models/z_image_turbo_bf16.safetensors), a Qwen3 text encoder saved from the causal LM
(models/text_encoders/qwen_3_4b.safetensors) and the Flux VAE (models/vae/ae.safetensors, original LDM keys or
diffusers keys), plus a folder of Qwen tokenizer files (inside ComfyUI, the one ComfyUI ships).

The files carry weights but no config. configs/ holds the published Z-Image-Turbo configs (base Z-Image's are the
same but for an unused `siglip_feat_dim: null`); every value the tensors' shapes determine (widths, depths, head
counts, vocabulary) is read from the file instead, so any layer count or width loads. Keys are mapped by
diffusers' own converters; models/weights.py makes the loading strict and lean.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    convert_z_image_transformer_checkpoint_to_diffusers,
)
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from ...parallel import Loader, StageContext
from .. import fp8, loading, offload as offloading, weights
from .stages import ZImage, add_text_encoder, setup_transformer

CONFIGS = Path(__file__).parent / "configs"
COMFYUI_PREFIX = "model.diffusion_model."  # what a full ComfyUI checkpoint puts before the DiT's keys
# Tensor names that mark a scaled or mixed-precision fp8 file (ComfyUI's scaled_fp8, quantization metadata):
# their weights are not plain values, so they are refused rather than guessed at.
SCALED_FP8 = re.compile(r"(^|\.)(scaled_fp8|scale_weight|weight_scale|scale_input|input_scale|comfy_quant)$")
BF16_FILES = {"transformer": "z_image_turbo_bf16.safetensors (or z_image_bf16.safetensors)",
              "text_encoder": "qwen_3_4b.safetensors", "vae": "ae.safetensors"}
WHAT = {"transformer": "Z-Image diffusion model", "text_encoder": "Qwen3 text encoder", "vae": "Flux VAE"}


def _config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def inspect_files(transformer: str, text_encoder: str, vae: str) -> None:
    """Check the three files from their headers alone (no weights read): each is a safetensors file of the
    right model, not truncated, not a scaled fp8 file. Raises WeightsError, one line naming the file."""
    for role, file in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        _header(role, file)
    _transformer_config(_header("transformer", transformer))
    _text_encoder_config(_header("text_encoder", text_encoder))
    _vae_config(_vae_infos(_header("vae", vae)))


def inspect_transformer(transformer: str) -> None:
    """The diffusion model file alone, checked from its header as inspect_files does."""
    _transformer_config(_header("transformer", transformer))


def scheduler_config() -> dict:
    """The published scheduler config (the files carry none), with diffusers' defaults filled in."""
    return dict(FlowMatchEulerDiscreteScheduler.from_config(_config("scheduler")).config)


def _header(role: str, file: str) -> dict[str, weights.TensorInfo]:
    path = Path(file)
    if not path.is_file():
        raise weights.WeightsError(f"{file}: no such file (the {WHAT[role]})")
    if path.suffix != ".safetensors":
        raise weights.WeightsError(f"{file}: only .safetensors files load (pickle files can run code)")
    infos = weights.header(path)
    marker = next((name for name in infos if SCALED_FP8.search(name)), None)
    if marker is not None:
        raise weights.WeightsError(f"{file} is a scaled fp8 file ({marker}), which this loader does not read; use "
                                   f"the bf16 file, {BF16_FILES[role]}")
    return infos


# -- the DiT -----------------------------------------------------------------------------------------------------

def _transformer_infos(infos: dict) -> dict:
    """ComfyUI's DiT keys, without the prefix a whole-checkpoint file puts before them."""
    return {name.removeprefix(COMFYUI_PREFIX): info for name, info in infos.items()}


def _transformer_config(infos: dict) -> dict:
    infos = _transformer_infos(infos)
    file = next(iter(infos.values())).file if infos else "the file"
    needed = ("cap_embedder.1.weight", "x_embedder.weight", "layers.0.attention.qkv.weight",
              "layers.0.attention.q_norm.weight")
    lacking = [name for name in needed if name not in infos]
    if lacking:
        raise weights.WeightsError(f"{file} is not a {WHAT['transformer']} in ComfyUI's layout (no {lacking[0]})")
    config = _config("transformer")
    dim, cap_feat_dim = infos["cap_embedder.1.weight"].shape
    head_dim = infos["layers.0.attention.q_norm.weight"].shape[0]
    n_heads = dim // head_dim
    (patch,), (f_patch,) = config["all_patch_size"], config["all_f_patch_size"]
    if head_dim != sum(config["axes_dims"]):
        raise weights.WeightsError(f"{file}: head dim {head_dim}, but Z-Image's rotary axes {config['axes_dims']} "
                                   f"need {sum(config['axes_dims'])}; not a Z-Image diffusion model")
    config.update(
        dim=dim, cap_feat_dim=cap_feat_dim, n_heads=n_heads,
        n_kv_heads=(infos["layers.0.attention.qkv.weight"].shape[0] // head_dim - n_heads) // 2,
        n_layers=_count(infos, "layers"), n_refiner_layers=_count(infos, "noise_refiner"),
        in_channels=infos["x_embedder.weight"].shape[1] // (patch * patch * f_patch),
    )
    return config


def _count(infos: dict, block: str) -> int:
    return len({name.split(".")[1] for name in infos if name.startswith(f"{block}.")})


def load_transformer(file: str, dtype: torch.dtype, device) -> ZImageTransformer2DModel:
    infos = _header("transformer", file)
    config = _transformer_config(infos)
    # diffusers' converter drops the final norm of Lumina-style files (Z-Image's DiT has none).
    unused = [name for name in infos if name.endswith("norm_final.weight")]
    tensors = weights.converted(infos, convert_z_image_transformer_checkpoint_to_diffusers, source=file,
                                unused=unused, device=device)
    return loading.load_diffusers_model(ZImageTransformer2DModel, config, [], dtype, torch.device(device),
                                        source=file, tensors=tensors)


# -- the text encoder --------------------------------------------------------------------------------------------

def _text_encoder_config(infos: dict) -> Qwen3Config:
    file = next(iter(infos.values())).file if infos else "the file"
    if "model.layers.0.self_attn.q_norm.weight" not in infos or "model.embed_tokens.weight" not in infos:
        raise weights.WeightsError(f"{file} is not a {WHAT['text_encoder']} saved from the causal LM (no "
                                   f"model.layers.0.self_attn.q_norm.weight or model.embed_tokens.weight)")
    config = _config("text_encoder")
    vocab, hidden = infos["model.embed_tokens.weight"].shape
    head_dim = infos["model.layers.0.self_attn.q_norm.weight"].shape[0]
    config.update(
        vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
        num_hidden_layers=len({n.split(".")[2] for n in infos if n.startswith("model.layers.")}),
        intermediate_size=infos["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_attention_heads=infos["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=infos["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in infos,
    )
    config["max_window_layers"] = config["num_hidden_layers"]
    return Qwen3Config(**config)


def load_text_encoder(file: str, dtype: torch.dtype, device) -> Qwen3Model:
    config = _text_encoder_config(_header("text_encoder", file))
    return loading.load_transformers_model(Qwen3Model, config, [Path(file)], dtype, torch.device(device),
                                           source=file, unused=(loading.CAUSAL_LM_HEAD,))


# -- the VAE -----------------------------------------------------------------------------------------------------

def _is_ldm(infos: dict) -> bool:
    return any(name.startswith("encoder.down.") for name in infos)


def _vae_infos(infos: dict) -> dict:
    file = next(iter(infos.values())).file if infos else "the file"
    if "encoder.conv_in.weight" not in infos or "decoder.conv_out.weight" not in infos:
        raise weights.WeightsError(f"{file} is not a {WHAT['vae']} (no encoder.conv_in.weight or "
                                   f"decoder.conv_out.weight)")
    return infos


def _vae_levels(infos: dict) -> int:
    pattern = r"encoder\.down\.(\d+)\." if _is_ldm(infos) else r"encoder\.down_blocks\.(\d+)\."
    return len({m.group(1) for name in infos if (m := re.match(pattern, name))})


def _vae_converter(infos: dict) -> Callable[[dict], dict]:
    """LDM keys through diffusers' own converter (it needs only the number of levels); diffusers keys as they are."""
    if not _is_ldm(infos):
        return dict
    levels = {"down_block_types": [None] * _vae_levels(infos), "up_block_types": [None] * _vae_levels(infos)}
    return lambda tensors: convert_ldm_vae_checkpoint(tensors, levels)


def _vae_config(infos: dict) -> dict:
    meta = {name: torch.empty(info.shape, dtype=info.dtype, device="meta") for name, info in infos.items()}
    shapes = {name: t.shape for name, t in _vae_converter(infos)(meta).items()}
    config = _config("vae")
    levels = _vae_levels(infos)
    config.update(
        block_out_channels=[shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(levels)],
        layers_per_block=len({n.split(".")[4] for n in shapes if n.startswith("encoder.down_blocks.0.resnets.")}),
        latent_channels=shapes["encoder.conv_out.weight"][0] // 2,
        in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
        down_block_types=config["down_block_types"][:1] * levels, up_block_types=config["up_block_types"][:1] * levels,
        use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention=any(n.startswith("encoder.mid_block.attentions.") for n in shapes),
    )
    return config


def load_vae(file: str, dtype: torch.dtype, device) -> AutoencoderKL:
    infos = _vae_infos(_header("vae", file))
    tensors = weights.converted_whole(infos, _vae_converter(infos), source=file, device=device)
    return loading.load_diffusers_model(AutoencoderKL, _vae_config(infos), [], dtype, torch.device(device),
                                        source=file, tensors=tensors)


# -- the loader --------------------------------------------------------------------------------------------------

def load_tokenizer(folder: str) -> Qwen2Tokenizer:
    """Qwen's tokenizer files (vocab.json, merges.txt, tokenizer_config.json): ComfyUI's
    comfy/text_encoders/qwen25_tokenizer, or a diffusers Z-Image folder's tokenizer/. Its own chat template is
    not used (stages.PROMPT_TEMPLATE is)."""
    path = Path(folder)
    if not (path / "vocab.json").is_file() and not (path / "tokenizer.json").is_file():
        raise weights.WeightsError(f"{folder} holds no Qwen tokenizer (vocab.json or tokenizer.json)")
    return Qwen2Tokenizer.from_pretrained(path, local_files_only=True)


def load(ctx: StageContext, *, transformer: str, text_encoder: str, vae: str, tokenizer: str,
         offload: str = "auto", weight_dtype: str = "default") -> ZImage:
    offloading.check_mode(offload)
    fp8.check_weight_dtype(weight_dtype)
    inspect_files(transformer, text_encoder, vae)
    dit = load_transformer(transformer, ctx.dtype, ctx.device)
    setup_transformer(ctx, dit, weight_dtype)
    model = ZImage(dit, scheduler_config())
    if ctx.is_main:
        add_text_encoder(ctx, model, offload, [weights.header(text_encoder), weights.header(vae)],
                         lambda: load_text_encoder(text_encoder, ctx.dtype, ctx.device))
        model.tokenizer = load_tokenizer(tokenizer)
        model.vae = load_vae(vae, ctx.dtype, ctx.device)
    return model


LOADER = Loader("zimage_files", load)
