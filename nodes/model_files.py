"""The single model files a loader offers, found as ComfyUI's own loaders find them: through folder_paths, by
folder kind ("diffusion_models", "text_encoders", "vae"; models/<kind> and extra_model_paths.yaml), plus the Qwen
tokenizer files ComfyUI ships for its own Z-Image text encoder."""
from __future__ import annotations

import os

import comfy.text_encoders.z_image
import folder_paths

from ..models.loading import ModelFolderError

SAFETENSORS = ".safetensors"
# Where ComfyUI keeps the tokenizer its Z-Image text encoder uses (comfy/text_encoders/z_image.py reads it from
# there too); tests/test_comfyui_files.py checks that it still does.
TOKENIZER = os.path.join(os.path.dirname(os.path.realpath(comfy.text_encoders.z_image.__file__)), "qwen25_tokenizer")


def list_files(kind: str) -> list[str]:
    """The .safetensors files of a folder kind, by the names ComfyUI lists them under (pickle files never load)."""
    return [name for name in folder_paths.get_filename_list(kind) if name.endswith(SAFETENSORS)]


def file_path(kind: str, name: str) -> str:
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        roots = ", ".join(folder_paths.get_folder_paths(kind))
        raise ModelFolderError(f"no file {name!r} under ComfyUI's {kind} folders ({roots})")
    return path


def comfyui_tokenizer() -> str:
    if not os.path.isfile(os.path.join(TOKENIZER, "vocab.json")):
        raise ModelFolderError(f"ComfyUI's Qwen tokenizer is not at {TOKENIZER} (has this ComfyUI moved it?)")
    return TOKENIZER
