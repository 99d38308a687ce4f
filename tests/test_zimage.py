"""Z-Image: the single-process stages equal diffusers' ZImagePipeline, and every parallel layout equals the
single-process run, at square, portrait, landscape and odd sizes, with and without guidance, batch 1 and 2."""
import itertools

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.models.zimage import pipeline as zimage
from comfyui_parallel_diffusion.parallel import Layout, LayoutError, LocalRunner
from comfyui_parallel_diffusion.parallel.group import WorkerGroup

# (height, width): 80x112 gives 35 image tokens, padded by Z-Image to 64, which 3 ranks do not divide.
SIZES = {"square": (64, 64), "portrait": (96, 48), "landscape": (48, 96), "odd": (80, 112)}
# The second prompt is long enough that the two captions pad to different lengths (uneven batch, masked).
PROMPTS = {1: ["a red cat"], 2: ["a red cat", "a very long and detailed prompt about a small dog " * 3]}
STEPS = 2
CASES = list(itertools.product(SIZES, (0.0, 3.0), (1, 2)))
PARALLEL_TOLERANCE = 1e-4


def _generate(runner, key, size, guidance, batch, seed=7):
    height, width = SIZES[size]
    return zimage.generate(runner, key, prompt=PROMPTS[batch], height=height, width=width, steps=STEPS,
                           guidance=guidance, seed=seed)


@pytest.fixture(scope="module")
def single(tiny_zimage):
    runner = LocalRunner(models)
    runner.load("z", "zimage", path=str(tiny_zimage))
    cache = {}

    def result(size, guidance, batch):
        if (size, guidance, batch) not in cache:
            cache[size, guidance, batch] = _generate(runner, "z", size, guidance, batch)
        return cache[size, guidance, batch]

    return result


@pytest.mark.parametrize("size,guidance", [("square", 0.0), ("landscape", 3.0), ("odd", 3.0)])
def test_single_process_equals_diffusers(tiny_zimage, single, size, guidance):
    height, width = SIZES[size]
    pipe = ZImagePipeline.from_pretrained(tiny_zimage, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    # diffusers rewrites a prompt list in place (chat template), so each call gets its own copy
    common = dict(height=height, width=width, num_inference_steps=STEPS, guidance_scale=guidance)
    ref_latents = pipe(list(PROMPTS[1]), **common, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    ref_image = pipe(list(PROMPTS[1]), **common, generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
    images, latents = single(size, guidance, 1)
    latent_err = (latents - ref_latents).abs().max().item()
    image_err = np.abs(images.numpy() - ref_image).max()
    print(f"{size} {height}x{width} guidance {guidance}: latents max|diff| {latent_err:.2e}, image {image_err:.2e}")
    assert latents.shape == ref_latents.shape
    assert latent_err <= 1e-5 and image_err <= 1e-5


def test_output_depends_on_seed_and_prompt(single, tiny_zimage):
    runner = LocalRunner(models)
    runner.load("z", "zimage", path=str(tiny_zimage))
    _, base = single("square", 0.0, 1)
    _, other_seed = _generate(runner, "z", "square", 0.0, 1, seed=8)
    _, other_prompt = zimage.generate(runner, "z", prompt="a blue house", height=64, width=64, steps=STEPS,
                                      guidance=0.0, seed=7)
    assert (base - other_seed).abs().max() > 1e-2
    assert (base - other_prompt).abs().max() > 1e-3


LAYOUTS = {
    "ulysses2": Layout.for_world(2),
    "ulysses3": Layout.for_world(3),
    "ulysses4 (30-head style padding: 3 heads on 4 ranks)": Layout.for_world(4),
    "cfg2": Layout.for_world(2, cfg=2),
    "cfg2 x ulysses2": Layout.for_world(4, cfg=2),
    "ulysses8 (3 heads padded to 8)": Layout.for_world(8),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_parallel_equals_single_process(tiny_zimage, single, name):
    layout = LAYOUTS[name]
    group = WorkerGroup(layout, "cpu", torch.float32)
    try:
        group.load("z", "zimage", path=str(tiny_zimage))
        worst = 0.0
        for size, guidance, batch in CASES:
            if layout.cfg > 1 and guidance == 0:
                continue  # no second branch to place: refused, see test_layout_errors
            images, latents = _generate(group, "z", size, guidance, batch)
            ref_images, ref_latents = single(size, guidance, batch)
            err = (latents - ref_latents).abs().max().item()
            worst = max(worst, err)
            assert err <= PARALLEL_TOLERANCE, f"{name} {size} guidance {guidance} batch {batch}: {err:.2e}"
            assert (images - ref_images).abs().max().item() <= 1e-3
        print(f"{name}: worst latents max|diff| over {len(CASES)} cases {worst:.2e}")
    finally:
        group.close()


def test_layout_errors(single):
    with pytest.raises(LayoutError, match="cfg degree 2 needs classifier-free guidance"):
        zimage.generate(LocalRunnerWithLayout(Layout.for_world(2, cfg=2)), "z", prompt="x", height=64, width=64,
                        steps=1, guidance=0.0, seed=0)
    with pytest.raises(ValueError, match="multiple of 16, got 72; use 64 or 80"):
        zimage.generate(LocalRunnerWithLayout(Layout()), "z", prompt="x", height=72, width=64, steps=1,
                        guidance=0.0, seed=0)
    with pytest.raises(LayoutError, match="only 0 CUDA GPU"):
        Layout.for_world(4).check_devices("cuda", 0)


class LocalRunnerWithLayout:
    """Input checks happen on the host before anything is sent: a runner that must never be reached."""

    def __init__(self, layout):
        self.layout = layout

    def run(self, *args, **kwargs):
        raise AssertionError("invalid input reached the runner")


def test_real_rotary_processor_equals_diffusers():
    """The processor the stages install gives diffusers' complex-number result, masked keys and all."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    from comfyui_parallel_diffusion.models.zimage.attention import RealRotaryAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16, qk_norm="rms_norm", bias=False, out_bias=False,
                     processor=ZSingleStreamAttnProcessor()).eval()
    x = torch.randn(2, 10, 64)
    freqs = torch.polar(torch.ones(2, 10, 8), torch.randn(2, 10, 8) * 5)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        expected = attn(x, attention_mask=mask, freqs_cis=freqs)
        attn.set_processor(RealRotaryAttnProcessor())
        got = attn(x, attention_mask=mask, freqs_cis=freqs)
    assert (got - expected).abs().max().item() <= 1e-6
