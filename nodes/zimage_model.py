"""Z-Image Parallel MODEL: ComfyUI's own Z-Image MODEL with its DiT evaluated on the worker group.

The node clones the MODEL (a ComfyUI ModelPatcher) and changes it through ComfyUI's extension points only:
- an object patch puts `ParallelDiT` where the MODEL's NextDiT was, so every model call ComfyUI makes reaches the
  workers, and ComfyUI's own copy of the DiT weights never goes to a GPU (it stays where Load Diffusion Model left
  it, in host memory);
- a calc_cond_batch wrapper sends both guidance branches of a step as one request (so cfg_parallel can run them on
  two GPU groups) whenever the conditioning is plain; other conditioning (areas, masks, timestep ranges, combined
  conds) goes through ComfyUI's own batching and reaches the workers through the object patch, one call at a time.
LoRA loaders before or after this node patch the MODEL's weights as usual; at each call ParallelDiT reads those
patches from the MODEL being sampled and the workers apply them beside their layers
(models/zimage/comfyui_model.py). The workers load the DiT from the same file, found by its contents among
ComfyUI's diffusion models.
"""
from __future__ import annotations

import os

import comfy.model_base
import comfy.patcher_extension
import comfy.samplers
import torch

from ..models import weights
from ..models.zimage import comfyui_files
from ..models.zimage.comfyui_model import DIT_LOADER, DiTClient
from . import lora, model_files, runtime
from .common import layout_inputs

CATEGORY = "parallel_diffusion/Z-Image"
WRAPPER_KEY = "parallel_diffusion"
# The weights compared to find the file a MODEL was loaded from: small, and unique to each trained model.
PROBES = ("x_pad_token", "cap_pad_token", "t_embedder.mlp.0.bias", "final_layer.adaLN_modulation.1.bias")
PLAIN_CONDS = {"c_crossattn", "num_tokens", "attention_mask"}
# transformer_options entries by which other nodes change the DiT's computation inside ComfyUI's NextDiT; the
# workers run diffusers' DiT, so they cannot take them.
DIT_OPTIONS = ("patches", "patches_replace", "rope_options")


class ParallelDiT(torch.nn.Module):
    """Stands in for the MODEL's NextDiT: each call is one request to the worker group."""

    def __init__(self, handle: runtime.ModelHandle, original: torch.nn.Module, base_model):
        super().__init__()
        self.handle = handle
        self.dtype = original.dtype  # ComfyUI's BaseModel reads its DiT's dtype
        # kept out of the module tree, so that ComfyUI neither loads them to a GPU nor counts them twice
        self._refs = (original, base_model)
        self.shapes = {name: tuple(t.shape) for name, t in original.state_dict().items()}
        self.client = DiTClient(lambda stage, inputs: runtime.run_stage(handle, stage, inputs))

    @property
    def original(self) -> torch.nn.Module:
        return self._refs[0]

    def state_dict(self, *args, **kwargs):
        """The DiT's weights by name, as ComfyUI's LoRA loaders read them from the MODEL (to map a LoRA's keys and
        keep only patches of weights that exist), also while this stand-in is patched in."""
        return self.original.state_dict(*args, **kwargs)

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options={}, **kwargs):
        """ComfyUI's NextDiT call (BaseModel.apply_model): one branch of images, its output as NextDiT's."""
        (out,) = self.evaluate(x, timesteps, [captions_of(context, attention_mask)], transformer_options)
        return out.to(x.device, x.dtype)

    def evaluate(self, x: torch.Tensor, timestep: torch.Tensor, branches: list[list[torch.Tensor]],
                 transformer_options: dict) -> list[torch.Tensor]:
        with runtime.user_errors():
            changed = [name for name in DIT_OPTIONS if transformer_options.get(name)]
            if changed:
                raise ValueError(f"a node changes the DiT's computation ({', '.join(changed)} in its "
                                 f"transformer_options); Z-Image Parallel MODEL runs diffusers' DiT on its workers "
                                 f"and cannot apply that: sample with the MODEL before this node")
            if x.shape[-2] % 2 or x.shape[-1] % 2:
                raise ValueError(f"Z-Image needs image sides that are multiples of 16 pixels; this latent is "
                                 f"{x.shape[-1] * 8}x{x.shape[-2] * 8}")
            patcher = self._refs[1].current_patcher  # the MODEL being sampled: LoRAs after this node included
            patches = lora.model_patches(patcher.patches if patcher is not None else {}, self.shapes)
        return self.client.predict(x, timestep, branches, patches)


