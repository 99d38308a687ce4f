"""Z-Image (diffusers ZImagePipeline) as stages: encode -> prepare -> denoise -> decode.

Each function mirrors one step of diffusers' pipeline so the single-process run equals it, and declares which ranks
run it (parallel.Parallelism). Rank 0 alone holds the text encoder and the VAE, and encodes and decodes; every rank
holds the DiT and runs prepare and denoise, the DiT's blocks sharded over the sequence by the hooks plan.py installs
at load time and guidance branches split by parallel.cfg.run_branches.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from diffusers.utils.torch_utils import randn_tensor

from ...parallel import Loader, Parallelism, Stage, StageContext
from ...parallel.cfg import run_branches
from .. import checks, fp8, loading, weights
from .. import offload as offloading
from ..compile_blocks import compile_blocks
from ..cuda_graph import graphed_on
from ..lora import LoRAFactor, set_lora
from .attention import use_real_rotary
from .latent_format import LATENT_CHANNELS
from .plan import apply_sequence_parallel

PIPELINE = "ZImagePipeline"
VAE_SCALE = 8  # latent pixels per image pixel; the DiT patch (2) makes the size granule 16
SIZE_MULTIPLE = 16
MAX_SIZE = 4096  # the largest side the nodes offer; the library and the CLI refuse larger too
MAX_SEQUENCE_LENGTH = 512
# What diffusers' ZImagePipeline renders with Qwen3's chat template (one user message, enable_thinking=True) and
# ComfyUI's Z-Image tokenizer writes out; spelled out because ComfyUI's Qwen tokenizer files carry Qwen2.5's
# template, which adds a system prompt.
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# GPU memory a stage needs beside its weights (activations, the VAE's decode at 1024x1024), for offload=auto: an
# estimate until bench/memory.py's per-stage peaks on a GPU replace it
WORKING_MEMORY = 4 * offloading.GiB


@dataclass
class ZImage:
    transformer: ZImageTransformer2DModel
    scheduler_config: dict
    text_encoder: Any = None  # rank 0 only
    tokenizer: Any = None  # rank 0 only
    vae: AutoencoderKL | None = None  # rank 0 only
    # Rank 0's text encoder and DiT, where they take turns on its GPU (add_text_encoder); else empty
    weights: offloading.StageWeights = field(default_factory=offloading.StageWeights)
    # The DiT call of the denoising loop, predict(x, timestep, embeds); on CUDA replayed as one CUDA graph
    predict: Callable[..., torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        self.predict = graphed_on(self.transformer.device, functools.partial(_forward, self.transformer))


def apply_lora(model: ZImage, layers: dict[str, list[LoRAFactor]]) -> None:
    """Make `layers` (by diffusers weight name; {} for none) the DiT's LoRA."""
    if set_lora(model.transformer, layers) and hasattr(model.predict, "clear"):
        model.predict.clear()  # the captured CUDA graph calls the layers as they were


def load(ctx: StageContext, path: str, offload: str = "auto", weight_dtype: str = "default") -> ZImage:
    """offload (offload.MODES): whether rank 0's text encoder and DiT take turns on its GPU; weight_dtype
    (fp8.WEIGHT_DTYPES): how the DiT's Linear weights are stored."""
    offloading.check_mode(offload)
    fp8.check_weight_dtype(weight_dtype)
    loading.inspect_model_folder(path, PIPELINE)
    dev, dtype = ctx.device, ctx.dtype
    transformer = loading.load_component(path, "transformer", dtype, dev)
    setup_transformer(ctx, transformer, weight_dtype)
    model = ZImage(transformer, dict(FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler")))
    if ctx.is_main:
        coming = [weights.headers(sorted((Path(path) / name).glob("*.safetensors")))
                  for name in ("text_encoder", "vae")]
        add_text_encoder(ctx, model, offload, coming,
                         lambda: loading.load_component(path, "text_encoder", dtype, dev))
        model.tokenizer = loading.load_component(path, "tokenizer")
        model.vae = loading.load_component(path, "vae", dtype, dev)
    return model


def add_text_encoder(ctx: StageContext, model: ZImage, mode: str, coming: list[dict], load_text_encoder) -> None:
    """Rank 0, its DiT loaded: loads the text encoder beside it or, as offload.choose decides for `mode` with the
    text encoder and VAE still to come (`coming`: their files' headers), in turns with it (the DiT leaves for the
    host first). Only rank 0 holds both, so only it offloads; the other ranks hold the DiT alone and keep it."""
    needed = sum(weights.nbytes(infos, ctx.dtype) for infos in coming) + WORKING_MEMORY
    offload = offloading.choose(ctx.comm, mode, needed, "Z-Image")
    if offload:
        model.weights.add("transformer", offloading.Offloaded(model.transformer, on_offload=_drop_graph(model)))
    model.text_encoder = load_text_encoder()
    if offload:
        model.weights.add("text_encoder", offloading.Offloaded(model.text_encoder), resident=True)


def _drop_graph(model: ZImage) -> Callable[[], None]:
    """The DiT's CUDA graph recorded its weights' addresses, which a round trip to the host changes."""
    return getattr(model.predict, "clear", lambda: None)


def setup_transformer(ctx: StageContext, transformer: ZImageTransformer2DModel, weight_dtype: str = "default"
                      ) -> None:
    """The loaded DiT as the denoise stage runs it: its Linear weights in fp8 for weight_dtype fp8_e4m3fn
    (models/fp8.py), its rotary embedding in real arithmetic (attention.py), its sequence-parallel plan installed,
    its blocks compiled on CUDA (on CPU compiling costs minutes and saves little; the tests run it eagerly). On CUDA
    the whole call is also replayed as a CUDA graph (ZImage.predict)."""
    if weight_dtype == "fp8_e4m3fn":
        fp8.store_fp8(fp8.linears(transformer), ctx.dtype)
    use_real_rotary(transformer)
    apply_sequence_parallel(transformer, ctx.comm)
    if ctx.device.type == "cuda":
        compile_blocks([*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers])


# -- stages ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode(ctx: StageContext, model: ZImage, *, prompts: list[str], negative_prompts: list[str] | None = None
           ) -> dict[str, list[torch.Tensor]]:
    """Qwen3 hidden_states[-2] of the chat-templated prompt, padding dropped (one (L_i, D) tensor per prompt).
    Negative prompts are encoded when given (guidance > 0 needs them; diffusers uses "" by default)."""
    model.weights.use("text_encoder")
    out = {"prompt_embeds": _encode_texts(model, prompts, ctx.device)}
    out["negative_prompt_embeds"] = _encode_texts(model, negative_prompts, ctx.device) if negative_prompts else []
    return out


def _encode_texts(model: ZImage, texts: list[str], device: torch.device) -> list[torch.Tensor]:
    templated = [PROMPT_TEMPLATE.format(t) for t in texts]
    tokens = model.tokenizer(templated, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                             return_tensors="pt")
    mask = tokens.attention_mask.to(device).bool()
    hidden = model.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                                output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]].float().cpu() for i in range(len(texts))]


