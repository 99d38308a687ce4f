"""Z-Image nodes: loader -> text encode -> denoise -> decode, one stage each (models/zimage/stages.py)."""
from __future__ import annotations

from ..models.zimage import comfyui_files
from ..models.zimage import pipeline as zimage
from ..models.zimage import latent_format
from ..models.zimage.stages import (MAX_SIZE, PIPELINE, SIZE_MULTIPLE, check_inputs, check_latent_shape,
                                    latent_image_size)
from ..models.zimage.comfyui_model import lora_factors
from . import lora, model_files, runtime
from .common import (DecodeBase, LOADER_OUTPUT_TOOLTIP, LoaderBase, check_same_model, layout_inputs, loader_inputs,
                     memory_inputs, seed_input, validation)

CATEGORY = "parallel_diffusion/Z-Image"
MODEL = "PD_ZIMAGE"
CONDITIONING = "PD_ZIMAGE_CONDITIONING"
MODEL_INPUT = (MODEL, {"tooltip": "The Z-Image model from a Z-Image loader (parallel)."})
NOT_CONNECTED = object()  # VALIDATE_INPUTS' default for an optional input left unconnected (a linked one is None)


class ZImageLoader(LoaderBase):
    RUNTIME_LOADER = zimage.LOADER
    PIPELINE = PIPELINE
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = (LOADER_OUTPUT_TOOLTIP,)
    DESCRIPTION = ("Loads a Z-Image model folder (diffusers layout) on a group of worker processes, one per GPU, "
                   "that stay alive between prompts. The group is shared by every loader with the same GPUs, "
                   "cfg_parallel and device settings; ComfyUI's 'Unload models' / 'Free memory' stops it.")

    @classmethod
    def INPUT_TYPES(cls):
        return loader_inputs(PIPELINE, "Z-Image")


class ZImageFilesLoader:
    """Z-Image from ComfyUI's split files, as ComfyUI's own Load Diffusion Model / Load CLIP / Load VAE find them."""
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = (LOADER_OUTPUT_TOOLTIP,)
    DESCRIPTION = ("Loads Z-Image (Turbo or base: the same files and architecture; base wants guidance, about 4) "
                   "from ComfyUI's split files on a group of worker processes, one per GPU, that stay alive "
                   "between prompts. Tokenizes with the Qwen tokenizer ComfyUI ships. bf16 and plain fp8 files "
                   "load (fp8 is upcast to the GPUs' bf16); scaled fp8 files are refused.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "transformer": (model_files.list_files("diffusion_models"), {
                "tooltip": "The Z-Image diffusion model under models/diffusion_models, e.g. "
                           "z_image_turbo_bf16.safetensors or z_image_bf16.safetensors."}),
            "text_encoder": (model_files.list_files("text_encoders"), {
                "tooltip": "Z-Image's Qwen3-4B text encoder under models/text_encoders, qwen_3_4b.safetensors."}),
            "vae": (model_files.list_files("vae"), {
                "tooltip": "The FLUX.1 VAE under models/vae, ae.safetensors."}),
            **layout_inputs(),
        }, "optional": memory_inputs()}

    def load(self, transformer: str, text_encoder: str, vae: str, gpus: int, cfg_parallel: bool, device: str,
             offload: str = "auto", weight_dtype: str = "default"):
        with runtime.user_errors():
            files = {"transformer": model_files.file_path("diffusion_models", transformer),
                     "text_encoder": model_files.file_path("text_encoders", text_encoder),
                     "vae": model_files.file_path("vae", vae), "tokenizer": model_files.comfyui_tokenizer()}
        files.update(offload=offload, weight_dtype=weight_dtype)
        inspect = lambda: comfyui_files.inspect_files(files["transformer"], files["text_encoder"], files["vae"])
        return (runtime.load_model(comfyui_files.LOADER.name, files, gpus, cfg_parallel, device, inspect),)


class ZImageTextEncode:
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt's and the negative prompt's Qwen3 features, for 'Z-Image Denoise (parallel)'.",)
    DESCRIPTION = ("Encodes the prompt (and the negative prompt, used only when guidance > 0) with Z-Image's Qwen3 "
                   "text encoder, on the first GPU of the group.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "What the image shows."}),
            "negative_prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                           "tooltip": "What to steer away from; only used when guidance > 0 "
                                                      "(Z-Image-Turbo runs with guidance 0)."}),
        }}

    def encode(self, model: runtime.ModelHandle, prompt: str, negative_prompt: str):
        out = zimage.encode_prompt(runtime.stage_runner(model), [prompt], [negative_prompt])
        return ({"model": model.key, **out},)


