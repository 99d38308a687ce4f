"""Z-Image LoRAs as ComfyUI reads them, for the workers: ComfyUI's own LoRA loading (its key formats: ComfyUI's,
kohya's, diffusers', ai-toolkit's) produces patches of its NextDiT's weights; these become
models/zimage/comfyui_model.LoRAPatch, which the workers apply beside their layers.

Two sources: the patches LoRA loaders put on a ComfyUI MODEL (Z-Image Parallel MODEL reads them at each call), and a
LoRA file for our own Z-Image nodes (Z-Image LoRA (parallel)), mapped with the key map ComfyUI builds for a Z-Image
model (a NextDiT of the file's shapes on the meta device: no weights).
"""
from __future__ import annotations

import functools

import comfy.lora
import comfy.model_detection
import comfy.utils
import folder_paths
import torch
from comfy.weight_adapter.lora import LoRAAdapter

from ..models import weights
from ..models.zimage import comfyui_files
from ..models.zimage.comfyui_model import LoRAPatch
from . import model_files, runtime

DIT_PREFIX = "diffusion_model."


def model_patches(patches: dict[str, list[tuple]], shapes: dict[str, tuple]) -> list[LoRAPatch]:
    """A ModelPatcher's patches of its DiT's weights (key -> [(strength, adapter, strength_model, offset,
    function)], as add_patches keeps them), each a plain LoRA; anything else is refused with a message."""
    out = []
    for key, entries in patches.items():
        name = key.removeprefix(DIT_PREFIX)
        for strength, adapter, strength_model, offset, function in entries:
            kind = getattr(adapter, "name", None) or (adapter[0] if isinstance(adapter, tuple) else type(adapter))
            if not isinstance(adapter, LoRAAdapter) or name == key or function is not None or strength_model != 1:
                raise ValueError(f"the MODEL carries a patch of {key} ({kind}) that is not a plain LoRA; the "
                                 f"parallel nodes apply LoRAs only (LoraLoaderModelOnly, LoraLoader)")
            up, down, alpha, mid, dora_scale, reshape = adapter.weights
            if mid is not None or dora_scale is not None or reshape is not None:
                raise ValueError(f"the LoRA patch of {key} is a LoCon / DoRA one, which the parallel nodes do not "
                                 f"apply; use a plain LoRA")
            if offset is not None and offset[0] != 0:
                raise ValueError(f"a LoRA patch of {key} slices it along dim {offset[0]}; only rows are supported")
            scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
            out.append(LoRAPatch(name, shapes[name][0], tuple(offset[1:]) if offset else None,
                                 up.flatten(1), down.flatten(1), scale))
    return out


@functools.lru_cache(maxsize=4)
def _key_map(dit_file: str) -> tuple[dict, dict[str, tuple]]:
    """ComfyUI's LoRA key map for the Z-Image DiT in this file, and its weights' shapes."""
    infos = weights.header(dit_file)
    meta = {name.removeprefix(comfyui_files.COMFYUI_PREFIX): torch.empty(info.shape, dtype=info.dtype, device="meta")
            for name, info in infos.items()}
    config = comfy.model_detection.model_config_from_unet(meta, "")
    if config is None or type(config).__name__ != "ZImage":
        raise ValueError(f"{dit_file} is not a Z-Image diffusion model ComfyUI recognises; no LoRA key map for it")
    with torch.device("meta"):
        model = config.get_model(meta, "")
    shapes = {name: tuple(t.shape) for name, t in model.diffusion_model.state_dict().items()}
    return comfy.lora.model_lora_keys_unet(model, {}), shapes


@functools.lru_cache(maxsize=4)
def _lora_file(path: str) -> dict[str, torch.Tensor]:
    return comfy.utils.load_torch_file(path, safe_load=True)


def file_patches(lora_path: str, strength: float, dit_file: str) -> list[LoRAPatch]:
    """A LoRA file at a strength as ComfyUI's LoraLoaderModelOnly would patch the DiT in `dit_file`."""
    key_map, shapes = _key_map(dit_file)
    loaded = comfy.lora.load_lora(_lora_file(lora_path), key_map)
    if not loaded:
        raise ValueError(f"{lora_path} holds no LoRA of a Z-Image DiT's weights (none of its keys map to one)")
    patches: dict[str, list[tuple]] = {}
    for k, adapter in loaded.items():
        key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
        patches.setdefault(key, []).append((strength, adapter, 1.0, offset, function))
    return model_patches(patches, shapes)


def handle_patches(handle: runtime.ModelHandle) -> list[LoRAPatch]:
    """The LoRAs a Z-Image LoRA node chain put on one of our model handles."""
    source = dict(handle.source)
    return [patch for name, strength in handle.loras
            for patch in file_patches(model_files.file_path("loras", name), strength, source["transformer"])]


class ZImageLoRA:
    CATEGORY = "parallel_diffusion/Z-Image"
    FUNCTION = "apply"
    RETURN_TYPES = ("PD_ZIMAGE",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA, for the Z-Image nodes (parallel); chain several.",)
    DESCRIPTION = ("Applies a Z-Image LoRA (ComfyUI's, kohya's, diffusers' or ai-toolkit's key format, as "
                   "LoraLoaderModelOnly reads it) to a model of 'Z-Image Loader, ComfyUI files (parallel)'. The "
                   "workers apply it beside their layers for each denoising run: a new strength reloads nothing.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("PD_ZIMAGE", {"tooltip": "From 'Z-Image Loader, ComfyUI files (parallel)' or another LoRA "
                                               "node."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A LoRA under models/loras."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly the LoRA changes the DiT; 0 leaves it out."}),
        }}

    def apply(self, model: runtime.ModelHandle, lora_name: str, strength_model: float):
        with runtime.user_errors():
            if "transformer" not in dict(model.source) or model.loader != comfyui_files.LOADER.name:
                raise ValueError("Z-Image LoRA (parallel) takes a model of 'Z-Image Loader, ComfyUI files "
                                 "(parallel)'; for a diffusers folder, load its files with that loader, or use "
                                 "ComfyUI's LoRA loaders with 'Z-Image Parallel MODEL'")
            file_patches(model_files.file_path("loras", lora_name), strength_model, dict(model.source)["transformer"])
        return (runtime.with_lora(model, lora_name, strength_model),)


NODE_CLASS_MAPPINGS = {"PDZImageLoRA": ZImageLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PDZImageLoRA": "Z-Image LoRA (parallel)"}
