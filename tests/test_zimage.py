"""Z-Image: the single-process stages equal diffusers' ZImagePipeline, and every parallel layout equals the
single-process run, at square, portrait, landscape and odd sizes, with and without guidance, batch 1 and 2."""
import itertools

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.models.zimage import latent_format, stages
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


BAD_VALUES = [  # (a value of a request, what the refusal says would work)
    (dict(steps=-1), "steps must be 1 or more, got -1; Z-Image-Turbo takes 8"),
    (dict(steps=0), "steps must be 1 or more, got 0"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(seed=2 ** 64), r"seed must be from 0 to 18446744073709551615, got 18446744073709551616; any integer"),
    (dict(seed=-1), "seed must be from 0 to"),
    (dict(height=8192), "height must be at most 4096, got 8192; use 4096 or less"),
    (dict(width=4112), "width must be at most 4096"),
    (dict(width=8), "width must be a multiple of 16, got 8; use 16"),
    (dict(height=64.0), "height must be an integer"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(guidance=-1.0), "guidance must be 0.0 or more"),
    (dict(prompt=[]), "one or more prompts"),
    (dict(prompt=[None]), "prompts as strings"),
]


@pytest.mark.parametrize("bad, message", BAD_VALUES)
def test_bad_values_are_refused_before_the_workers(bad, message):
    """Each bad value is refused by generate() before anything is sent (negative steps or a seed of 2**64 failed
    in a stage every rank runs, restarting the group), and by check_inputs, which the CLI and the nodes call."""
    kwargs = {**dict(prompt="x", height=64, width=64, steps=1, guidance=0.0, seed=0), **bad}
    with pytest.raises(ValueError, match=message):
        zimage.generate(LocalRunnerWithLayout(Layout.for_world(2)), "z", **kwargs)
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=message):
        stages.check_inputs(prompts=[prompt] if isinstance(prompt, str) else prompt, **kwargs)


def test_check_inputs_takes_unknown_values_as_fine():
    """A node input linked to another node's output is None at queue time: not checked there (at run time it is)."""
    stages.check_inputs()
    stages.check_inputs(height=None, width=64, strength=0.5, has_init_latents=None)
    stages.check_inputs(prompts=[""], height=4096, width=16, steps=1, guidance=0.0, seed=2 ** 64 - 1, strength=1.0,
                        has_init_latents=False)
    with pytest.raises(ValueError, match="denoise 0.5 needs an input latent"):
        stages.check_inputs(strength=0.5, has_init_latents=False)
    with pytest.raises(ValueError, match="denoise must be above 0 and at most 1, got 0.0"):
        stages.check_inputs(strength=0.0)


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


# -- image-to-image and ComfyUI's latent space ----------------------------------------------------------------------

IMG2IMG_STEPS = 4  # at strength 0.6 the schedule starts at its second step (diffusers' get_timesteps); 2 steps would not
STRENGTH = 0.6
IMG2IMG_CASES = [("square", 0.0, 1), ("odd", 3.0, 2)]  # batch 2 from one init latent, repeated as diffusers does


def _init_latents(size, batch=1):
    height, width = SIZES[size]
    return torch.randn(batch, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(3))


def _img2img(runner, key, size, guidance, batch, strength=STRENGTH, seed=7):
    height, width = SIZES[size]
    return zimage.generate(runner, key, prompt=PROMPTS[batch], height=height, width=width, steps=IMG2IMG_STEPS,
                           guidance=guidance, seed=seed, init_latents=_init_latents(size), strength=strength)


@pytest.fixture(scope="module")
def single_img2img(tiny_zimage):
    runner = LocalRunner(models)
    runner.load("z", "zimage", path=str(tiny_zimage))
    cache = {}

    def result(size, guidance, batch):
        if (size, guidance, batch) not in cache:
            cache[size, guidance, batch] = _img2img(runner, "z", size, guidance, batch)
        return cache[size, guidance, batch]

    return result


@pytest.mark.parametrize("size,guidance", [("square", 0.0), ("landscape", 3.0)])
def test_img2img_equals_diffusers(tiny_zimage, single_img2img, size, guidance):
    from diffusers import ZImageImg2ImgPipeline
    from diffusers.image_processor import VaeImageProcessor

    height, width = SIZES[size]
    pipe = ZImageImg2ImgPipeline.from_pretrained(tiny_zimage, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    # Latents as its `image`, used as they are (no VAE encode, which would draw from the generator first): its
    # processor passes through only tensors with vae_latent_channels channels
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2, vae_latent_channels=16)
    common = dict(image=_init_latents(size), strength=STRENGTH, height=height, width=width,
                  num_inference_steps=IMG2IMG_STEPS, guidance_scale=guidance)
    ref_latents = pipe(list(PROMPTS[1]), **common, generator=torch.Generator("cpu").manual_seed(7),
                       output_type="latent").images
    ref_image = pipe(list(PROMPTS[1]), **common, generator=torch.Generator("cpu").manual_seed(7),
                     output_type="np").images
    images, latents = single_img2img(size, guidance, 1)
    latent_err = (latents - ref_latents).abs().max().item()
    image_err = np.abs(images.numpy() - ref_image).max()
    print(f"img2img {size} {height}x{width} guidance {guidance}: latents max|diff| {latent_err:.2e}, "
          f"image {image_err:.2e}")
    assert latents.shape == ref_latents.shape
    assert latent_err <= 1e-5 and image_err <= 1e-5


