"""GLM-Image (diffusers GlmImagePipeline) as stages: ar -> prepare -> denoise -> decode.

Each function mirrors one part of diffusers' GlmImagePipeline.__call__ so the single-process run equals it (the
reference tests hold it to that), and declares how it runs across ranks:

- glm_image.ar       TENSOR_PARALLEL, or                ranks 0..n-1 each hold 1/n of the ~10 B AR decoder (by
                    MAIN_RANK_ONLY_AND_SEND_TO_OTHERS  default on several CUDA GPUs; n the largest GPU count it
                                                        splits over) and sample in step, rank 0 deciding each token;
                                                        else rank 0 alone holds it. Every rank gets the tokens.
- glm_image.prepare  REPLICATED                         glyph embeddings, seeded noise, size
                                                        conditioning and the condition-image latents: cheap and
                                                        deterministic, so every rank computes the same.
- glm_image.denoise  SEQUENCE_PARALLEL | CFG_PARALLEL   the DiT loop: sharded by plan.py, guidance branches split
                                                        by parallel.cfg.run_branches.
- glm_image.decode   MAIN_RANK_ONLY                     only the host needs the image: rank 0 decodes, nobody
                                                        else spends time or memory on it and nothing is broadcast.

denoise returns, and decode takes, latents in the space their `latent_space` names (latent_format.py): diffusers'
normalised latents for the CLI, the VAE's raw space for ComfyUI's LATENT.

Inputs and outputs are plain CPU values (tensors, lists, PIL images, numbers): they cross process boundaries.
Batches: any number of prompts for text-to-image; editing (condition images) takes one prompt.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps
from transformers import (GlmImageConfig, GlmImageForConditionalGeneration, GlmImageImageProcessorPil,
                          GlmImageProcessor, StoppingCriteria, StoppingCriteriaList)

from ...parallel import Cancelled, Loader, Parallelism, Stage, StageContext
from ...parallel.cfg import run_branches
from .. import checks, fp8, internals, loading, weights
from .. import offload as offloading
from ..compile_blocks import compile_blocks
from ..cuda_graph import graphed_on
from . import ar_decode, latent_format
from .decode_step import fuse_qkv
from .plan import apply_ar_tensor_parallel, apply_sequence_parallel, largest_ar_split

log = logging.getLogger(__name__)

PIPELINE = "GlmImagePipeline"
SIZE_MULTIPLE = 32  # the AR grid is H/32 x W/32
MAX_SIZE = 4096  # the largest side the nodes offer; the library and the CLI refuse larger too
MAX_SEQUENCE_LENGTH = 2048  # diffusers' default for the glyph encoder
# Strings the AR processor gives a meaning of its own: in a user prompt they would corrupt the token grid.
RESERVED = ("<|image|>", "<sop>", "<eop>", "<|dit_token_")
# Where the AR decoder runs. auto: tensor parallel on several CUDA GPUs (it reads 1/n of the weights per token), on
# rank 0 on the CPU; tensor_parallel: also on the CPU (the tests)
AR_PLACEMENTS = ("auto", "rank0", "tensor_parallel")
# GPU memory a stage needs beside its weights (the AR's KV cache and compiled step, the DiT's activations and the
# VAE's decode at 1024x1024), for offload=auto: an estimate until bench/memory.py's per-stage peaks replace it
WORKING_MEMORY = 4 * offloading.GiB


@dataclass
class GlmImage:
    transformer: Any  # GlmImageTransformer2DModel, with the SP plan installed when sp > 1
    text_encoder: Any  # T5EncoderModel (glyph encoder)
    tokenizer: Any  # ByT5Tokenizer
    vae: Any  # AutoencoderKL: every rank encodes condition images in prepare; rank 0 decodes
    scheduler_config: dict
    vision_language_encoder: Any = None  # GlmImageForConditionalGeneration: rank 0, or every rank's shard
    processor: Any = None  # GlmImageProcessor, where the AR runs
    ar_tensor_parallel: bool = False  # the AR is sharded over ar_decode.TP_GROUP
    # The AR and the DiT, on the ranks where they take turns on the GPU (add_ar); else empty
    weights: offloading.StageWeights = field(default_factory=offloading.StageWeights)
    sp_hooks: list = field(default_factory=list)
    # The denoising loop's DiT call, per guidance branch (False: conditional, True: prior tokens dropped); on CUDA
    # each is replayed as its own CUDA graph (the branches' glyph lengths differ, and a GraphedCall keeps one graph)
    predict: dict[bool, Callable[..., torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self):
        self.predict = {drop: graphed_on(self.transformer.device, functools.partial(_forward, self.transformer, drop))
                        for drop in (False, True)}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load(ctx: StageContext, path: str, ar: str = "auto", offload: str = "auto", weight_dtype: str = "default"
         ) -> GlmImage:
    """Every rank loads the DiT, the glyph encoder and the VAE. The AR model and processor, as ar_placement
    decides for `ar` (one of AR_PLACEMENTS): on ranks 0..n-1, its decoder sharded over them, or on rank 0 alone;
    there, as `offload` (offload.MODES) decides, beside the DiT or in turns with it (add_ar). weight_dtype
    (fp8.WEIGHT_DTYPES): how the DiT's and the AR decoder's Linear weights are stored.
    On CUDA the AR decode step is compiled here (attach_ar), not in the first prompt."""
    offloading.check_mode(offload)
    fp8.check_weight_dtype(weight_dtype)
    loading.inspect_model_folder(path, PIPELINE)
    ar_ranks, placement = ar_placement(ar, ctx.device.type, ctx.comm.world_size, ar_text_config(path))
    dev, dtype = ctx.device, ctx.dtype
    scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler"))
    if scheduler_config.get("stochastic_sampling"):
        raise loading.ModelFolderError(f"{path}: a stochastic-sampling scheduler is not supported")
    transformer = loading.load_component(path, "transformer", dtype, dev).eval()
    sp_hooks = setup_transformer(ctx, transformer, weight_dtype)
    model = GlmImage(
        transformer=transformer,
        text_encoder=loading.load_component(path, "text_encoder", dtype, dev).eval(),
        tokenizer=loading.load_component(path, "tokenizer"),
        vae=loading.load_component(path, "vae", dtype, dev).eval(),
        scheduler_config=scheduler_config,
        sp_hooks=sp_hooks,
    )
    model.ar_tensor_parallel = ar_ranks > 1
    if ctx.is_main:
        log.info(placement)
    # every rank makes the group (a collective); the ranks outside it hold no AR
    in_ar = ctx.comm.make_group(ar_decode.TP_GROUP, range(ar_ranks)) if model.ar_tensor_parallel else ctx.is_main
    if in_ar:
        # Classes named explicitly: diffusers' save_pretrained records these two under the library "glm_image" (its
        # pipeline folder's name, which shadows transformers' model folder), which loading.py does not resolve.
        add_ar(ctx, model, offload, weights.headers(sorted((Path(path) / "vision_language_encoder").glob(
            "*.safetensors"))), lambda: attach_ar(ctx, model, loading.load_component(
                path, "vision_language_encoder", dtype, dev, cls=GlmImageForConditionalGeneration).eval(),
                load_processor(path), weight_dtype))
    return model


def add_ar(ctx: StageContext, model: GlmImage, mode: str, ar_files: dict, attach: Callable[[], None]) -> None:
    """On the ranks that hold the AR, its DiT loaded: `attach` loads the AR beside the DiT or, as offload.choose
    decides for `mode` with the AR's whole weights (`ar_files`: their headers; each rank loads all of it before
    keeping its shard), in turns with it (the DiT leaves for the host first). The ranks without the AR keep
    their DiT. The AR ranks hold the same DiT, so their host copy is one, spread over them (offload.py)."""
    group = ar_decode.TP_GROUP if model.ar_tensor_parallel else None
    needed = weights.nbytes(ar_files, ctx.dtype) + WORKING_MEMORY
    offload = offloading.choose(ctx.comm, mode, needed, "GLM-Image", group)
    if offload:
        model.weights.add("transformer", offloading.Offloaded(model.transformer, ctx.comm, group,
                                                              on_offload=functools.partial(_drop_graphs, model)))
    attach()
    if offload:
        model.weights.add("ar", offloading.Offloaded(model.vision_language_encoder), resident=True)


def _drop_graphs(model: GlmImage) -> None:
    """The DiT's CUDA graphs recorded its weights' addresses, which a round trip to the host changes."""
    for predict in model.predict.values():
        getattr(predict, "clear", lambda: None)()


def load_processor(path: str) -> GlmImageProcessor:
    """The AR's processor, its image processor always transformers' PIL one, torchvision installed or not.

    The folder names GlmImageImageProcessor, the torchvision class: transformers builds it where torchvision is
    installed and GlmImageImageProcessorPil where not. They resize condition images differently (torchvision's
    antialiased bicubic on tensors, PIL's bicubic), so the AR's condition tokens would depend on the environment;
    Pillow is a dependency, torchvision is not."""
    processor = loading.load_component(path, "processor", cls=GlmImageProcessor)
    processor.image_processor = GlmImageImageProcessorPil.from_pretrained(Path(path) / "processor",
                                                                          local_files_only=True)
    return processor


def setup_transformer(ctx: StageContext, transformer, weight_dtype: str = "default") -> list:
    """The loaded DiT as the denoise stage runs it: its Linear weights in fp8 for weight_dtype fp8_e4m3fn
    (models/fp8.py), its sequence-parallel plan installed (returns the hooks), its blocks compiled on CUDA (on CPU
    compiling costs minutes and saves little; the tests run it eagerly). On CUDA the whole call is also replayed as
    a CUDA graph (GlmImage.predict)."""
    if weight_dtype == "fp8_e4m3fn":
        fp8.store_fp8(fp8.linears(transformer), ctx.dtype)
    hooks = apply_sequence_parallel(transformer, ctx.comm)
    if ctx.device.type == "cuda":
        compile_blocks(list(transformer.transformer_blocks))
    return hooks


def ar_text_config(path: str):
    """The AR decoder's config (heads, KV heads, FFN width: what a tensor-parallel split needs), from the folder."""
    return GlmImageConfig.from_pretrained(Path(path) / "vision_language_encoder", local_files_only=True).text_config


def ar_placement(ar: str, device_type: str, world_size: int, text_config) -> tuple[int, str]:
    """(n, what it means for the user): the AR decoder sharded over ranks 0..n-1, or on rank 0 alone for n = 1.
    Tensor parallel takes the largest group of the ranks that splits the decoder evenly; the others wait for its
    tokens (the published model splits over 1, 2, 4, 8, 16 or 32 GPUs, so e.g. 4 of 6)."""
    if ar not in AR_PLACEMENTS:
        raise ValueError(f"GLM-Image's AR placement must be one of {', '.join(AR_PLACEMENTS)}, got {ar!r}")
    unit = "GPUs" if device_type == "cuda" else "ranks"
    if world_size == 1:
        return 1, "GLM-Image AR: on the one rank"
    if ar == "rank0" or (ar == "auto" and device_type != "cuda"):
        return 1, f"GLM-Image AR: on rank 0 alone (ar={ar}), which sends its tokens to the other {world_size - 1}"
    if not internals.FAST_AR.available():  # tensor parallel runs only in the fast decoding loop
        return 1, "GLM-Image AR: on rank 0 alone: its tensor-parallel loop is off with this transformers (warned why)"
    n = largest_ar_split(text_config, world_size)
    if n == 1:
        return 1, (f"GLM-Image AR: on rank 0 alone: its decoder splits over no group of 2 to {world_size} {unit} "
                   f"evenly")
    if n == world_size:
        return n, f"GLM-Image AR: tensor parallel over all {n} {unit}"
    idle = f"{unit[:-1]} {n} waits" if n == world_size - 1 else f"{unit} {n}-{world_size - 1} wait"
    return n, (f"GLM-Image AR: tensor parallel over {unit} 0-{n - 1}, {n} of {world_size}: its decoder "
               f"({text_config.num_attention_heads} heads, {text_config.num_key_value_heads} KV heads, FFN "
               f"{text_config.intermediate_size}) splits evenly over at most {n}; {idle} for its tokens "
               f"(ar=rank0 runs it on rank 0 alone)")


def attach_ar(ctx: StageContext, model: GlmImage, vision_language_encoder, processor,
              weight_dtype: str = "default") -> None:
    """Give the model its loaded AR (call where it runs: rank 0, or every rank when model.ar_tensor_parallel):
    shard its decoder if tensor-parallel, then compile the decode step for a default-sized request (a 1024x1024
    image: the cache slot of every request up to that size with a prompt of a few hundred tokens), so no prompt
    pays for compiling it; other slots compile on their first request."""
    model.vision_language_encoder, model.processor = vision_language_encoder, processor
    comm = _ar_comm(ctx, model)
    if comm is not None:
        apply_ar_tensor_parallel(vision_language_encoder, comm)
    if weight_dtype == "fp8_e4m3fn":
        fp8.store_fp8(ar_fp8_layers(vision_language_encoder), ctx.dtype)
    if ar_decode.enabled(vision_language_encoder, comm):
        inputs, max_new_tokens, _ = _ar_request(processor, ["warm-up"], None, 1024, 1024, ctx.device)
        ar_decode.decoder_for(vision_language_encoder, comm).warm_up(inputs, max_new_tokens)


def ar_fp8_layers(vision_language_encoder) -> list:
    """The AR decoder's layers stored in fp8: per layer its MLP and attention output projections (nearly all of
    its weights), and the output head. q/k/v stay in the compute dtype, fused first (decode_step.fuse_qkv, which
    the fast decode step reads directly): an fp8 q/k/v would need a kernel of its own there."""
    fuse_qkv(vision_language_encoder)
    layers = vision_language_encoder.model.language_model.layers
    return [*(m for layer in layers for m in (layer.mlp.gate_up_proj, layer.mlp.down_proj, layer.self_attn.o_proj)),
            vision_language_encoder.lm_head]


def ar_parallelism(model: GlmImage) -> Parallelism:
    return (Parallelism.TENSOR_PARALLEL if model.ar_tensor_parallel
            else Parallelism.MAIN_RANK_ONLY_AND_SEND_TO_OTHERS)


def _ar_comm(ctx: StageContext, model: GlmImage):
    return ctx.comm if model.ar_tensor_parallel else None


# -- glm_image.ar ------------------------------------------------------------------------------------------------

@torch.no_grad()
def ar(ctx: StageContext, model: GlmImage, *, prompt: str | list[str], height: int, width: int, seed: int,
       images: list | None = None) -> dict[str, Any]:
    """Sample the prior tokens as diffusers' generate_prior_tokens does, with the user's seed.

    Returns {"prior_token_ids": (B, (H/16)(W/16)) long, "condition_prior_token_ids": one (h_i/16 * w_i/16,) long
    per condition image (editing) or None, "sampled_on_rank": 0}. A rank left out of the tensor-parallel AR
    returns None at once (the executor hands it rank 0's result)."""
    if model.vision_language_encoder is None:
        return None
    check_size(height, width)
    prompts = _prompts(prompt)
    images = as_pil_images(images)
    if images and len(prompts) != 1:
        raise ValueError(f"editing takes one prompt, got {len(prompts)}")
    check_prompts(prompts, model.processor)
    model.weights.use("ar")
    vle, dev = model.vision_language_encoder, ctx.device
    inputs, max_new_tokens, (offset, grid_h, grid_w) = _ar_request(model.processor, prompts, images, height, width,
                                                                   dev)
    condition_prior_token_ids = None
    if images:
        source_grids = inputs["image_grid_thw"][:len(images)]
        check_condition_grids(images, source_grids.tolist())
        features = vle.get_image_features(inputs["pixel_values"], source_grids).pooler_output
        # One (C, h, w) map per image: get_image_tokens iterates over images. (diffusers 0.42.1 concatenates the
        # maps first, so transformers 5.23 iterates over channels and fails; the reference test splits them back.)
        tokens = vle.get_image_tokens(list(features), source_grids)
        condition_prior_token_ids = [
            upsample_token_ids(ids, h, w)[0].cpu()
            for ids, (_, h, w) in zip(tokens.split(source_grids.prod(-1).tolist()), source_grids.tolist())
        ]

    input_len = inputs["input_ids"].shape[-1]
    progress = _TokenProgress(ctx, input_len, max_new_tokens, in_step=model.ar_tensor_parallel)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # as diffusers does: generate() takes no generator
        if dev.type == "cuda":
            torch.cuda.manual_seed(seed)
        # generate() itself; on CUDA with a static KV cache and a compiled decode step (ar_decode.py): same tokens
        outputs = ar_decode.generate(vle, inputs, _ar_comm(ctx, model), max_new_tokens=max_new_tokens,
                                     do_sample=True, stopping_criteria=StoppingCriteriaList([progress]))
    generated = outputs[:, input_len:]
    if generated.shape[1] < offset + grid_h * grid_w:
        raise RuntimeError(f"the AR model stopped after {generated.shape[1]} of {max_new_tokens} tokens "
                           f"(it sampled its end token early); try another seed")
    prior = torch.cat([upsample_token_ids(g[offset:offset + grid_h * grid_w], grid_h, grid_w) for g in generated])
    codebook = model.transformer.config.prior_vq_quantizer_codebook_size
    if int(prior.max()) >= codebook:  # a sample of a batch ended early and was padded
        raise RuntimeError(f"the AR model put token {int(prior.max())} into an image grid, outside the DiT's "
                           f"codebook of {codebook} (it sampled its end token early); try another seed")
    return {"prior_token_ids": prior.cpu(), "condition_prior_token_ids": condition_prior_token_ids,
            "sampled_on_rank": 0 if model.ar_tensor_parallel else ctx.comm.rank}  # tensor-parallel: rank 0's tokens


def _ar_request(processor, prompts: list[str], images: list | None, height: int, width: int, dev: torch.device):
    """The AR's input ids for a request, how many tokens it samples, and where the target grid lies in them:
    (inputs, max_new_tokens, (offset, grid_h, grid_w)), as diffusers' generate_prior_tokens computes them."""
    content = [{"type": "image", "image": img} for img in images or []]
    messages = [[{"role": "user", "content": [*content, {"type": "text", "text": p}]}] for p in prompts]
    try:
        inputs = processor.apply_chat_template(
            messages, tokenize=True, padding=len(prompts) > 1, target_h=height, target_w=width, return_dict=True,
            return_tensors="pt").to(dev)
    except Exception as exc:  # noqa: BLE001 - the processor's own message, with the prompt it refused
        raise ValueError(f"the GLM-Image processor rejected the request ({prompts!r}): {exc}") from exc
    grids = inputs["image_grid_thw"]
    per_sample = int(inputs["images_per_sample"][0]) if inputs.get("images_per_sample") is not None else len(grids)
    sample_grids = grids[:per_sample].tolist()
    sizes = [h * w for _, h, w in sample_grids]
    if images:  # the target grid follows the sources
        return inputs, sizes[-1] + 1, (0, *sample_grids[-1][1:])
    # the target grid, then the small preview grid, which is sampled first
    return inputs, sum(sizes) + 1, (sum(sizes[1:]), *sample_grids[0][1:])


CANCEL_CHECK_TOKENS = 32  # tensor-parallel AR: how often the ranks agree on a cancel (a host round trip each)


class _TokenProgress(StoppingCriteria):
    """Called by generate() after every sampled token: rank-0 progress, and the cancel check (raising Cancelled
    leaves generate()). One rank: checked every token, the executor tells the others. Every rank in step
    (`in_step`, tensor-parallel): all ranks of the AR's group take rank 0's decision together after the first
    token and every CANCEL_CHECK_TOKENS tokens after it, so none is left waiting in a collective. Never stops generation itself,
    and draws no random numbers, so the sampled tokens are those of a plain generate()."""

    def __init__(self, ctx: StageContext, input_len: int, total: int, in_step: bool = False):
        self.ctx, self.input_len, self.total, self.in_step = ctx, input_len, total, in_step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = input_ids.shape[-1] - self.input_len
        if self.in_step:
            if done % CANCEL_CHECK_TOKENS == 1:  # the first token, then every CANCEL_CHECK_TOKENS
                self.ctx.step(done, self.total, "tokens", ar_decode.TP_GROUP)
            elif self.ctx.is_main:
                self.ctx.report("tokens", done, self.total)
        else:
            self.ctx.report("tokens", done, self.total)
            if self.ctx.cancel_requested():
                raise Cancelled(done, self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def check_condition_grids(images: list[PIL.Image.Image], grids: list[list[int]]) -> None:
    """The AR tokenizes a condition image on a grid the processor chooses (halved, rounded, clamped to its pixel
    limits); the DiT sees the image cropped to a multiple of 16. Their grids must match (the AR's upsampled 2x),
    else the DiT fails deep inside with a shape error: say so here instead."""
    for i, (img, (_, grid_h, grid_w)) in enumerate(zip(images, grids)):
        if (img.height // 16, img.width // 16) != (2 * grid_h, 2 * grid_w):
            raise ValueError(
                f"condition image {i} is {img.width}x{img.height}: the AR tokenizes it on a {grid_w}x{grid_h} grid, "
                f"the DiT on {img.width // 16}x{img.height // 16} (a size's 16th); resize it so that both sides are "
                f"multiples of 32 within the processor's pixel limits, e.g. {32 * grid_w}x{32 * grid_h}")


def upsample_token_ids(token_ids: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(h*w,) tokens of the H/32 grid -> (1, 4*h*w) tokens of the H/16 grid (nearest, as diffusers)."""
    grid = token_ids.view(1, 1, grid_h, grid_w).float()
    return torch.nn.functional.interpolate(grid, scale_factor=2, mode="nearest").long().view(1, -1)


# -- glm_image.prepare -------------------------------------------------------------------------------------------

@torch.no_grad()
def prepare(ctx: StageContext, model: GlmImage, *, prompt: str | list[str], height: int, width: int, seed: int,
            negative_prompt: str | list[str] | None = None, images: list | None = None) -> dict[str, Any]:
    """Everything the denoising loop takes besides the prior tokens and the step count, computed identically on
    every rank. Independent of steps and guidance, so changing those reruns the denoising only."""
    check_size(height, width)
    prompts = _prompts(prompt)
    batch, dev, dtype = len(prompts), ctx.device, ctx.dtype
    # diffusers' uncond branch: the glyph texts of the negative prompt, "" by default; a one-token T5 pass, so it
    # is made whether or not the guidance will use it
    negative = _prompts(negative_prompt) if negative_prompt is not None else [""]
    negative = negative * batch if len(negative) == 1 else negative
    if len(negative) != batch:
        raise ValueError(f"{batch} prompts but {len(negative)} negative prompts")
    out: dict[str, Any] = {"prompt_embeds": _glyph_embeds(model, prompts, dev, dtype).cpu(),
                           "negative_prompt_embeds": _glyph_embeds(model, negative, dev, dtype).cpu()}

    shape = (batch, model.transformer.config.in_channels, height // model.vae_scale_factor,
             width // model.vae_scale_factor)
    generator = torch.Generator("cpu").manual_seed(seed)
    out["latents"] = torch.randn(shape, generator=generator, dtype=dtype)  # diffusers' randn_tensor on the CPU

    out["target_size"] = torch.tensor([[height, width]], dtype=dtype).repeat(batch, 1)
    out["crop_coords"] = torch.tensor([[0, 0]], dtype=dtype).repeat(batch, 1)
    images = as_pil_images(images)
    out["condition_latents"] = _condition_latents(model, images, dev, dtype) if images else None
    return out


def schedule(model: GlmImage, latents: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' GlmImagePipeline timesteps and sigmas, with the resolution-dependent shift."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    image_seq_len = (latents.shape[2] * latents.shape[3]) // model.transformer.config.patch_size ** 2
    train_steps = scheduler.config.num_train_timesteps
    timesteps = np.linspace(train_steps, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("base_shift", 0.25), scheduler.config.get("max_shift", 0.75))
    retrieve_timesteps(scheduler, steps, "cpu", timesteps, timesteps / train_steps, mu=mu)
    return scheduler.timesteps, scheduler.sigmas


def glyph_texts(prompt: str) -> list[str]:
    """The quoted substrings diffusers renders as glyphs, in its order: '...', “...”, "...", 「...」."""
    return (re.findall(r"'([^']*)'", prompt) + re.findall(r"\u201c([^\u201c\u201d]*)\u201d", prompt)
            + re.findall(r'"([^"]*)"', prompt) + re.findall(r"「([^「」]*)」", prompt))


def _glyph_embeds(model: GlmImage, prompts: list[str], dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' _get_glyph_embeds: every glyph text of a prompt through the T5 encoder, padding dropped and the
    texts concatenated; prompts left-padded with zeros to one length. (B, L, text_embed_dim), L >= 1."""
    tok = model.tokenizer
    embeds = []
    for prompt in prompts:
        texts = glyph_texts(prompt) or [""]
        ids = tok(texts, max_length=MAX_SEQUENCE_LENGTH, truncation=True).input_ids
        ids = [[tok.pad_token_id] * ((len(ids) + 1) % 2) + x for x in ids]  # sic: parity of the text count
        longest = max(len(x) for x in ids)
        mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids], device=dev)
        ids = torch.tensor([x + [tok.pad_token_id] * (longest - len(x)) for x in ids], device=dev)
        hidden = model.text_encoder(ids, attention_mask=mask).last_hidden_state
        embeds.append(hidden[mask.bool()].unsqueeze(0))
    longest = max(e.shape[1] for e in embeds)
    embeds = [torch.cat([e.new_zeros(1, longest - e.shape[1], e.shape[2]), e], dim=1) for e in embeds]
    return torch.cat(embeds).to(dev, dtype)


def _condition_latents(model: GlmImage, images: list[PIL.Image.Image], dev: torch.device, dtype: torch.dtype
                       ) -> list[torch.Tensor]:
    """Each condition image cropped to a multiple of 16, VAE-encoded (mode) and normalised: (1, 16, h/8, w/8)."""
    vae = model.vae
    multiple = model.vae_scale_factor * model.transformer.config.patch_size
    processor = VaeImageProcessor(vae_scale_factor=model.vae_scale_factor)
    latents = []
    for img in images:
        h, w = (img.height // multiple) * multiple, (img.width // multiple) * multiple
        pixels = processor.preprocess(img, height=h, width=w).to(dev, dtype)
        latent = vae.encode(pixels).latent_dist.mode()
        latents.append(latent_format.from_vae(latent, vae.config).cpu())
    return latents


# -- glm_image.denoise -------------------------------------------------------------------------------------------

@torch.no_grad()
def denoise(ctx: StageContext, model: GlmImage, *, latents: torch.Tensor, prior_token_ids: torch.Tensor,
            prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor, steps: int,
            target_size: torch.Tensor, crop_coords: torch.Tensor, guidance: float,
            condition_latents: list[torch.Tensor] | None = None,
            condition_prior_token_ids: list[torch.Tensor] | None = None,
            latent_space: str = latent_format.DIFFUSERS) -> torch.Tensor:
    """The flow-matching Euler loop of diffusers' GlmImagePipeline: per step a conditional DiT call (reading the
    condition-image KV cache when editing) and, with guidance > 1, an unconditional one (prior tokens dropped,
    cache skipped). Returns the final latents (B, 16, H/8, W/8) on the CPU, in `latent_space` (float32 there)."""
    latent_format.check_space(latent_space)
    use_cfg = guidance > 1
    ctx.comm.layout.check_branches(2 if use_cfg else 1)
    timesteps, sigmas = schedule(model, latents, steps)
    editing = bool(condition_latents)
    if editing and (condition_prior_token_ids is None or len(condition_prior_token_ids) != len(condition_latents)):
        raise ValueError("editing needs one condition_prior_token_ids entry per condition latent")
    model.weights.use("transformer")
    dev, dtype = ctx.device, model.transformer.dtype
    transformer = model.transformer
    latents = latents.to(dev)
    prior = prior_token_ids.to(dev)
    cond_embeds = prompt_embeds.to(dev, dtype)
    uncond_embeds = negative_prompt_embeds.to(dev, dtype) if use_cfg else None
    target_size, crop_coords = target_size.to(dev), crop_coords.to(dev)

    kv_caches = None
    if editing:
        kv_caches = GlmImageKVCache(num_layers=transformer.config.num_layers)
        kv_caches.set_mode("write")
        for latent, ids in zip(condition_latents, condition_prior_token_ids):
            latent, ids = latent.to(dev, dtype), ids.to(dev)
            with torch.compiler.set_stance("force_eager"):
                _forward(transformer, False, latent, ids, cond_embeds.new_zeros(1, 0, cond_embeds.shape[2]),
                         torch.zeros((1,), device=dev),
                         torch.tensor([latent.shape[-2:]], device=dev) * model.vae_scale_factor,
                         torch.zeros((1, 2), device=dev), None, kv_caches)
        kv_caches.next_sample()

    # The DiT computes its rotary tables on the CPU at every call; once per request on the device instead keeps the
    # CPU (shared by all ranks) and host-to-device copies out of the loop.
    rope = tuple(t.to(dev) for t in transformer.rope(latents))

    def branch(embeds, drop_prior: bool, mode: str):
        def call() -> torch.Tensor:
            args = (x, prior, embeds, timestep, target_size, crop_coords, rope)
            if not editing:
                return model.predict[drop_prior](*args)
            # The condition-image KV cache is Python state, which compiled code and graphs would freeze: eager
            kv_caches.set_mode(mode)
            with torch.compiler.set_stance("force_eager"):
                return _forward(transformer, drop_prior, *args, kv_caches)
        return call

    total = len(timesteps)
    # Per-step sigma differences moved once: a host-to-device copy inside the loop would stall the GPU queue
    step_sizes = (sigmas[1:] - sigmas[:-1]).to(dev)
    for i, t in enumerate(timesteps.to(dev)):
        x = latents.to(dtype)
        timestep = t.expand(latents.shape[0]) - 1
        branches = [branch(cond_embeds, False, "read")]
        if use_cfg:
            branches.append(branch(uncond_embeds, True, "skip"))
        preds = run_branches(ctx.comm, branches)
        noise_pred = preds[1] + guidance * (preds[0] - preds[1]) if use_cfg else preds[0]
        # FlowMatchEulerDiscreteScheduler.step: float32 Euler update, cast to the prediction's dtype
        latents = (latents.float() + step_sizes[i] * noise_pred).to(noise_pred.dtype)
        ctx.step(i + 1, total)
    if editing:
        kv_caches.clear()
    if latent_space == latent_format.VAE:
        # Computed in the VAE's dtype as diffusers does before decoding; float32 holds those values exactly, so
        # decoding them equals decoding diffusers' latents
        latents = latent_format.to_vae(latents.to(model.vae.dtype), model.vae.config).float()
    return latents.cpu()


def _forward(transformer, drop_prior: bool, x: torch.Tensor, prior: torch.Tensor, embeds: torch.Tensor,
             timestep: torch.Tensor, target_size: torch.Tensor, crop_coords: torch.Tensor, rope, kv_caches=None
             ) -> torch.Tensor:
    """One DiT call, its prior tokens all kept or all dropped. The drop goes in as a Python bool: the DiT zeroes
    `prior_embedding[prior_token_drop]`, and a bool indexes as numpy's does (all of it, or none), where a mask tensor
    would make the host wait for the GPU (and cannot be captured in a CUDA graph)."""
    return transformer(hidden_states=x, encoder_hidden_states=embeds, prior_token_id=prior,
                       prior_token_drop=drop_prior, timestep=timestep, target_size=target_size,
                       crop_coords=crop_coords, return_dict=False, kv_caches=kv_caches,
                       image_rotary_emb=rope)[0].float()


# -- glm_image.decode --------------------------------------------------------------------------------------------

@torch.no_grad()
def decode(ctx: StageContext, model: GlmImage, *, latents: torch.Tensor,
           latent_space: str = latent_format.DIFFUSERS) -> torch.Tensor:
    """Latents in `latent_space` (diffusers' de-normalised here first), decoded -> (B, H, W, 3) float in [0, 1],
    CPU."""
    latent_format.check_space(latent_space)
    vae = model.vae
    z = latents.to(ctx.device, vae.dtype)
    if latent_space == latent_format.DIFFUSERS:
        z = latent_format.to_vae(z, vae.config)
    image = vae.decode(z, return_dict=False)[0]
    # diffusers' VaeImageProcessor.denormalize, in the VAE's dtype as diffusers runs it
    return (image * 0.5 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).cpu()


# -- checks and conversions --------------------------------------------------------------------------------------

def check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        checks.side("GLM-Image", name, value, SIZE_MULTIPLE, MAX_SIZE, f" (the AR token grid is {name}/32)")


def check_inputs(*, prompts: list[str] | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | None = None) -> None:
    """The values of a GLM-Image request, each checked alone, where the request enters (the library's generate,
    the CLI, the nodes, at queue time through VALIDATE_INPUTS): a refusal inside the workers would restart the
    group. None: not known there (a node input linked to another node's output)."""
    if prompts is not None:
        check_prompts(prompts)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            checks.side("GLM-Image", name, value, SIZE_MULTIPLE, MAX_SIZE, f" (the AR token grid is {name}/32)")
    if steps is not None:
        checks.integer("GLM-Image steps", steps, 1, hint="GLM-Image takes 50")
    if guidance is not None:
        checks.number("GLM-Image guidance", guidance, 0.0, "1 or less turns it off, GLM-Image takes 1.5")
    if seed is not None:
        checks.seed(seed)


def check_prompts(prompts: list[str], processor=None) -> None:
    """Refuse prompts the AR processor would misread (its image, grid and DiT token markers). An empty prompt is
    a prompt (diffusers takes it too: an image from the glyph-free, text-free AR)."""
    reserved = list(RESERVED)
    if processor is not None:
        tok = processor.tokenizer
        reserved += [t for t in (processor.image_token, processor.grid_bos_token, processor.grid_eos_token,
                                 tok.bos_token, tok.eos_token) if t]
    if not prompts:
        raise ValueError("no prompt given; GLM-Image takes one or more prompts (an empty one too)")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"a GLM-Image prompt must be a string, got {p!r}")
        found = [r for r in reserved if r in p]
        if found:
            raise ValueError(f"the GLM-Image prompt {p!r} contains {found[0]!r}, which the AR processor reserves "
                             f"for its own markers (the image size comes from height and width); remove it")


def as_pil_images(images) -> list[PIL.Image.Image] | None:
    """Condition images as RGB PIL images: PIL images, or (H, W, 3) / (B, H, W, 3) float [0, 1] tensors or arrays
    (ComfyUI's IMAGE), or uint8 arrays."""
    if images is None:
        return None
    if isinstance(images, (PIL.Image.Image, torch.Tensor, np.ndarray)):
        images = [images]
    out = []
    for img in images:
        if isinstance(img, PIL.Image.Image):
            out.append(img.convert("RGB"))
            continue
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if arr.ndim == 4:
            out.extend(as_pil_images(list(arr)))
            continue
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"a condition image must be (H, W, 3), got shape {tuple(arr.shape)}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        out.append(PIL.Image.fromarray(arr, "RGB"))
    return out or None


def _prompts(prompt: str | list[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    return prompts


LOADER = Loader("glm_image", load)
STAGES = [
    Stage("glm_image.ar", ar_parallelism, ar),
    Stage("glm_image.prepare", Parallelism.REPLICATED, prepare),
    Stage("glm_image.denoise", Parallelism.SEQUENCE_PARALLEL | Parallelism.CFG_PARALLEL, denoise),
    Stage("glm_image.decode", Parallelism.MAIN_RANK_ONLY, decode),
]
