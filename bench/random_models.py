"""Worker plugin for the benchmarks: the project's own stages, plus loaders that build full-size models with
random weights on the GPU (speed does not depend on weight values; nothing can be downloaded here).

Every rank seeds the same generator before drawing weights, so all ranks hold identical models, as they would
after loading one checkpoint. Weights are N(0, 0.02) so activations stay finite in bf16 and parity can be
measured on real numbers, not NaNs.

The *_random loaders hold what the denoising benchmark needs; the *_random_pipeline loaders hold every component
of the pipeline (bench/pipeline.py): Z-Image adds a Qwen3-4B-shaped text encoder with the tiny Z-Image tokenizer,
GLM-Image the full-size AR decoder of bench/ar.py with the tiny GLM processor (placed as models/glm_image places
it). zimage_modules, glm_image_modules and glm_image_ar build the same modules (same seeds) outside a worker, for
diffusers' own pipelines.
"""
from __future__ import annotations

import gc
import time
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from diffusers import AutoencoderKL, GlmImageTransformer2DModel, ZImageTransformer2DModel
from transformers import ByT5Tokenizer, Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.models import weights
from comfyui_parallel_diffusion.models.cuda_graph import GraphedCall
from comfyui_parallel_diffusion.models.glm_image import ar_decode
from comfyui_parallel_diffusion.models.glm_image import tiny as glm_tiny
from comfyui_parallel_diffusion.models.glm_image import model as glm_model
from comfyui_parallel_diffusion.models.glm_image.model import GlmImage
from comfyui_parallel_diffusion.models.zimage import tiny as zimage_tiny
from comfyui_parallel_diffusion.models.zimage import stages as zimage_stages
from comfyui_parallel_diffusion.models.zimage.stages import ZImage
from comfyui_parallel_diffusion.parallel import Loader, Parallelism, Stage

# Shapes of the released Z-Image (6.16 B DiT; Flux's VAE), from shared/design.md.
ZIMAGE_DIT = dict(zimage_tiny.TRANSFORMER_CONFIG, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
                  n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
FLUX_VAE = dict(zimage_tiny.VAE_CONFIG, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                norm_num_groups=32)
# GLM-Image: 6.93 B DiT, 30 layers of 32 heads x 128; glyph encoder T5 d_model 1472, 12 layers (shared/design.md).
GLM_DIT = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=128,
               num_attention_heads=32, text_embed_dim=1472, time_embed_dim=512, condition_dim=256,
               prior_vq_quantizer_codebook_size=16384)
GLYPH_T5 = dict(d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, dropout_rate=0.0)
GLM_VAE = dict(FLUX_VAE, latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
GLM_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.25,
                     max_shift=0.75, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="linear")