@pytest.mark.parametrize("ranks", [2, 3])
def test_img2img_parallel_equals_single_process(tiny_zimage, single_img2img, ranks):
    group = WorkerGroup(Layout.for_world(ranks), "cpu", torch.float32)
    try:
        group.load("z", "zimage", path=str(tiny_zimage))
        for size, guidance, batch in IMG2IMG_CASES:
            images, latents = _img2img(group, "z", size, guidance, batch)
            ref_images, ref_latents = single_img2img(size, guidance, batch)
            err = (latents - ref_latents).abs().max().item()
            print(f"img2img {ranks} ranks {size} guidance {guidance} batch {batch}: latents max|diff| {err:.2e}")
            assert err <= PARALLEL_TOLERANCE
            assert (images - ref_images).abs().max().item() <= 1e-3
    finally:
        group.close()


def test_full_denoise_ignores_the_init_latents(tiny_zimage, single_img2img):
    """Strength 1 starts at sigma 1, where the noise replaces the latent (diffusers and KSampler): the latent gives
    only the size and batch, and the result is text-to-image's with the same seed."""
    runner = LocalRunner(models)
    runner.load("z", "zimage", path=str(tiny_zimage))
    kwargs = dict(prompt=PROMPTS[1], height=64, width=64, steps=IMG2IMG_STEPS, guidance=0.0, seed=7)
    _, text_to_image = zimage.generate(runner, "z", **kwargs)
    _, full = zimage.generate(runner, "z", **kwargs, init_latents=_init_latents("square"), strength=1.0)
    assert torch.equal(full, text_to_image)
    _, from_latent = single_img2img("square", 0.0, 1)
    assert (from_latent - text_to_image).abs().max() > 1e-2  # at 0.6 the init latents do count


def test_img2img_input_errors():
    runner = LocalRunnerWithLayout(Layout())
    kwargs = dict(prompt="x", height=64, width=64, steps=4, guidance=0.0, seed=0)
    with pytest.raises(ValueError, match="denoise must be above 0 and at most 1, got 0.0"):
        zimage.generate(runner, "z", **kwargs, init_latents=_init_latents("square"), strength=0.0)
    with pytest.raises(ValueError, match="denoise 0.5 needs an input latent"):
        zimage.generate(runner, "z", **kwargs, strength=0.5)
    with pytest.raises(ValueError, match="do not fit 1 prompts at 64x64"):
        zimage.generate(runner, "z", **kwargs, init_latents=_init_latents("landscape"), strength=0.5)
    with pytest.raises(ValueError, match=r"72x64 pixels \(9x8 in latent space\).*got 72; use 64 or 80"):
        stages.latent_image_size(torch.zeros(1, 16, 8, 9))
    with pytest.raises(ValueError, match="16 channels"):
        stages.latent_image_size(torch.zeros(1, 4, 8, 8))


def test_comfy_latent_format():
    """ComfyUI's Flux process_in / process_out, operation for operation; the round trip within float32 rounding
    (not bit-exact: x / 0.3611 + 0.1159 rounds to float32 before it is undone)."""
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0)) * 2
    assert torch.equal(latent_format.to_comfy(x), (x / 0.3611) + 0.1159)
    assert torch.equal(latent_format.from_comfy(x), (x - 0.1159) * 0.3611)
    eps = torch.finfo(torch.float32).eps
    assert (latent_format.from_comfy(latent_format.to_comfy(x)) - x).abs().max().item() <= 4 * eps * x.abs().max()
    assert (latent_format.to_comfy(latent_format.from_comfy(x)) - x).abs().max().item() <= 4 * eps * x.abs().max()
    # KSampler's start: an empty latent stays zero (and gets 16 channels, as EmptyLatentImage's 4 do in ComfyUI)
    assert torch.equal(latent_format.init_latents_from_comfy(torch.zeros(1, 4, 8, 8)), torch.zeros(1, 16, 8, 8))
    assert torch.equal(latent_format.init_latents_from_comfy(x), latent_format.from_comfy(x))


# -- offload: the text encoder and the DiT take turns on rank 0's device ------------------------------------------

@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_offload_is_bit_identical_to_resident_weights(tiny_zimage, ranks):
    """Two prompts, so each of rank 0's modules goes to the host and back twice; with guidance (negative prompts
    encoded too) and without."""
    runner = LocalRunner(models) if ranks == 1 else WorkerGroup(Layout.for_world(ranks), "cpu", torch.float32)
    try:
        runner.load("resident", "zimage", path=str(tiny_zimage), offload="resident")
        runner.load("offload", "zimage", path=str(tiny_zimage), offload="offload")
        for size, guidance, batch in [("square", 0.0, 1), ("odd", 3.0, 2)]:
            resident = _generate(runner, "resident", size, guidance, batch)
            offloaded = _generate(runner, "offload", size, guidance, batch)
            assert torch.equal(offloaded[1], resident[1]) and torch.equal(offloaded[0], resident[0])
        if ranks == 1:
            model = runner.models["offload"][1]
            assert all(p.is_meta for p in model.text_encoder.parameters())  # the last stage run was the DiT's
            assert not any(p.is_meta for p in model.transformer.parameters())
            assert not any(p.is_meta for p in runner.models["resident"][1].text_encoder.parameters())
    finally:
        runner.close()
