"""GLM-Image: the single-process stages equal diffusers' GlmImagePipeline, and every parallel layout equals the
single-process run: text-to-image and image-to-image (editing), square and non-square, with and without glyph
text, guidance on (two branches) and off. The AR stage runs on rank 0 only and every rank gets its tokens."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import GlmImagePipeline
from diffusers.image_processor import VaeImageProcessor
from dynamo_check import blocks_compiled_by_dynamo, graphs_made
from PIL import Image
from transformers import AutoImageProcessor, GlmImageImageProcessorPil
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.models.glm_image import latent_format
from comfyui_parallel_diffusion.models.glm_image import pipeline as glm
from comfyui_parallel_diffusion.models.glm_image import inputs, model, tiny
from comfyui_parallel_diffusion.parallel import Cancelled, Layout, LayoutError, LocalRunner
from comfyui_parallel_diffusion.parallel.executor import MainRankError
from comfyui_parallel_diffusion.parallel.group import WorkerError, WorkerGroup

STEPS = 2
SEED = 7
PARALLEL_TOLERANCE = 1e-4


def _image(height, width, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


# name -> generate() arguments. Glyph text is a quoted substring; the negative glyph prompt is always 1 token.
CASES = {
    "t2i square glyph": dict(prompt='a red "HELLO" sign on a door', height=64, width=64, guidance=1.5),
    "t2i portrait": dict(prompt="a cat in the snow", height=96, width=64, guidance=1.5),
    "t2i landscape glyph no-cfg": dict(prompt="a shop called 'OPEN'", height=64, width=96, guidance=1.0),
    "i2i landscape glyph": dict(prompt='make the sign say "SALE"', height=64, width=96, guidance=1.5,
                                images=[_image(64, 96, 1)]),
    "i2i portrait from square": dict(prompt="make it blue", height=96, width=64, guidance=1.5,
                                     images=[_image(64, 64, 2)]),
    # glyph text in one prompt only: the two glyph sequences differ in length (left-padded by diffusers)
    "t2i batch of 2": dict(prompt=['a "TWO" word sign', "a plain field"], height=64, width=64, guidance=1.5),
}


def _generate(runner, key, case, seed=SEED, **progress):
    return glm.generate(runner, key, steps=STEPS, seed=seed, **case, **progress)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local(tiny_glm_image):
    runner = LocalRunner(models)
    runner.load("g", "glm_image", path=tiny_glm_image)
    return runner


@pytest.fixture(scope="module")
def single(local):
    cache = {}

    def result(name):
        if name not in cache:
            cache[name] = _generate(local, "g", CASES[name])
        return cache[name]

    return result


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_glm_image):
    pipe = GlmImagePipeline.from_pretrained(tiny_glm_image, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    split_condition_features_per_image(pipe)
    # Our loader's PIL image processor: where torchvision is installed diffusers' pipeline would resize the
    # condition images with it instead, and their tokens would differ for that reason alone
    pipe.processor.image_processor = model.load_processor(tiny_glm_image).image_processor
    return pipe


def split_condition_features_per_image(pipe):
    """The minimal fix that lets diffusers 0.42.1 edit images with transformers 5.23.

    generate_prior_tokens concatenates the per-image (C, h, w) feature maps of the condition images along dim 0
    and hands the (n*C, h, w) result to get_image_tokens, which (transformers 5.23) iterates over its first
    dimension expecting one map per image, so it sees single channels and the VQ conv fails. Splitting the tensor
    back into per-image maps is exactly what the pipeline meant; generate() itself passes a list and is untouched."""
    ar = pipe.vision_language_encoder
    original = ar.get_image_tokens
    channels = ar.config.vq_config.latent_channels

    def get_image_tokens(hidden_states, image_grid_thw=None):
        if isinstance(hidden_states, torch.Tensor):
            hidden_states = list(hidden_states.split(channels, dim=0))
        return original(hidden_states, image_grid_thw)

    ar.get_image_tokens = get_image_tokens


def _diffusers(pipe, case):
    """diffusers' final latents (read at the last step) and its image, from one call."""
    final = {}

    def keep(pipeline, step, timestep, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    out = pipe(prompt=case["prompt"], image=case.get("images"), height=case["height"], width=case["width"],
               num_inference_steps=STEPS, guidance_scale=case["guidance"],
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", callback_on_step_end=keep)
    return out.images.permute(0, 2, 3, 1), final["latents"]


# -- the tiny model -----------------------------------------------------------------------------------------------

def test_tiny_model_keeps_the_real_geometry(diffusers_pipe):
    pipe = diffusers_pipe
    dit, ar = pipe.transformer.config, pipe.vision_language_encoder.config
    assert dit.num_attention_heads == 3  # not a power of two: Ulysses 2 and 4 pad heads
    assert (dit.patch_size, dit.in_channels, pipe.vae_scale_factor, pipe.vae.config.latent_channels) == (2, 16, 8, 16)
    assert ar.text_config.vision_vocab_size <= dit.prior_vq_quantizer_codebook_size
    assert ar.vq_config.num_embeddings <= dit.prior_vq_quantizer_codebook_size
    assert ar.text_config.eos_token_id >= ar.text_config.vision_vocab_size  # never sampled: grids are complete
    tok = pipe.processor.tokenizer
    assert tok.convert_ids_to_tokens(0) == "<|dit_token_0|>" and tok.bos_token == f"<|dit_token_{tiny.IMAGE_START}|>"
    assert len(set(pipe.vae.config.latents_std)) > 1  # de-normalisation is exercised


def test_building_again_is_a_no_op(tiny_glm_image):
    marker = f"{tiny_glm_image}/{tiny.MARKER}"
    before = open(marker).read()
    assert tiny.build_tiny_glm_image(tiny_glm_image) == tiny_glm_image
    assert open(marker).read() == before


# -- single process == diffusers ----------------------------------------------------------------------------------

def test_single_process_equals_diffusers(single, diffusers_pipe):
    for name, case in CASES.items():
        images, latents = single(name)
        ref_images, ref_latents = _diffusers(diffusers_pipe, case)
        latent_err = (latents - ref_latents).abs().max().item()
        image_err = (images - ref_images).abs().max().item()
        print(f"{name} {case['height']}x{case['width']}: latents max|diff| {latent_err:.2e}, image {image_err:.2e}")
        assert latents.shape == ref_latents.shape and images.shape == ref_images.shape
        assert latent_err <= 1e-5 and image_err <= 1e-5, name


def test_output_depends_on_seed_and_prompt(local, single):
    case = CASES["t2i portrait"]  # no glyph text: the prompt acts through the AR's prior tokens alone
    _, base = single("t2i portrait")
    _, other_seed = _generate(local, "g", case, seed=SEED + 1)
    _, other_prompt = _generate(local, "g", {**case, "prompt": "a dog on a beach"})
    assert (base - other_seed).abs().max() > 1e-2
    assert (base - other_prompt).abs().max() > 1e-2


def test_progress_and_cancel(local):
    case = CASES["t2i square glyph"]
    events = []
    glm.generate(local, "g", steps=STEPS, seed=SEED, **case, on_progress=lambda *e: events.append(e))
    tokens = [e for e in events if e[0] == "tokens"]
    steps = [e for e in events if e[0] == "step"]
    # 64x64: a 2x2 target grid after the 16x16 preview grid, then the end token
    assert tokens[-1] == ("tokens", 2 * 2 + 16 * 16 + 1, 2 * 2 + 16 * 16 + 1) and len(tokens) == tokens[-1][2]
    assert steps == [("step", i + 1, STEPS) for i in range(STEPS)]

    with pytest.raises(Cancelled) as stop:  # rank 0's AR stops between two tokens
        glm.generate(local, "g", steps=STEPS, seed=SEED, **case, on_progress=lambda *e: events.append(e),
                     should_cancel=lambda: len(events) > 300)
    assert 0 < stop.value.step < stop.value.total
    _, latents = glm.generate(local, "g", steps=STEPS, seed=SEED, **case)  # and the runner serves on
    assert torch.equal(latents, _generate(local, "g", case)[1])


def test_compiled_blocks_leave_editing_eager(local, single):
    """On CUDA the DiT's blocks are compiled (and its calls graphed); editing's condition KV cache is Python state
    that compiled code would freeze, so editing runs them eagerly. Compiled here by dynamo alone (exact on CPU):
    editing compiles nothing and equals the uncompiled run; text-to-image compiles and equals it too."""
    blocks = list(local.models["g"][1].transformer.transformer_blocks)
    with blocks_compiled_by_dynamo(blocks):
        for name, compiles in (("i2i landscape glyph", False), ("t2i square glyph", True)):
            before = graphs_made()
            images, latents = _generate(local, "g", CASES[name])
            assert (graphs_made() > before) == compiles, name
            assert torch.equal(latents, single(name)[1]) and torch.equal(images, single(name)[0]), name


def test_comfyui_image_tensors_are_condition_images(local, single):
    """ComfyUI hands images over as (B, H, W, 3) floats in [0, 1]: the same pixels as the PIL image."""
    case = CASES["i2i landscape glyph"]
    tensor = torch.tensor(np.array(case["images"][0]), dtype=torch.float32).unsqueeze(0) / 255
    _, latents = _generate(local, "g", {**case, "images": tensor})
    assert torch.equal(latents, single("i2i landscape glyph")[1])


def test_processor_folder_as_published_loads_pil_with_or_without_torchvision(tiny_glm_image):
    """The tiny processor folder is laid out as the published one: a flat preprocessor_config.json naming
    GlmImageImageProcessor, which transformers maps to its torchvision backend, GlmImageImageProcessorPil being the
    PIL one. transformers builds the torchvision class where torchvision is installed, else the PIL class; our
    loader gets the PIL class either way (the two resize differently), with the folder's settings."""
    folder = Path(tiny_glm_image) / "processor"
    config = json.loads((folder / "preprocessor_config.json").read_text())
    assert config == tiny.PREPROCESSOR_CONFIG and not (folder / "processor_config.json").exists()
    assert IMAGE_PROCESSOR_MAPPING_NAMES["glm_image"] == {"torchvision": config["image_processor_type"],
                                                          "pil": GlmImageImageProcessorPil.__name__}
    built = type(AutoImageProcessor.from_pretrained(folder, local_files_only=True)).__name__
    assert built == ("GlmImageImageProcessor" if is_torchvision_available() else "GlmImageImageProcessorPil")

    image_processor = model.load_processor(tiny_glm_image).image_processor
    assert type(image_processor) is GlmImageImageProcessorPil
    assert (image_processor.size.shortest_edge, image_processor.size.longest_edge) == (config["min_pixels"],
                                                                                       config["max_pixels"])
    for key in ("patch_size", "temporal_patch_size", "merge_size", "resample", "rescale_factor"):
        assert getattr(image_processor, key) == config[key], key
    assert list(image_processor.image_mean) == config["image_mean"]
    assert list(image_processor.image_std) == config["image_std"]


def test_comfyui_latents_are_the_vaes_raw_space(local, single):
    """The nodes' requests (latent_space="vae"): denoise gives diffusers' latents * latents_std + latents_mean,
    which the VAE decodes directly into the decode stage's image, the CLI's (diffusers' latents decoded)."""
    name = "i2i landscape glyph"
    case = CASES[name]
    images, latents = single(name)
    request = {"prompt": [case["prompt"]], "height": case["height"], "width": case["width"], "seed": SEED,
               "images": case["images"]}
    prior = local.run("glm_image.ar", "g", request)
    prepared = local.run("glm_image.prepare", "g", request)
    raw = local.run("glm_image.denoise", "g", {
        **prepared, "prior_token_ids": prior["prior_token_ids"],
        "condition_prior_token_ids": prior["condition_prior_token_ids"], "steps": STEPS,
        "guidance": case["guidance"], "latent_space": latent_format.VAE})

    vae = local.models["g"][1].vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    assert raw.dtype == torch.float32 and torch.equal(raw, latents * std + mean)
    with torch.no_grad():
        direct = VaeImageProcessor().postprocess(vae.decode(raw).sample, output_type="pt").permute(0, 2, 3, 1)
    decoded = local.run("glm_image.decode", "g", {"latents": raw, "latent_space": latent_format.VAE})
    assert torch.equal(decoded, direct) and torch.equal(decoded, images)
    with pytest.raises(MainRankError, match="latent_space must be one of"):
        local.run("glm_image.decode", "g", {"latents": raw, "latent_space": "comfyui"})


def test_input_errors():
    runner = RunnerThatMustNotRun(Layout())
    with pytest.raises(ValueError, match="multiple of 32 .*got 100; use 96 or 128"):
        glm.generate(runner, "g", prompt="x", height=100, width=64, steps=1, guidance=1.5, seed=0)
    with pytest.raises(ValueError, match="width must be a multiple of 32 .*got 16; use 32"):
        glm.generate(runner, "g", prompt="x", height=64, width=16, steps=1, guidance=1.5, seed=0)
    with pytest.raises(ValueError, match="reserves"):
        glm.generate(runner, "g", prompt="a <|image|> here", height=64, width=64, steps=1, guidance=1.5, seed=0)
    with pytest.raises(ValueError, match="must be a string"):
        glm.generate(runner, "g", prompt=[None], height=64, width=64, steps=1, guidance=1.5, seed=0)
    with pytest.raises(ValueError, match="no prompt given"):
        glm.generate(runner, "g", prompt=[], height=64, width=64, steps=1, guidance=1.5, seed=0)
    for bad, message in (
            (dict(height=4128), "height must be at most 4096, got 4128; use 4096 or less"),
            (dict(steps=0), "steps must be 1 or more, got 0; GLM-Image takes 50"),
            (dict(steps=-3), "steps must be 1 or more, got -3"),
            (dict(seed=2 ** 64), "seed must be from 0 to 18446744073709551615"),
            (dict(guidance=float("inf")), "guidance must be a finite number")):
        kwargs = {**dict(prompt="x", height=64, width=64, steps=1, guidance=1.5, seed=0), **bad}
        with pytest.raises(ValueError, match=message):
            glm.generate(runner, "g", **kwargs)
        kwargs["prompts"] = [kwargs.pop("prompt")]
        with pytest.raises(ValueError, match=message):
            inputs.check_inputs(**kwargs)
    # the nodes' queue-time check: linked inputs (None) pass, an empty prompt (the node's default) is a prompt
    inputs.check_inputs(prompts=None, height=None, width=64)
    inputs.check_inputs(prompts=[""], height=4096, width=32, steps=1, guidance=0.0, seed=2 ** 64 - 1)
    with pytest.raises(ValueError, match="reserves"):
        inputs.check_inputs(prompts=["<sop>"])
    with pytest.raises(ValueError, match="editing takes one prompt"):
        glm.generate(runner, "g", prompt=["a", "b"], images=[_image(64, 64, 0)], height=64, width=64, steps=1,
                     guidance=1.5, seed=0)
    with pytest.raises(LayoutError, match="cfg degree 2 needs classifier-free guidance"):
        glm.generate(RunnerThatMustNotRun(Layout.for_world(2, cfg=2)), "g", prompt="x", height=64, width=64,
                     steps=1, guidance=1.0, seed=0)


def test_an_empty_prompt_generates(local):
    """As diffusers takes it (the node's default prompt is empty): the AR samples from the bare chat template."""
    images, latents = glm.generate(local, "g", prompt="", height=64, width=64, steps=1, guidance=1.5, seed=0)
    assert latents.shape == (1, 16, 8, 8) and torch.isfinite(latents).all() and images.shape == (1, 64, 64, 3)


def test_condition_image_off_the_token_grid_is_refused_clearly(local):
    # 48x48: the AR's processor tokenizes it on a 2x2 grid (4x4 upsampled), the DiT's latent grid is 3x3
    with pytest.raises(MainRankError, match="condition image 0 is 48x48.*e.g. 64x64"):
        glm.generate(local, "g", prompt="edit", images=[_image(48, 48, 0)], height=64, width=64, steps=1,
                     guidance=1.5, seed=0)


def test_ar_placement_for_every_gpu_count():
    """The published AR (32 heads, 2 KV heads, FFN 13696) on 1-8 GPUs: tensor parallel over the largest group it
    splits over evenly, the rest of the GPUs left out and named; rank 0 alone when asked, or on the CPU."""
    from types import SimpleNamespace

    published = SimpleNamespace(num_attention_heads=32, num_key_value_heads=2, intermediate_size=13696)
    sizes = {gpus: model.ar_placement("auto", "cuda", gpus, published)[0] for gpus in range(1, 9)}
    assert sizes == {1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 4, 8: 8}
    assert "over GPUs 0-3, 4 of 6" in model.ar_placement("auto", "cuda", 6, published)[1]
    assert "GPUs 4-5 wait" in model.ar_placement("tensor_parallel", "cuda", 6, published)[1]
    assert "GPU 2 waits" in model.ar_placement("auto", "cuda", 3, published)[1]
    assert model.ar_placement("rank0", "cuda", 6, published)[0] == 1
    assert model.ar_placement("auto", "cpu", 6, published)[0] == 1
    assert model.ar_placement("tensor_parallel", "cpu", 6, published)[0] == 4
    with pytest.raises(ValueError, match="one of auto, rank0, tensor_parallel"):
        model.ar_placement("tp", "cuda", 2, published)


class RunnerThatMustNotRun:
    """Input checks happen on the host before anything is sent."""

    def __init__(self, layout):
        self.layout = layout

    def run(self, *args, **kwargs):
        raise AssertionError("invalid input reached the runner")


# -- N ranks == 1 rank ----------------------------------------------------------------------------------------------

LAYOUTS = {
    "ulysses2 (3 heads padded to 4)": Layout.for_world(2),
    "ulysses3": Layout.for_world(3),
    "ulysses4 (3 heads padded to 4)": Layout.for_world(4),
    "cfg2 x ulysses2": Layout.for_world(4, cfg=2),
    "cfg2 x ulysses4 (8 ranks)": Layout.for_world(8, cfg=2),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_parallel_equals_single_process(tiny_glm_image, single, name):
    layout = LAYOUTS[name]
    group = WorkerGroup(layout, "cpu", torch.float32)
    try:
        group.load("g", "glm_image", path=tiny_glm_image)
        worst = 0.0
        for case_name, case in CASES.items():
            if layout.cfg > 1 and case["guidance"] <= 1:
                continue  # no second branch to place: refused (test_input_errors)
            images, latents = _generate(group, "g", case)
            ref_images, ref_latents = single(case_name)
            err = (latents - ref_latents).abs().max().item()
            worst = max(worst, err)
            print(f"{name} {case_name}: latents max|diff| {err:.2e}")
            assert err <= PARALLEL_TOLERANCE, f"{name} {case_name}: {err:.2e}"
            assert (images - ref_images).abs().max().item() <= 1e-3
        print(f"{name}: worst latents max|diff| {worst:.2e}")

        # The AR ran on rank 0 alone (the others hold no AR model) and every rank holds its very tokens.
        case = CASES["i2i landscape glyph"]
        per_rank = group.run("glm_image.ar", "g", {"prompt": case["prompt"], "height": case["height"],
                                                   "width": case["width"], "seed": SEED, "images": case["images"]},
                             collect="all")
        assert len(per_rank) == layout.world_size
        for result in per_rank:
            assert result["sampled_on_rank"] == 0
            assert torch.equal(result["prior_token_ids"], per_rank[0]["prior_token_ids"])
            assert all(torch.equal(a, b) for a, b in zip(result["condition_prior_token_ids"],
                                                          per_rank[0]["condition_prior_token_ids"]))
        assert per_rank[0]["prior_token_ids"].shape == (1, (64 // 16) * (96 // 16))

        _cancel_while_sampling_stops_every_rank(group, single)
    finally:
        group.close()


def _cancel_while_sampling_stops_every_rank(group, single):
    """A cancel while the AR samples stops every rank, and the group serves the next request."""
    events = []
    with pytest.raises(Cancelled) as stop:
        _generate(group, "g", CASES["t2i portrait"], on_progress=lambda *e: events.append(e),
                  should_cancel=lambda: bool(events))
    assert events[0][0] == "tokens" and stop.value.total == events[0][2]  # stopped in the AR, not in the DiT
    assert stop.value.step < stop.value.total
    _, latents = _generate(group, "g", CASES["t2i portrait"])
    assert (latents - single("t2i portrait")[1]).abs().max().item() <= PARALLEL_TOLERANCE


TENSOR_PARALLEL_LAYOUTS = {  # the tiny AR: 4 heads, 2 KV heads, FFN 64 -> it splits over 1, 2 or 4 ranks
    "2 ranks (4 heads, 2 KV heads)": Layout.for_world(2),
    "cfg2 x ulysses2, AR over 4 ranks (KV heads replicated)": Layout.for_world(4, cfg=2),
    "3 ranks, AR over ranks 0-1": Layout.for_world(3),
    "6 ranks, AR over ranks 0-3": Layout.for_world(6),
}


@pytest.mark.parametrize("name", TENSOR_PARALLEL_LAYOUTS)
def test_tensor_parallel_ar_equals_single_process(tiny_glm_image, local, single, name):
    """The AR decoder sharded over the largest group of ranks it splits over evenly (every rank for 2 and 4),
    rank 0 deciding each token: the same tokens and images as one process, for every case, and every rank gets
    the tokens; a cancel stops all ranks together and the group goes on."""
    layout = TENSOR_PARALLEL_LAYOUTS[name]
    group = WorkerGroup(layout, "cpu", torch.float32)
    try:
        group.load("g", "glm_image", path=tiny_glm_image, ar="tensor_parallel")
        for case_name, case in CASES.items():
            if layout.cfg > 1 and case["guidance"] <= 1:
                continue
            images, latents = _generate(group, "g", case)
            ref_images, ref_latents = single(case_name)
            assert (latents - ref_latents).abs().max().item() <= PARALLEL_TOLERANCE, case_name
            assert (images - ref_images).abs().max().item() <= 1e-3, case_name
        case = CASES["t2i batch of 2"]
        request = {"prompt": case["prompt"], "height": 64, "width": 64, "seed": SEED, "images": None}
        per_rank = group.run("glm_image.ar", "g", request, collect="all")
        reference = local.run("glm_image.ar", "g", request)["prior_token_ids"]
        for result in per_rank:
            assert torch.equal(result["prior_token_ids"], reference)
        # A request every rank refuses alike is one readable error, and the group stays up.
        with pytest.raises(WorkerError, match="condition image 0 is 48x48"):
            glm.generate(group, "g", prompt="edit", images=[_image(48, 48, 0)], height=64, width=64, steps=1,
                         guidance=1.5, seed=0)
        _cancel_while_sampling_stops_every_rank(group, single)
    finally:
        group.close()


def test_attention_processor_equals_diffusers():
    """The processor the stages install (its attention call is the one sequence parallelism takes over) gives
    diffusers' GlmImageAttnProcessor's result exactly: glyph mask, image rotary tables, and the condition-image KV
    cache written, read and skipped. If diffusers changes its processor, this fails."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor, GlmImageLayerKVCache

    from comfyui_parallel_diffusion.models.glm_image.attention import SequenceParallelAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, out_dim=32, bias=True, qk_norm="layer_norm",
                     elementwise_affine=False, eps=1e-5, processor=GlmImageAttnProcessor()).eval()
    text, image = torch.randn(2, 5, 32), torch.randn(2, 12, 32)
    rope = (torch.randn(12, 8), torch.randn(12, 8))
    mask = torch.ones(2, 5)
    mask[1, :2] = 0
    condition = torch.randn(1, 12, 32)

    def run():
        cache = GlmImageLayerKVCache()
        cache.mode = "write"
        outs = [attn(condition, encoder_hidden_states=text[:1, :0], image_rotary_emb=rope, kv_cache=cache)]
        for mode in ("read", "skip"):
            cache.mode = mode
            outs.append(attn(image, encoder_hidden_states=text, image_rotary_emb=rope, kv_cache=cache))
        outs.append(attn(image, encoder_hidden_states=text, attention_mask=mask, image_rotary_emb=rope))
        return [t for pair in outs for t in pair]

    with torch.no_grad():
        expected = run()
        attn.set_processor(SequenceParallelAttnProcessor())
        got = run()
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_processors_are_replaced_or_refused(tiny_glm_image):
    """Every attention module of the DiT gets the project's processor; one holding a processor the project does not
    follow is refused, not left to attend over its own shard only."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from comfyui_parallel_diffusion.models import loading
    from comfyui_parallel_diffusion.models.glm_image.attention import (SequenceParallelAttnProcessor,
                                                                      use_sequence_parallel_attention)

    transformer = loading.load_component(tiny_glm_image, "transformer", torch.float32, torch.device("cpu"))
    use_sequence_parallel_attention(transformer)
    processors = [b.attn1.processor for b in transformer.transformer_blocks]
    assert processors and all(isinstance(p, SequenceParallelAttnProcessor) for p in processors)
    transformer.transformer_blocks[0].attn1.set_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="AttnProcessor2_0"):
        use_sequence_parallel_attention(transformer)


# -- offload: the AR and the DiT take turns on the GPUs that hold both -------------------------------------------

@pytest.mark.parametrize("ranks, ar", [(1, "auto"), (2, "rank0"), (2, "tensor_parallel"), (3, "tensor_parallel")])
def test_offload_is_bit_identical_to_resident_weights(tiny_glm_image, ranks, ar):
    """Each case runs the AR then the DiT, so the modules go to the host and back every time; editing too (the
    condition images' features from the AR, their KV cache in the DiT). Tensor parallel, the AR ranks' DiT comes
    back from one host copy spread over them (3 ranks: ranks 0-1 offload, rank 2 keeps its DiT)."""
    runner = LocalRunner(models) if ranks == 1 else WorkerGroup(Layout.for_world(ranks), "cpu", torch.float32)
    try:
        runner.load("resident", "glm_image", path=tiny_glm_image, ar=ar, offload="resident")
        runner.load("offload", "glm_image", path=tiny_glm_image, ar=ar, offload="offload")
        for case in ("t2i batch of 2", "i2i landscape glyph"):
            resident = _generate(runner, "resident", CASES[case])
            offloaded = _generate(runner, "offload", CASES[case])
            assert torch.equal(offloaded[1], resident[1]) and torch.equal(offloaded[0], resident[0]), case
        if ranks == 1:
            model = runner.models["offload"][1]
            assert all(p.is_meta for p in model.vision_language_encoder.parameters())
            assert not any(p.is_meta for p in model.transformer.parameters())
    finally:
        runner.close()


def test_the_ar_samples_with_its_checkpoints_generation_config(tiny_glm_image, tmp_path):
    """As from_pretrained: the folder's generation_config.json (sampling, suppressed tokens) wins over the defaults
    a model built from its config gets; the real checkpoint's sampling settings live there."""
    from transformers import GenerationConfig, GlmImageForConditionalGeneration

    from comfyui_parallel_diffusion.models import loading

    folder = tmp_path / "GLM-Image"
    shutil.copytree(tiny_glm_image, folder)
    settings = folder / "vision_language_encoder" / "generation_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "temperature": 0.7, "top_k": 7,
                                    "suppress_tokens": [1, 2, 3]}))
    loaded = loading.load_component(folder, "vision_language_encoder", torch.float32, "cpu").generation_config
    reference = GlmImageForConditionalGeneration.from_pretrained(folder / "vision_language_encoder").generation_config
    assert (loaded.temperature, loaded.top_k, loaded.suppress_tokens) == (0.7, 7, [1, 2, 3])
    assert loaded.to_diff_dict() == reference.to_diff_dict() == GenerationConfig.from_pretrained(
        folder / "vision_language_encoder").to_diff_dict()