def captions_of(context: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each image's caption features (L, D): ComfyUI pads a batch to one length and masks the padding."""
    if attention_mask is None:
        return list(context.unbind(0))
    return [c[m.bool()] for c, m in zip(context, attention_mask)]


def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """ComfyUI's calc_cond_batch, as a wrapper: plain conditioning of every branch in one request."""
    dit = model.diffusion_model
    branches = plain_branches(conds, x_in, timestep) if isinstance(dit, ParallelDiT) else None
    if branches is None:
        return executor(model, conds, x_in, timestep, model_options)
    # as BaseModel.apply_model does around its DiT
    sampling = model.model_sampling
    xc = sampling.calculate_input(timestep, x_in)
    t = sampling.timestep(timestep).float()
    outs = iter(dit.evaluate(xc, t, [b for b in branches if b is not None], model_options.get("transformer_options", {})))
    return [torch.zeros_like(x_in) if b is None else sampling.calculate_denoised(timestep, next(outs).to(x_in), x_in)
            for b in branches]


def plain_branches(conds, x_in, timestep) -> list[list[torch.Tensor] | None] | None:
    """Each branch's captions when every branch is one whole-image cond at full strength with nothing but text
    features (None for a branch ComfyUI skips, as cfg 1 does); None when any is not."""
    branches = []
    for cond in conds:
        if cond is None:
            branches.append(None)
            continue
        if len(cond) != 1 or "default" in cond[0]:
            return None
        p = comfy.samplers.get_area_and_mult(cond[0], x_in, timestep)
        if p is None or p.area is not None or p.control is not None or p.patches is not None or p.hooks is not None:
            return None
        if not torch.all(p.mult == 1) or set(p.conditioning) - PLAIN_CONDS:
            return None
        mask = p.conditioning.get("attention_mask")
        branches.append(captions_of(p.conditioning["c_crossattn"].cond, mask.cond if mask is not None else None))
    return branches


def source_file(dit: torch.nn.Module) -> str:
    """The diffusion model file among ComfyUI's whose probe weights equal the MODEL's."""
    params = dict(dit.named_parameters())
    probes = {name: params[name].detach() for name in PROBES if name in params}
    if len(probes) != len(PROBES):
        raise ValueError("this MODEL's DiT lacks Z-Image's pad tokens: it is not Z-Image")
    names = model_files.list_files("diffusion_models")
    found = [name for name in names
             if weights.holds(model_files.file_path("diffusion_models", name), probes, comfyui_files.COMFYUI_PREFIX)]
    if not found:
        raise ValueError("no file under ComfyUI's diffusion_models holds this MODEL's weights; Z-Image Parallel "
                         "MODEL loads the DiT on its workers from the file Load Diffusion Model read (a "
                         ".safetensors file there)")
    if len(found) > 1:
        raise ValueError(f"several diffusion model files hold this MODEL's weights ({', '.join(found)}); keep one")
    return model_files.file_path("diffusion_models", found[0])


class ZImageParallelModel:
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same MODEL, its DiT evaluated on the GPUs of the worker group: for KSampler, "
                       "SamplerCustom(Advanced) and any node that samples a MODEL.",)
    DESCRIPTION = ("Makes ComfyUI's Z-Image MODEL (Load Diffusion Model with z_image_turbo_bf16 or z_image_bf16) "
                   "parallel: every model evaluation of the sampler runs on a group of worker processes, one per "
                   "GPU, the image's tokens split across them (and with cfg_parallel the two guidance branches on "
                   "two halves of the GPUs). ComfyUI keeps its text encoder, VAE and sampler; LoRAs applied to the "
                   "MODEL (before or after this node) apply on the workers. The result equals one GPU's.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Z-Image (Turbo or base) from Load Diffusion Model, with or without "
                                           "LoRAs."}),
            **layout_inputs(),
        }}

    def patch(self, model, gpus: int, cfg_parallel: bool, device: str):
        with runtime.user_errors():
            base = model.model
            dit = base.diffusion_model
            if isinstance(model.object_patches.get("diffusion_model"), ParallelDiT):
                raise ValueError("this MODEL is already a Z-Image Parallel MODEL")
            dit = dit.original if isinstance(dit, ParallelDiT) else dit  # a parallel clone is loaded right now
            if not isinstance(base, comfy.model_base.Lumina2) or type(base.model_config).__name__ != "ZImage":
                raise ValueError(f"Z-Image Parallel MODEL takes a Z-Image MODEL; this one is "
                                 f"{type(base.model_config).__name__}")
            path = source_file(dit)
        # the workers store the weights as Load Diffusion Model's weight_dtype did: fp8 there, fp8 here
        weight_dtype = "fp8_e4m3fn" if dit.dtype == torch.float8_e4m3fn else "default"
        handle = runtime.load_model(DIT_LOADER.name, {"transformer": path, "weight_dtype": weight_dtype}, gpus,
                                    cfg_parallel, device, lambda: comfyui_files.inspect_transformer(path))
        patched = model.clone()
        patched.add_object_patch("diffusion_model", ParallelDiT(handle, dit, base))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, calc_cond_batch)
        runtime.log.info("parallel_diffusion: Z-Image MODEL from %s runs on %s", os.path.basename(path),
                         handle.describe())
        return (patched,)


NODE_CLASS_MAPPINGS = {"PDZImageParallelModel": ZImageParallelModel}
NODE_DISPLAY_NAME_MAPPINGS = {"PDZImageParallelModel": "Z-Image Parallel MODEL (parallel)"}
