"""The model families, by diffusers pipeline class. Each family module offers the same small surface: LOADER,
DEFAULT_STEPS, DEFAULT_GUIDANCE, build_tiny(folder), check_inputs(prompts=, height=, width=, steps=, guidance=,
seed=) and generate(runner, model_key, ...)."""
from __future__ import annotations

from types import ModuleType

from . import loading
from .glm_image import pipeline as glm_image
from .zimage import pipeline as zimage

ALL: list[ModuleType] = [zimage, glm_image]
BY_PIPELINE = {"ZImagePipeline": zimage, "GlmImagePipeline": glm_image}


def for_folder(path: str) -> ModuleType:
    name = loading.detect_pipeline(path)
    if name not in BY_PIPELINE:
        raise loading.ModelFolderError(
            f"{path} holds a {name}; supported: {', '.join(sorted(BY_PIPELINE))}")
    return BY_PIPELINE[name]
