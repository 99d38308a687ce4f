"""What the Z-Image and GLM-Image nodes share: the loader's inputs and function, and small input specs."""
from __future__ import annotations

import torch

from ..models import fp8, offload
from ..models.loading import inspect_model_folder
from . import runtime
from .model_folders import list_model_folders, model_folder_path

LOADER_OUTPUT_TOOLTIP = ("The model, loaded on its worker group (one process per GPU, kept alive between prompts). "
                         "Connect it to every node of this model.")


def loader_inputs(pipeline: str, family: str) -> dict:
    return {
        "required": {
            "model": (list_model_folders(pipeline), {
                "tooltip": f"A {family} model folder in diffusers layout (holding model_index.json) under "
                           f"ComfyUI's models/diffusers, or a diffusers path of extra_model_paths.yaml. Only "
                           f"folders whose model_index.json names {pipeline} are listed."}),
            **layout_inputs(),
        },
        "optional": memory_inputs(),
    }


def layout_inputs() -> dict:
    """How a loader's model is spread over the worker group: every loader node has these."""
    return {
        "gpus": ("INT", {
            "default": max(1, torch.cuda.device_count()), "min": 1, "max": runtime.MAX_GPUS,
            "tooltip": "How many GPUs (ranks) generate each image together; one image is split across them "
                       "and the result equals one GPU's. 1 runs inside ComfyUI's own process. With device "
                       "'cpu' these are CPU processes (for testing)."}),
        "cfg_parallel": ("BOOLEAN", {
            "default": False,
            "tooltip": "Run the conditional and unconditional guidance branches on two halves of the GPUs "
                       "(needs an even GPU count and a guidance that enables CFG). Off: every GPU splits the "
                       "image sequence (Ulysses)."}),
        "device": (runtime.DEVICES, {
            "default": "auto",
            "tooltip": "auto: CUDA GPUs unless ComfyUI itself runs on the CPU. cuda: one GPU per rank, "
                       "GPUs 0..N-1 (bfloat16). cpu: CPU processes (float32), for testing."}),
    }


def memory_inputs() -> dict:
    """How a loader's weights use GPU memory; optional, so workflows saved before these existed load as before."""
    return {
        "offload": (list(offload.MODES), {
            "default": "auto",
            "tooltip": "Whether weights that only some steps use (the text encoder or AR model, the diffusion "
                       "model) take turns on the GPU, waiting in the computer's memory between them; same "
                       "images, some seconds per prompt for the copies. auto: only where the GPUs' free memory "
                       "does not hold all of them (the server log says which). resident: all stay on the GPUs."}),
        "weight_dtype": (list(fp8.WEIGHT_DTYPES), {
            "default": "default",
            "tooltip": "fp8_e4m3fn: the diffusion model's (and GLM-Image's AR model's) weights stored in 8 bits, "
                       "computed in bf16, as ComfyUI's weight_dtype of that name: about half their GPU memory, "
                       "images close to but not equal to default's. default: as the files hold them, in bf16."}),
    }


class LoaderBase:
    """A loader node: checks the folder, starts (or reuses) the worker group and loads the model on it."""
    RUNTIME_LOADER = ""  # "zimage" / "glm_image"
    PIPELINE = ""  # the diffusers class model_index.json must name
    FUNCTION = "load"

    def load(self, model: str, gpus: int, cfg_parallel: bool, device: str, offload: str = "auto",
             weight_dtype: str = "default"):
        with runtime.user_errors():
            path = model_folder_path(model)
        return (runtime.load_model(self.RUNTIME_LOADER, {"path": path, "offload": offload,
                                                         "weight_dtype": weight_dtype}, gpus, cfg_parallel, device,
                                   lambda: inspect_model_folder(path, self.PIPELINE)),)


class DecodeBase:
    """A decode node: latents -> IMAGE through the model's decode step, on the group's first GPU; each model's
    node defines decode(model, latent)."""
    MODEL_INPUT: tuple = ()
    LATENT_SOURCE = ""  # the node whose latents it takes, for the tooltip
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": cls.MODEL_INPUT,
            "latent": ("LATENT", {"tooltip": f"Latents from '{cls.LATENT_SOURCE}'."}),
        }}


def validation(check, **values) -> bool | str:
    """What a node's VALIDATE_INPUTS returns for a model's check_inputs: True, or its refusal, which ComfyUI shows
    when the prompt is queued (and never runs it). ComfyUI then skips its own min/max for the inputs
    VALIDATE_INPUTS names, so the check covers their whole range; a linked input's value is None (unknown)."""
    try:
        check(**values)
    except ValueError as exc:
        return str(exc)
    return True


def seed_input(tooltip: str) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": runtime.MAX_SEED, "control_after_generate": True,
                    "tooltip": tooltip})


def check_same_model(handle: runtime.ModelHandle, value: dict, what: str) -> None:
    if value.get("model") != handle.key:
        raise runtime.ParallelDiffusionError(
            f"this {what} was made by another model ({value.get('model')}); connect the same loader to both nodes")