# Z-Image's text encoder: Qwen3-4B (shared/design.md); hidden_states[-2] feeds the DiT's cap_feat_dim 2560.
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
SCALES = {
    "full": {"dit": ZIMAGE_DIT, "vae": FLUX_VAE, "glm_dit": GLM_DIT, "glyph": GLYPH_T5, "glm_vae": GLM_VAE,
             "text": QWEN3_4B},
    "tiny": {"dit": zimage_tiny.TRANSFORMER_CONFIG, "vae": zimage_tiny.VAE_CONFIG,  # CPU smoke runs
             "glm_dit": dict(GLM_DIT, num_layers=2, attention_head_dim=8, num_attention_heads=3, text_embed_dim=32,
                             time_embed_dim=32, condition_dim=16, prior_vq_quantizer_codebook_size=64),
             "glyph": dict(GLYPH_T5, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
             "glm_vae": dict(zimage_tiny.VAE_CONFIG, latents_mean=[0.0] * 16, latents_std=[1.0] * 16),
             "text": dict(QWEN3_4B, vocab_size=512, hidden_size=zimage_tiny.TEXT_HIDDEN, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                          max_position_embeddings=1024)},
}
# The AR's sampling settings (bench/ar.py's defaults); the end token lies outside the sampled range, so every
# request samples the whole grid, and tokens past the DiT's codebook are suppressed (a random AR would sample them:
# the real one never does, and the DiT's embedding cannot take them).
AR_SAMPLING = dict(temperature=0.9, top_k=2048, top_p=0.9)
AR_SEED = 3


def random_module(cls, config: dict, ctx, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(ctx.device):
        module = cls(**config).to(ctx.dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.eval()


def zimage_modules(scale: str, device, dtype: torch.dtype, *, vae: bool = True, text: bool = False) -> dict:
    """The random Z-Image modules: the DiT (seed 0), the VAE (seed 1), and with `text` the Qwen3 text encoder
    (seed 3) and the tiny Z-Image tokenizer (byte-level: token ids are all it needs to supply)."""
    shapes, at = SCALES[scale], _place(device, dtype)
    out = {"transformer": random_module(ZImageTransformer2DModel, shapes["dit"], at, seed=0)}
    if vae:
        out["vae"] = random_module(AutoencoderKL, shapes["vae"], at, seed=1)
    if text:
        out["tokenizer"] = zimage_tiny._tiny_tokenizer()
        config = dict(shapes["text"], vocab_size=max(shapes["text"]["vocab_size"], len(out["tokenizer"])))
        out["text_encoder"] = random_module(lambda **c: Qwen3Model(Qwen3Config(**c)), config, at, seed=3)
    return out


def glm_image_modules(scale: str, device, dtype: torch.dtype, main: bool = True) -> dict:
    """The random GLM-Image DiT (seed 0) and, where `main` (rank 0, as models/glm_image loads), the glyph encoder
    (seed 1) with ByT5's tokenizer and the VAE (seed 2); the VAE's config everywhere."""
    shapes, at = SCALES[scale], _place(device, dtype)
    modules = {"transformer": random_module(GlmImageTransformer2DModel, shapes["glm_dit"], at, seed=0),
               "text_encoder": None, "tokenizer": None, "vae": None,
               "vae_config": weights.empty_model(lambda: AutoencoderKL(**shapes["glm_vae"])).config}
    if main:
        tokenizer = ByT5Tokenizer()
        modules.update(text_encoder=random_module(lambda **c: T5EncoderModel(T5Config(vocab_size=len(tokenizer), **c)),
                                                  shapes["glyph"], at, seed=1),
                       tokenizer=tokenizer, vae=random_module(AutoencoderKL, shapes["glm_vae"], at, seed=2))
    return modules


def glm_image_ar(scale: str, device, dtype: torch.dtype):
    """(AR model, processor): bench/ar.py's decoder (full: hidden 4096, 40 layers, vocab 168064, vision vocab
    16512, random N(0, 0.02), seed AR_SEED; tiny: models/glm_image/tiny.py's) with the tiny GLM processor."""
    import ar as ar_bench  # bench/ar.py: on the path wherever this plugin is

    processor, tokenizer = glm_tiny._processor()
    model = ar_bench._build(scale, tokenizer, torch.device(device), dtype, AR_SEED)
    sample_random_ar(model.generation_config, model.config, tokenizer, scale)
    return model, processor


def sample_random_ar(gen, config, tokenizer, scale: str) -> None:
    """A random AR's generation config `gen`, in place: bench/ar.py's sampling at full size (the tiny AR carries its
    own), and the tokens past the DiT's codebook suppressed."""
    if scale != "tiny":
        gen.do_sample = True
        gen.temperature, gen.top_k, gen.top_p = AR_SAMPLING["temperature"], AR_SAMPLING["top_k"], AR_SAMPLING["top_p"]
        gen.bos_token_id = glm_tiny.IMAGE_START
        gen.eos_token_id = config.text_config.vision_vocab_size  # lm_head has vision_vocab_size outputs
        gen.pad_token_id = tokenizer.pad_token_id
    codebook = SCALES[scale]["glm_dit"]["prior_vq_quantizer_codebook_size"]
    vocab = config.text_config.vision_vocab_size
    gen.suppress_tokens = list(range(codebook, vocab)) if vocab > codebook else None


def load_zimage(ctx, *, scale: str) -> ZImage:
    modules = zimage_modules(scale, ctx.device, ctx.dtype, vae=ctx.is_main)
    zimage_stages.setup_transformer(ctx, modules["transformer"])
    model = ZImage(modules["transformer"], dict(zimage_tiny.SCHEDULER_CONFIG))
    model.vae = modules.get("vae")
    return model


def load_zimage_pipeline(ctx, *, scale: str) -> ZImage:
    """Every component: the DiT on every rank; text encoder, tokenizer and VAE on rank 0 (as models/zimage loads)."""
    modules = zimage_modules(scale, ctx.device, ctx.dtype, vae=ctx.is_main, text=ctx.is_main)
    zimage_stages.setup_transformer(ctx, modules["transformer"])
    return ZImage(scheduler_config=dict(zimage_tiny.SCHEDULER_CONFIG), **modules)


def load_glm_image(ctx, *, scale: str) -> GlmImage:
    """The DiT, glyph encoder and VAE that prepare/denoise/decode use; the AR model is benchmarked in bench/ar.py."""
    modules = glm_image_modules(scale, ctx.device, ctx.dtype, ctx.is_main)
    glm_model.setup_transformer(ctx, modules["transformer"])
    return GlmImage(**modules, scheduler_config=dict(GLM_SCHEDULER))


def load_glm_image_pipeline(ctx, *, scale: str, ar: str = "auto") -> GlmImage:
    """Every component: load_glm_image's on every rank; the AR model and its processor placed as models/glm_image
    places them (glm_model.ar_placement: sharded over the largest group of ranks it splits over, by default on
    several GPUs; else on rank 0), its decode step compiled."""
    model = load_glm_image(ctx, scale=scale)
    ar_model, processor = glm_image_ar(scale, ctx.device, ctx.dtype)
    ar_ranks, _ = glm_model.ar_placement(ar, ctx.device.type, ctx.comm.world_size, ar_model.config.text_config)
    model.ar_tensor_parallel = ar_ranks > 1
    in_ar = ctx.comm.make_group(ar_decode.TP_GROUP, range(ar_ranks)) if model.ar_tensor_parallel else ctx.is_main
    if in_ar:
        glm_model.attach_ar(ctx, model, ar_model, processor)
    return model


def _place(device, dtype: torch.dtype) -> SimpleNamespace:
    """What random_module reads of a StageContext, for building outside a worker."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype)


# Kernel families by name, first match wins (cuDNN's attention kernels also carry "sm90_"): NCCL, attention, GEMMs
# (cuBLAS/CUTLASS), inductor's fused Triton kernels, copies; the rest is "other" (eager element-wise kernels)
KERNEL_KINDS = {"nccl": ("nccl",), "attention": ("flash", "attention", "sdpa", "fmha"),
                "gemm": ("gemm", "nvjet", "cutlass", "xmma", "sm90_"), "triton": ("triton_",),
                "memcpy": ("memcpy", "memset")}


def kernel_kind(name: str) -> str:
    name = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS.items() if any(k in name for k in keys)), "other")


def profile(ctx, model, *, stage: str, inputs: dict) -> dict:
    """Run one stage under torch.profiler on every rank; each rank returns where its GPU time went (on CPU: its
    operators' own time): per kernel family, and its 30 costliest kernels (total ms, calls)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    torch.cuda.synchronize() if ctx.device.type == "cuda" else None
    with torch_profile(activities=activities) as prof:
        started = time.perf_counter()
        STAGES[stage].fn(ctx, model, **inputs)
        torch.cuda.synchronize() if ctx.device.type == "cuda" else None
        wall = time.perf_counter() - started
    us = (lambda e: e.self_device_time_total) if ctx.device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if us(e) > 0]
    kinds = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for e in events:
        kinds[kernel_kind(e.key)] += us(e) / 1e6
    top = sorted(events, key=lambda e: -us(e))[:30]
    return {"rank": ctx.comm.rank, "wall_s": wall, "device_busy_s": sum(kinds.values()),
            "kernels_s": {k: round(v, 5) for k, v in kinds.items()},
            "top_kernels": [{"name": e.key[:120], "kind": kernel_kind(e.key), "ms": round(us(e) / 1e3, 3),
                             "calls": e.count} for e in top]}


def timeline(ctx, model, *, stage: str, inputs: dict) -> dict:
    """Run one stage with CUDA events around every DiT call (model.predict), without a profiler and without
    synchronising inside the loop: how much of the stage's wall time the DiT calls take on the GPU, and where the
    rest goes (before the first call, between calls, after the last; before the first also as the host's own time,
    which tells a host that is late from a GPU that starts slowly), and the garbage collections that ran meanwhile
    (a rank that collects starts its DiT calls late and the others wait for it in the first all-to-all)."""
    marks: list[torch.cuda.Event] = []
    host_calls: list[float] = []  # perf_counter at each DiT call

    def timed(fn):
        def call(*args):
            host_calls.append(time.perf_counter())
            marks.append(_event())
            out = fn(*args)
            marks.append(_event())
            return out
        return call

    collections: list[tuple[int, float]] = []  # (generation, ms) of each garbage collection during the stage

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append((info["generation"], time.perf_counter()))
        else:
            generation, began = collections[-1]
            collections[-1] = (generation, (time.perf_counter() - began) * 1e3)

    original = model.predict
    model.predict = {k: timed(f) for k, f in original.items()} if isinstance(original, dict) else timed(original)
    torch.cuda.synchronize()
    gc.callbacks.append(on_gc)
    try:
        started, entry = time.perf_counter(), _event()
        STAGES[stage].fn(ctx, model, **inputs)
        done = _event()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    finally:
        gc.callbacks.remove(on_gc)
        model.predict = original
    forward = [marks[i].elapsed_time(marks[i + 1]) for i in range(0, len(marks), 2)]
    gaps = [marks[i].elapsed_time(marks[i + 1]) for i in range(1, len(marks) - 1, 2)]
    return {"rank": ctx.comm.rank, "stage_wall_ms": wall * 1e3, "forward_ms": forward, "gaps_ms": gaps,
            "before_first_ms": entry.elapsed_time(marks[0]), "host_before_first_ms": (host_calls[0] - started) * 1e3,
            "after_last_ms": marks[-1].elapsed_time(done),
            "gc_ms_by_generation": {g: sum(ms for gen, ms in collections if gen == g) for g in (0, 1, 2)},
            "gc_collections": len(collections)}


def _event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def attention_kernel(ctx, model, *, backend: str, stage: str, inputs: dict):
    """Run one stage with attention on another SDPA backend (bench/denoise.py's 1-GPU control). Compiled blocks and
    CUDA graphs fix the kernel when they are made, so both are made anew for it, and again afterwards; torch's
    compile caches are bypassed, as their keys do not hold the kernel choice (reusing them gave identical bits)."""
    _remake_compiled(model)
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)), torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            return STAGES[stage].fn(ctx, model, **inputs)
    finally:
        _remake_compiled(model)


def _remake_compiled(model) -> None:
    torch._dynamo.reset()
    calls = model.predict.values() if isinstance(model.predict, dict) else [model.predict]  # GLM: per branch
    for call in calls:
        if isinstance(call, GraphedCall):
            call.clear()


STAGES = {**models.STAGES, "bench.profile": Stage("bench.profile", Parallelism.EVERY_RANK, profile),
          "bench.timeline": Stage("bench.timeline", Parallelism.EVERY_RANK, timeline),
          "bench.attention_kernel": Stage("bench.attention_kernel", Parallelism.EVERY_RANK, attention_kernel)}
LOADERS = {**models.LOADERS, "zimage_random": Loader("zimage_random", load_zimage),
           "glm_image_random": Loader("glm_image_random", load_glm_image),
           "zimage_random_pipeline": Loader("zimage_random_pipeline", load_zimage_pipeline),
           "glm_image_random_pipeline": Loader("glm_image_random_pipeline", load_glm_image_pipeline)}
