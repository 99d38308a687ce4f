"""GLM-Image loaded for the stages: the model's parts on each rank, the DiT's sequence-parallel plan and the AR's
tensor-parallel wiring (plan.py), and where the AR runs."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import (GlmImageConfig, GlmImageForConditionalGeneration, GlmImageImageProcessorPil,
                          GlmImageProcessor)

from ...parallel import StageContext
from .. import fp8, internals, loading, weights
from .. import offload as offloading
from ..compile_blocks import compile_blocks
from ..cuda_graph import graphed_on
from . import ar_decode
from .ar import ar_comm, ar_request
from .attention import use_sequence_parallel_attention
from .decode_step import fuse_qkv
from .plan import apply_ar_tensor_parallel, apply_sequence_parallel, largest_ar_split

log = logging.getLogger(__name__)

PIPELINE = "GlmImagePipeline"
# Where the AR decoder runs. auto: tensor parallel on several CUDA GPUs (it reads 1/n of the weights per token), on
# rank 0 on the CPU; tensor_parallel: also on the CPU (the tests)
AR_PLACEMENTS = ("auto", "rank0", "tensor_parallel")
# GPU memory a stage needs beside its weights (the AR's KV cache and compiled step, the DiT's activations and the
# VAE's decode at 1024x1024), for offload=auto: an estimate until bench/memory.py's per-stage peaks replace it
WORKING_MEMORY = 4 * offloading.GiB


@dataclass
class GlmImage:
    transformer: Any  # GlmImageTransformer2DModel, with the SP plan installed when sp > 1
    text_encoder: Any  # T5EncoderModel (glyph encoder): rank 0 only
    tokenizer: Any  # ByT5Tokenizer: rank 0 only
    vae: Any  # AutoencoderKL: rank 0 only, which encodes the condition images (prepare) and decodes
    vae_config: Any  # the VAE's config on every rank: the denoising loop's latent scale and statistics
    scheduler_config: dict
    vision_language_encoder: Any = None  # GlmImageForConditionalGeneration: rank 0, or every rank's shard
    processor: Any = None  # GlmImageProcessor, where the AR runs
    ar_tensor_parallel: bool = False  # the AR is sharded over ar_decode.TP_GROUP
    # The AR and the DiT, on the ranks where they take turns on the GPU (add_ar); else empty
    weights: offloading.StageWeights = field(default_factory=offloading.StageWeights)
    # The denoising loop's DiT call, per guidance branch (False: conditional, True: prior tokens dropped); on CUDA
    # each is replayed as its own CUDA graph (the branches' glyph lengths differ, and a GraphedCall keeps one graph)
    predict: dict[bool, Callable[..., torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self):
        self.predict = {drop: graphed_on(self.transformer.device, functools.partial(forward, self.transformer, drop))
                        for drop in (False, True)}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.block_out_channels) - 1)


def load(ctx: StageContext, path: str, ar: str = "auto", offload: str = "auto", weight_dtype: str = "default"
         ) -> GlmImage:
    """Every rank loads the DiT; rank 0 also the glyph encoder and the VAE (prepare and decode run there). The AR
    model and processor, as ar_placement
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
    setup_transformer(ctx, transformer, weight_dtype)
    main = ctx.is_main
    vae = loading.load_component(path, "vae", dtype, dev).eval() if main else None
    model = GlmImage(
        transformer=transformer,
        text_encoder=loading.load_component(path, "text_encoder", dtype, dev).eval() if main else None,
        tokenizer=loading.load_component(path, "tokenizer") if main else None,
        vae=vae,
        vae_config=vae.config if main else loading.model_config(path, "vae"),
        scheduler_config=scheduler_config,
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


def setup_transformer(ctx: StageContext, transformer, weight_dtype: str = "default") -> None:
    """The loaded DiT as the denoise stage runs it: its Linear weights in fp8 for weight_dtype fp8_e4m3fn
    (models/fp8.py), the project's attention processor (attention.py) and its sequence-parallel plan installed, its
    blocks compiled on CUDA (on CPU compiling costs minutes and saves little; the tests run it eagerly). On CUDA the
    whole call is also replayed as a CUDA graph (GlmImage.predict)."""
    if weight_dtype == "fp8_e4m3fn":
        fp8.store_fp8(fp8.linears(transformer), ctx.dtype)
    use_sequence_parallel_attention(transformer)
    apply_sequence_parallel(transformer, ctx.comm)
    if ctx.device.type == "cuda":
        compile_blocks(list(transformer.transformer_blocks))


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
    comm = ar_comm(ctx, model)
    if comm is not None:
        apply_ar_tensor_parallel(vision_language_encoder, comm)
    if weight_dtype == "fp8_e4m3fn":
        fp8.store_fp8(ar_fp8_layers(vision_language_encoder), ctx.dtype)
    if ar_decode.enabled(vision_language_encoder, comm):
        inputs, max_new_tokens, _ = ar_request(processor, ["warm-up"], None, 1024, 1024, ctx.device)
        ar_decode.decoder_for(vision_language_encoder, comm).warm_up(inputs, max_new_tokens)


def ar_fp8_layers(vision_language_encoder) -> list:
    """The AR decoder's layers stored in fp8: per layer its MLP and attention output projections (nearly all of
    its weights), and the output head. q/k/v stay in the compute dtype, fused first (decode_step.fuse_qkv, which
    the fast decode step reads directly): an fp8 q/k/v would need a kernel of its own there."""
    fuse_qkv(vision_language_encoder)
    layers = vision_language_encoder.model.language_model.layers
    return [*(m for layer in layers for m in (layer.mlp.gate_up_proj, layer.mlp.down_proj, layer.self_attn.o_proj)),
            vision_language_encoder.lm_head]


def forward(transformer, drop_prior: bool, x: torch.Tensor, prior: torch.Tensor, embeds: torch.Tensor,
            timestep: torch.Tensor, target_size: torch.Tensor, crop_coords: torch.Tensor, rope, kv_caches=None
            ) -> torch.Tensor:
    """One DiT call, its prior tokens all kept or all dropped. The drop goes in as a Python bool: the DiT zeroes
    `prior_embedding[prior_token_drop]`, and a bool indexes as numpy's does (all of it, or none), where a mask tensor
    would make the host wait for the GPU (and cannot be captured in a CUDA graph)."""
    return transformer(hidden_states=x, encoder_hidden_states=embeds, prior_token_id=prior,
                       prior_token_drop=drop_prior, timestep=timestep, target_size=target_size,
                       crop_coords=crop_coords, return_dict=False, kv_caches=kv_caches,
                       image_rotary_emb=rope)[0].float()
