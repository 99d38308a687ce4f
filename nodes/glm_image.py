"""GLM-Image nodes: loader -> AR (prior tokens) -> before denoising -> denoise -> decode, one stage each
(models/glm_image/stages.py).

Each node's output is a value ComfyUI caches: changing the steps or the guidance reruns the denoising only, never
the slow autoregressive sampling nor the before-denoising stage.
"""
from __future__ import annotations

import logging

from ..models.glm_image import latent_format
from ..models.glm_image import pipeline as glm_image
from ..models.glm_image.inputs import MAX_SIZE, SIZE_MULTIPLE, as_pil_images, check_inputs
from ..models.glm_image.model import AR_PLACEMENTS, PIPELINE, ar_placement, ar_text_config
from ..models.loading import inspect_model_folder
from . import runtime
from .common import (DecodeBase, LOADER_OUTPUT_TOOLTIP, LoaderBase, check_same_model, loader_inputs, seed_input,
                     validation)
from .model_folders import model_folder_path

log = logging.getLogger(__name__)

CATEGORY = "parallel_diffusion/GLM-Image"
MODEL = "PD_GLM_IMAGE"
PRIOR = "PD_GLM_IMAGE_PRIOR"
PREPARED = "PD_GLM_IMAGE_PREPARED"
MODEL_INPUT = (MODEL, {"tooltip": "The GLM-Image model from 'GLM-Image Loader (parallel)'."})
IMAGE_INPUTS = ("image_1", "image_2", "image_3")


class GlmImageLoader(LoaderBase):
    RUNTIME_LOADER = glm_image.LOADER
    PIPELINE = PIPELINE
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = (LOADER_OUTPUT_TOOLTIP,)
    DESCRIPTION = ("Loads a GLM-Image model folder (diffusers layout) on a group of worker processes, one per GPU, "
                   "that stay alive between prompts. With several CUDA GPUs each holds a slice of the "
                   "autoregressive model (tensor parallel; with a GPU count it does not split over, e.g. 3 or 6, "
                   "the largest group that it does, e.g. 2 or 4), else the first GPU holds it (see 'ar'); the "
                   "server log and the node's output say which. Its decode step is compiled here (about half a "
                   "minute, once per group). The group "
                   "is shared by every loader with the same GPUs, cfg_parallel and device settings; ComfyUI's "
                   "'Unload models' / 'Free memory' stops it.")

    @classmethod
    def INPUT_TYPES(cls):
        inputs = loader_inputs(PIPELINE, "GLM-Image")
        # optional, and first of them: the frontend restores widgets by position, and workflows saved with 'ar'
        # predate offload and weight_dtype
        inputs["optional"] = {"ar": (list(AR_PLACEMENTS), {
            "default": "auto",
            "tooltip": "Where the autoregressive model runs. auto: tensor parallel on several CUDA GPUs (each "
                       "holds a slice and reads it per token: faster), over the largest GPU count its 32 heads "
                       "and FFN split over evenly (1, 2, 4, 8, ...; the other GPUs wait); the first GPU on the "
                       "CPU. rank0: the first GPU alone holds all of it (about 20 GB more there, less on the "
                       "others). tensor_parallel: as auto, on the CPU too."}),
            **inputs["optional"]}
        return inputs

    def load(self, model: str, gpus: int, cfg_parallel: bool, device: str, ar: str = "auto", offload: str = "auto",
             weight_dtype: str = "default"):
        with runtime.user_errors():
            path = model_folder_path(model)
        source = {"path": path, "ar": ar, "offload": offload, "weight_dtype": weight_dtype}
        handle = runtime.load_model(self.RUNTIME_LOADER, source, gpus, cfg_parallel, device,
                                    lambda: inspect_model_folder(path, self.PIPELINE))
        placement = ar_placement(ar, handle.device, handle.layout.world_size, ar_text_config(path))[1]
        log.info("parallel_diffusion: %s", placement)
        return {"ui": {"text": [placement]}, "result": (handle,)}


class GlmImageAR:
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = (PRIOR,)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The sampled prior image tokens with the prompt, size, seed and condition images they were "
                       "sampled for, for 'GLM-Image Denoise (parallel)'.",)
    DESCRIPTION = ("GLM-Image's autoregressive stage: the vision-language model reads the prompt (and the "
                   "condition images, for editing) and samples the image's prior tokens, on all GPUs together "
                   "(tensor parallel, the first GPU deciding every token) or on the first GPU alone; every GPU "
                   "gets the tokens. The slowest step: ComfyUI caches its result, so changing the steps or "
                   "the guidance does not run it again.")

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": SIZE_MULTIPLE, "max": MAX_SIZE, "step": SIZE_MULTIPLE}
        image_tip = ("A condition image to edit or take from (editing); a batch counts as several images. The "
                     "prompt says what to do with it. Both sides must be multiples of 32, within the AR "
                     "processor's pixel limit (scale it first otherwise).")
        return {
            "required": {
                "model": MODEL_INPUT,
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                      "tooltip": "What the image shows (or, for editing, what to change). Text in "
                                                 "quotes is rendered as glyphs. Empty: an image of nothing in "
                                                 "particular, as diffusers makes it."}),
                "width": ("INT", {**size, "tooltip": f"Image width in pixels, a multiple of {SIZE_MULTIPLE}."}),
                "height": ("INT", {**size, "tooltip": f"Image height in pixels, a multiple of {SIZE_MULTIPLE}."}),
                "seed": seed_input("The seed of the token sampling and of the denoising noise; the same seed gives "
                                   "the same image on any number of GPUs."),
            },
            "optional": {name: ("IMAGE", {"tooltip": image_tip}) for name in IMAGE_INPUTS},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompt=None, width=None, height=None):
        # the size's multiple of 32 and reserved markers in the prompt: refused at queue time
        return validation(check_inputs, prompts=None if prompt is None else [prompt], height=height, width=width)

    def sample(self, model: runtime.ModelHandle, prompt: str, width: int, height: int, seed: int, unique_id=None,
               **images):
        condition = [images[name] for name in IMAGE_INPUTS if images.get(name) is not None] or None
        with runtime.user_errors():  # checked here, before anything is sent to the group
            check_inputs(prompts=[prompt], height=height, width=width, seed=seed)
            as_pil_images(condition)
        request = {"prompts": [prompt], "height": height, "width": width, "seed": seed, "images": condition}
        prior = glm_image.sample_prior(runtime.stage_runner(model, unique_id), **request)
        return ({"model": model.key, "request": request, **prior},)