class ZImageDenoise:
    CATEGORY = CATEGORY
    FUNCTION = "denoise"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latents (16 channels, 1/8 of the image size) in ComfyUI's latent space, as "
                       "KSampler's: for 'Z-Image Decode (parallel)', or VAE Decode with Z-Image's VAE.",)
    DESCRIPTION = ("Generates the image latents: seeded noise, then the flow-matching denoising loop with the "
                   "image's token sequence split across the GPUs. The result equals one GPU's. With a latent "
                   "input and denoise below 1 it is image-to-image (diffusers' ZImageImg2ImgPipeline).")

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": SIZE_MULTIPLE, "max": MAX_SIZE, "step": SIZE_MULTIPLE}
        return {
            "required": {
                "model": MODEL_INPUT,
                "conditioning": (CONDITIONING, {"tooltip": "From 'Z-Image Text Encode (parallel)'."}),
                "seed": seed_input("The noise seed; the same seed gives the same image on any number of GPUs."),
                "steps": ("INT", {"default": zimage.DEFAULT_STEPS, "min": 1, "max": 1000,
                                  "tooltip": "Denoising steps (Z-Image-Turbo: 8)."}),
                "guidance": ("FLOAT", {"default": zimage.DEFAULT_GUIDANCE, "min": 0.0, "max": 30.0, "step": 0.1,
                                       "round": 0.01,
                                       "tooltip": "Classifier-free guidance scale; 0 turns it off (Z-Image-Turbo). "
                                                  "Above 0 each step also runs the negative prompt."}),
                "width": ("INT", {**size, "tooltip": f"Image width in pixels, a multiple of {SIZE_MULTIPLE}. "
                                                     f"Ignored when a latent is connected (its size is used)."}),
                "height": ("INT", {**size, "tooltip": f"Image height in pixels, a multiple of {SIZE_MULTIPLE}. "
                                                      f"Ignored when a latent is connected (its size is used)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Images generated together from one seed. Ignored when a latent "
                                                  "is connected (its batch is used)."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "A latent to start from (VAE Encode with Z-Image's VAE, Latent "
                                                 "Upscale, EmptySD3LatentImage), its image size a multiple of "
                                                 f"{SIZE_MULTIPLE}; it sets the size and batch."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "How much of the latent is replaced: 1 starts from noise (the latent "
                                                 "gives only the size), lower keeps more of it. As diffusers' "
                                                 "img2img strength: runs the last steps x denoise of the steps "
                                                 "(rounded up), not KSampler's full steps."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, denoise=None, latent=NOT_CONNECTED):
        # the size's multiple of 16 (unless a latent gives the size) and a denoise of 0: refused at queue time
        connected = latent is not NOT_CONNECTED
        return validation(check_inputs, height=None if connected else height, width=None if connected else width,
                          strength=denoise, has_init_latents=connected)

    def denoise(self, model: runtime.ModelHandle, conditioning: dict, seed: int, steps: int, guidance: float,
                width: int, height: int, batch_size: int, latent: dict | None = None, denoise: float = 1.0,
                unique_id=None):
        check_same_model(model, conditioning, "conditioning")
        init_latents = None
        with runtime.user_errors():  # checked here: a refusal inside the workers would cost a restart
            check_inputs(steps=steps, guidance=guidance, seed=seed, strength=denoise,
                         has_init_latents=latent is not None)
            if latent is not None:
                if "noise_mask" in latent:
                    raise ValueError("this latent has a noise mask (Set Latent Noise Mask), and Z-Image Denoise "
                                     "(parallel) does not inpaint; connect a latent without one")
                init_latents = latent_format.init_latents_from_comfy(latent["samples"])
                batch_size, height, width = latent_image_size(init_latents)
            check_inputs(height=height, width=width)
            model.layout.check_branches(2 if guidance > 0 else 1)
            factors = lora_factors(lora.handle_patches(model)) if model.loras else None
        run = runtime.stage_runner(model, unique_id)
        latents = zimage.prepare_latents(run, batch=batch_size, height=height, width=width, seed=seed, steps=steps,
                                         init_latents=init_latents, strength=denoise)
        embeds = {name: conditioning[name] * batch_size for name in ("prompt_embeds", "negative_prompt_embeds")}
        latents = zimage.denoise(run, latents, embeds, steps=steps, guidance=guidance, strength=denoise, lora=factors)
        return ({"samples": latent_format.to_comfy(latents)},)


class ZImageDecode(DecodeBase):
    CATEGORY = CATEGORY
    MODEL_INPUT = MODEL_INPUT
    LATENT_SOURCE = "Z-Image Denoise (parallel)"
    DESCRIPTION = ("Decodes Z-Image latents with the model's VAE, on the first GPU of the group. Takes ComfyUI's "
                   "LATENT (the VAE's space), so also VAE Encode, Latent Upscale or Load Latent output.")

    def decode(self, model: runtime.ModelHandle, latent: dict):
        with runtime.user_errors():
            check_latent_shape(latent["samples"])
        # the decode stage takes diffusers' latents
        return (zimage.decode(runtime.stage_runner(model), latent_format.from_comfy(latent["samples"])),)


NODE_CLASS_MAPPINGS = {
    "PDZImageLoader": ZImageLoader,
    "PDZImageFilesLoader": ZImageFilesLoader,
    "PDZImageTextEncode": ZImageTextEncode,
    "PDZImageDenoise": ZImageDenoise,
    "PDZImageDecode": ZImageDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PDZImageLoader": "Z-Image Loader (parallel)",
    "PDZImageFilesLoader": "Z-Image Loader, ComfyUI files (parallel)",
    "PDZImageTextEncode": "Z-Image Text Encode (parallel)",
    "PDZImageDenoise": "Z-Image Denoise (parallel)",
    "PDZImageDecode": "Z-Image Decode (parallel)",
}