def prepare(ctx: StageContext, model: ZImage, *, batch: int, height: int, width: int, seed: int,
            init_latents: torch.Tensor | None = None, strength: float = 1.0, steps: int | None = None
            ) -> torch.Tensor:
    """Initial latents exactly as diffusers makes them: noise from torch.Generator("cpu").manual_seed(seed), or for
    image-to-image (init_latents in diffusers' space, strength < 1) ZImageImg2ImgPipeline.prepare_latents: that
    noise mixed into the init latents at the first sigma the strength keeps of the `steps` schedule. At strength 1
    that sigma is 1 and the noise replaces them entirely, so they only gave the size."""
    check_size(height, width)
    shape = (batch, model.transformer.in_channels, 2 * (height // (VAE_SCALE * 2)), 2 * (width // (VAE_SCALE * 2)))
    noise = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    if init_latents is None or strength == 1.0:
        return noise
    # one init latent for several prompts is repeated, as diffusers does
    init_latents = torch.cat([init_latents.float()] * (batch // init_latents.shape[0]))
    scheduler, timesteps = _scheduler(model, noise, steps, strength)
    return scheduler.scale_noise(init_latents, timesteps[:1].repeat(batch), noise)


@torch.no_grad()
def denoise(ctx: StageContext, model: ZImage, *, latents: torch.Tensor, prompt_embeds: list[torch.Tensor],
            negative_prompt_embeds: list[torch.Tensor], steps: int, guidance: float, strength: float = 1.0,
            lora: dict[str, list[LoRAFactor]] | None = None) -> torch.Tensor:
    """The flow-matching loop; sharded over the sequence by the plan, guidance branches split by cfg degree.
    strength < 1 (image-to-image, latents from prepare) runs only the last steps of the schedule. lora: the LoRA
    factors of this request (none: the base weights)."""
    use_cfg = guidance > 0
    ctx.comm.layout.check_branches(2 if use_cfg else 1)
    model.weights.use("transformer")
    apply_lora(model, lora or {})
    scheduler, timesteps = _scheduler(model, latents, steps, strength)
    dev, dtype = ctx.device, model.transformer.dtype
    cond = [e.to(dev, dtype) for e in prompt_embeds]
    uncond = [e.to(dev, dtype) for e in negative_prompt_embeds]
    latents = latents.to(dev)
    # Z-Image's time input, for every step at once: a host-to-device copy inside the loop would stall the GPU queue
    model_times = ((1000 - timesteps) / 1000).to(dev)
    for i, t in enumerate(timesteps):
        timestep = model_times[i].expand(latents.shape[0])
        x = latents.to(dtype)
        if not use_cfg:
            noise_pred = model.predict(x, timestep, cond)
        elif ctx.comm.layout.cfg == 1:  # one batched call, exactly as diffusers runs it
            both = model.predict(torch.cat([x, x]), torch.cat([timestep, timestep]), cond + uncond)
            pos, neg = both.chunk(2)
            noise_pred = pos + guidance * (pos - neg)
        else:
            pos, neg = run_branches(ctx.comm, [lambda: model.predict(x, timestep, cond),
                                               lambda: model.predict(x, timestep, uncond)])
            noise_pred = pos + guidance * (pos - neg)
        latents = scheduler.step(-noise_pred, t, latents, return_dict=False)[0]
        ctx.step(i + 1, len(timesteps))
    return latents.cpu()


def _scheduler(model: ZImage, latents: torch.Tensor, steps: int, strength: float
               ) -> tuple[FlowMatchEulerDiscreteScheduler, torch.Tensor]:
    """A fresh scheduler per request (its step index is state), with the resolution-dependent shift, and the
    timesteps the strength runs (all at strength 1)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    cfg = scheduler.config
    mu = calculate_shift((latents.shape[2] // 2) * (latents.shape[3] // 2), cfg.get("base_image_seq_len", 256),
                         cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(steps), device="cpu", mu=mu)
    start = start_step(steps, strength)
    scheduler.set_begin_index(start)  # the flow-matching Euler scheduler's order is 1: one timestep per step
    return scheduler, scheduler.timesteps[start:]


def start_step(steps: int, strength: float) -> int:
    """Where a denoise strength enters the schedule of `steps`, as ZImageImg2ImgPipeline.get_timesteps: it runs the
    last steps - start of them (about strength x steps, rounded up)."""
    return int(max(steps - min(steps * strength, steps), 0))


def check_strength(strength: float, has_init_latents: bool) -> None:
    checks.number("Z-Image denoise", strength, 0.0, "1 generates from noise alone")
    if not 0 < strength <= 1:
        raise ValueError(f"Z-Image denoise must be above 0 and at most 1, got {strength}; 1 generates from noise "
                         f"alone (an input latent gives only the size), lower keeps more of the input latent")
    if strength < 1 and not has_init_latents:
        raise ValueError(f"Z-Image denoise {strength} needs an input latent to keep part of; connect one "
                         f"(e.g. VAE Encode) or set denoise to 1")


def check_latent_shape(latents: torch.Tensor) -> None:
    if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"a Z-Image latent is (batch, {LATENT_CHANNELS} channels, height, width), got shape "
                         f"{tuple(latents.shape)}; use EmptySD3LatentImage, or VAE Encode with Z-Image's (Flux's) VAE")


def latent_image_size(latents: torch.Tensor) -> tuple[int, int, int]:
    """(batch, height, width in pixels) of the image a (B, 16, H/8, W/8) latent stands for, checked as check_size."""
    check_latent_shape(latents)
    batch, _, height, width = latents.shape
    try:
        check_size(height * VAE_SCALE, width * VAE_SCALE)
    except ValueError as exc:
        raise ValueError(f"the input latent is {width * VAE_SCALE}x{height * VAE_SCALE} pixels ({width}x{height} in "
                         f"latent space): {exc} (Latent Upscale can resize it)") from None
    return batch, height * VAE_SCALE, width * VAE_SCALE


def _forward(transformer: ZImageTransformer2DModel, x: torch.Tensor, timestep: torch.Tensor,
             embeds: list[torch.Tensor]) -> torch.Tensor:
    out = transformer(list(x.unsqueeze(2).unbind(0)), timestep, embeds, return_dict=False)[0]
    return torch.stack([o.float() for o in out]).squeeze(2)


@torch.no_grad()
def decode(ctx: StageContext, model: ZImage, *, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode -> (B, H, W, 3) float in [0, 1] on the CPU (ComfyUI's IMAGE layout)."""
    vae = model.vae
    z = latents.to(ctx.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(z, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        checks.side("Z-Image", name, value, SIZE_MULTIPLE, MAX_SIZE)


def check_inputs(*, prompts: list[str] | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                 strength: float | None = None, has_init_latents: bool | None = None) -> None:
    """The values of a Z-Image request, each checked alone, where the request enters (the library's generate, the
    CLI, the nodes, at queue time through VALIDATE_INPUTS): a refusal inside the workers would restart the group.
    None: not known there (a node input linked to another node's output)."""
    if prompts is not None:
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"Z-Image takes one or more prompts as strings, got {prompts!r}")
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            checks.side("Z-Image", name, value, SIZE_MULTIPLE, MAX_SIZE)
    if steps is not None:
        checks.integer("Z-Image steps", steps, 1, hint="Z-Image-Turbo takes 8, base Z-Image about 30-50")
    if guidance is not None:
        checks.number("Z-Image guidance", guidance, 0.0, "0 turns it off (Z-Image-Turbo), base Z-Image takes ~4")
    if seed is not None:
        checks.seed(seed)
    if strength is not None:
        check_strength(strength, has_init_latents is not False)


LOADER = Loader("zimage", load)
STAGES = [
    Stage("zimage.encode", Parallelism.MAIN_RANK_ONLY, encode),
    Stage("zimage.prepare", Parallelism.EVERY_RANK, prepare),
    Stage("zimage.denoise", Parallelism.EVERY_RANK, denoise),
    Stage("zimage.decode", Parallelism.MAIN_RANK_ONLY, decode),
]