class GlmImagePrepare:
    CATEGORY = CATEGORY
    FUNCTION = "prepare"
    RETURN_TYPES = (PREPARED,)
    RETURN_NAMES = ("prepared",)
    OUTPUT_TOOLTIPS = ("Glyph embeddings, seeded noise, size conditioning and condition-image latents, with the prior "
                       "tokens, for 'GLM-Image Denoise (parallel)'.",)
    DESCRIPTION = ("Before denoising, on the first GPU of the group: the prompt's quoted glyph texts through the "
                   "glyph encoder, the seeded noise (the AR node's seed), the size conditioning and, for editing, "
                   "the condition images' latents.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "prior": (PRIOR, {"tooltip": "From 'GLM-Image AR (parallel)'."}),
        }}

    def prepare(self, model: runtime.ModelHandle, prior: dict):
        check_same_model(model, prior, "prior")
        prepared = glm_image.prepare(runtime.stage_runner(model), **prior["request"])
        tokens = {name: prior[name] for name in glm_image.PRIOR}
        return ({"model": model.key, "request": prior["request"], "prior": tokens, "inputs": prepared},)


class GlmImageDenoise:
    CATEGORY = CATEGORY
    FUNCTION = "denoise"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latents (16 channels, 1/8 of the image size) in the VAE's own space, as "
                       "ComfyUI keeps latents, for 'GLM-Image Decode (parallel)'.",)
    DESCRIPTION = ("The DiT denoising loop, with the image's token sequence split across the GPUs (and the guidance "
                   "branches across GPU halves with cfg_parallel). The result equals one GPU's.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "prepared": (PREPARED, {"tooltip": "From 'GLM-Image Before Denoising (parallel)'."}),
                "steps": ("INT", {"default": glm_image.DEFAULT_STEPS, "min": 1, "max": 1000,
                                  "tooltip": "Denoising steps (GLM-Image: 50)."}),
                "guidance": ("FLOAT", {"default": glm_image.DEFAULT_GUIDANCE, "min": 0.0, "max": 30.0, "step": 0.1,
                                       "round": 0.01,
                                       "tooltip": "Classifier-free guidance scale (GLM-Image: 1.5); 1 or less "
                                                  "turns it off (one DiT call per step instead of two)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def denoise(self, model: runtime.ModelHandle, prepared: dict, steps: int, guidance: float, unique_id=None):
        check_same_model(model, prepared, "preparation")
        with runtime.user_errors():  # checked here: a refusal inside the workers would cost a restart
            request = prepared["request"]
            glm_image.check_request(model.layout, prompt=request["prompts"], height=request["height"],
                                    width=request["width"], seed=request["seed"], images=request["images"],
                                    steps=steps, guidance=guidance)
        run = runtime.stage_runner(model, unique_id)
        latents = glm_image.denoise(run, prepared["inputs"], prepared["prior"], steps=steps, guidance=guidance,
                                    latent_space=latent_format.VAE)
        return ({"samples": latents},)


class GlmImageDecode(DecodeBase):
    CATEGORY = CATEGORY
    MODEL_INPUT = MODEL_INPUT
    LATENT_SOURCE = "GLM-Image Denoise (parallel)"
    DESCRIPTION = "Decodes GLM-Image latents with the model's VAE, on the first GPU of the group."

    def decode(self, model: runtime.ModelHandle, latent: dict):
        # LATENT["samples"] is in the VAE's space (ComfyUI's convention), as the denoise node puts it out
        return (glm_image.decode(runtime.stage_runner(model), latent["samples"], latent_format.VAE),)


NODE_CLASS_MAPPINGS = {
    "PDGlmImageLoader": GlmImageLoader,
    "PDGlmImageAR": GlmImageAR,
    "PDGlmImagePrepare": GlmImagePrepare,
    "PDGlmImageDenoise": GlmImageDenoise,
    "PDGlmImageDecode": GlmImageDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PDGlmImageLoader": "GLM-Image Loader (parallel)",
    "PDGlmImageAR": "GLM-Image AR (parallel)",
    "PDGlmImagePrepare": "GLM-Image Before Denoising (parallel)",
    "PDGlmImageDenoise": "GLM-Image Denoise (parallel)",
    "PDGlmImageDecode": "GLM-Image Decode (parallel)",
}
