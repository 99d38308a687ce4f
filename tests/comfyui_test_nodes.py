"""Test-only ComfyUI nodes, loaded only by the test server: tests/comfyui_server.py links this file into a
custom_nodes folder of its own (never the host's). Runs inside ComfyUI's venv, so it imports only torch."""
import torch

CATEGORY = "parallel_diffusion_tests"


class RandomConditioning:
    """Seeded random caption features as CONDITIONING. ComfyUI builds Z-Image's text encoder as the full Qwen3-4B
    whatever file it is given, so a test feeds the DiT its caption features directly instead."""
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "length": ("INT", {"default": 16, "min": 1, "max": 4096}),
                             "width": ("INT", {"default": 2560, "min": 1, "max": 16384})}}

    def make(self, seed: int, length: int, width: int):
        gen = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, length, width, generator=gen), {}]],)


def _numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


class ModelInfo:
    """What ComfyUI made of a loaded MODEL and VAE, as this node's UI output (so in /history): the model config it
    matched, latent format, sampling shift, DiT class and weight count; the VAE's class, latent channels and
    weight count. ComfyUI logs missing keys but only debug-logs a VAE's leftover ones: equal weight counts with
    nothing missing mean every tensor of the file found its place."""
    CATEGORY = CATEGORY
    FUNCTION = "info"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {"model": ("MODEL",), "vae": ("VAE",)}}

    def info(self, model=None, vae=None):
        out = {}
        if model is not None:
            base = model.model
            out.update(model_config=type(base.model_config).__name__,
                       latent_format=type(base.latent_format).__name__,
                       shift=float(model.get_model_object("model_sampling").shift),
                       diffusion_model=type(base.diffusion_model).__name__,
                       diffusion_model_numel=_numel(base.diffusion_model),
                       n_layers=len(base.diffusion_model.layers))
        if vae is not None:
            out.update(vae_model=type(vae.first_stage_model).__name__, vae_latent_channels=vae.latent_channels,
                       vae_numel=_numel(vae.first_stage_model))
        return {"ui": {"info": [out]}}


NODE_CLASS_MAPPINGS = {"PDTestRandomConditioning": RandomConditioning, "PDTestModelInfo": ModelInfo}
