"""Z-Image's DiT served to ComfyUI's samplers (models/zimage/comfyui_model.py), without ComfyUI: the predict stage
returns what ComfyUI's model output is (diffusers' noise_pred at time 1 - sigma), equal on 1, 2 and 3 ranks and
with cfg-parallel; a LoRA given as ComfyUI's patches of its NextDiT weights equals merging it into those weights;
captions and LoRA factors are sent once. tests/test_comfyui_drop_in.py runs the same through KSampler in a real
ComfyUI."""
import os
import sys

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfyui_layout  # noqa: E402

from comfyui_parallel_diffusion import models  # noqa: E402
from comfyui_parallel_diffusion.models.zimage.comfyui_model import DiTClient, LoRAPatch  # noqa: E402
from comfyui_parallel_diffusion.parallel import Layout, LocalRunner  # noqa: E402
from comfyui_parallel_diffusion.parallel.group import WorkerGroup  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARALLEL_TOLERANCE = 1e-4  # as tests/test_zimage.py: sharded attention sums in another order
LORA_TOLERANCE = 2e-5  # unmerged (W x + s up(down x)) against merged ((W + s up down) x): rounding only
SIZES = {"square": (8, 8), "portrait": (12, 6), "odd": (10, 14)}  # latent (height, width): 64x64, 48x96, 80x112


@pytest.fixture(scope="module")
def dit_file(tiny_zimage, tmp_path_factory):
    """The tiny Z-Image's DiT as ComfyUI's diffusion model file (fp32)."""
    path = tmp_path_factory.mktemp("drop_in") / "z_image_tiny.safetensors"
    sd = load_file(tiny_zimage / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(comfyui_layout.comfyui_transformer_state_dict(sd), path)
    return str(path)


def client_for(runner, dit_file, key="dit") -> DiTClient:
    runner.load(key, "zimage_dit", transformer=dit_file)
    return DiTClient(lambda stage, inputs: runner.run(stage, key, inputs))


def recording_client(runner, dit_file) -> tuple[DiTClient, list[dict]]:
    """A client whose every request is also kept, to see what travelled."""
    client, sent = client_for(runner, dit_file), []
    run = client.run
    client.run = lambda stage, request: sent.append(request) or run(stage, request)
    return client, sent


def inputs(size, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *size, generator=gen)
    sigma = torch.full((batch,), 0.75)
    cond = [torch.randn(7, 48, generator=gen)] * batch
    uncond = [torch.randn(3, 48, generator=gen)] * batch
    return x, sigma, cond, uncond


def reference(dit_file, x, sigma, captions, comfy_sd=None):
    """-DiT(x, 1 - sigma): diffusers' noise_pred, which ComfyUI's NextDiT returns, from the file's own weights
    (or from a patched copy of them, comfy_sd)."""
    sd = convert_z_image_transformer_checkpoint_to_diffusers(dict(comfy_sd or load_file(dit_file)))
    from comfyui_parallel_diffusion.models.zimage.tiny import TRANSFORMER_CONFIG

    model = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
    model.load_state_dict(sd)
    with torch.no_grad():
        out = model(list(x.unsqueeze(2).unbind(0)), 1 - sigma, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


@pytest.fixture(scope="module")
def single_runner(dit_file):
    runner = LocalRunner(models)
    runner.load("dit", "zimage_dit", transformer=dit_file)
    return runner


@pytest.fixture(scope="module")
def single(single_runner, dit_file):
    return client_for(single_runner, dit_file)


def denoise_request(lora):
    from comfyui_parallel_diffusion.models.zimage.comfyui_model import lora_factors

    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, 12, 6, generator=gen)
    return {"latents": latents, "prompt_embeds": [torch.randn(7, 48, generator=gen)],
            "negative_prompt_embeds": [torch.randn(3, 48, generator=gen)], "steps": 2, "guidance": 1.5,
            "lora": lora_factors(lora)}


@pytest.mark.parametrize("size", SIZES)
def test_predict_equals_the_dit(dit_file, single, size):
    x, sigma, cond, uncond = inputs(SIZES[size])
    pos, neg = single.predict(x, sigma, [cond, uncond], [])
    assert (pos - reference(dit_file, x, sigma, cond)).abs().max() <= 1e-5
    assert (neg - reference(dit_file, x, sigma, uncond)).abs().max() <= 1e-5
    (alone,) = single.predict(x, sigma, [cond], [])
    assert (alone - pos).abs().max() <= 1e-5  # batched with the negative or not


def lora_patches(dit_file, strength: float) -> list[LoRAPatch]:
    """LoRA patches as ComfyUI's loaders leave them: a kohya-style LoRA of a fused qkv weight, diffusers-style
    to_q / to_v ones (offsets into qkv), an output projection, a feed-forward and a final-layer weight."""
    sd = load_file(dit_file)
    gen = torch.Generator().manual_seed(3)
    dim = sd["layers.0.attention.out.weight"].shape[0]
    patches = []

    def add(key, offset=None, rank=4, alpha=2.0):
        rows = sd[key].shape[0]
        count = offset[1] if offset else rows
        up = torch.randn(count, rank, generator=gen) * 0.3
        down = torch.randn(rank, sd[key].shape[1], generator=gen) * 0.3
        patches.append(LoRAPatch(key, rows, offset, up, down, strength * alpha / rank))

    add("layers.0.attention.qkv.weight")
    add("layers.1.attention.qkv.weight", (0, dim))
    add("layers.1.attention.qkv.weight", (2 * dim, dim), rank=2, alpha=1.0)
    add("noise_refiner.0.attention.out.weight")
    add("layers.1.feed_forward.w2.weight")
    add("final_layer.linear.weight")
    return patches


def merged(dit_file, patches: list[LoRAPatch]) -> dict[str, torch.Tensor]:
    """The file's weights with each patch merged as ComfyUI's LoRA adapter does: W[rows] += scale * up @ down."""
    sd = load_file(dit_file)
    for p in patches:
        start, count = p.offset or (0, p.rows)
        sd[p.key][start:start + count] += p.scale * (p.up @ p.down)
    return sd


def test_lora_equals_merging_it_and_a_new_strength_sends_only_scales(dit_file):
    runner = LocalRunner(models)
    client, sent = recording_client(runner, dit_file)
    x, sigma, cond, uncond = inputs(SIZES["portrait"], batch=2)
    (base,) = client.predict(x, sigma, [cond], [])
    for strength in (0.7, -0.4):
        patches = lora_patches(dit_file, strength)
        (out,) = client.predict(x, sigma, [cond], patches)
        ref = reference(dit_file, x, sigma, cond, merged(dit_file, patches))
        err = (out - ref).abs().max().item()
        print(f"strength {strength}: LoRA vs merged max|diff| {err:.2e}, LoRA changes it by "
              f"{(out - base).abs().max().item():.2e}")
        assert err <= LORA_TOLERANCE
        assert (out - base).abs().max() > 1e-2  # the LoRA is not ignored
    assert sent[1]["lora_factors"] is not None and sent[1]["captions"] == {}
    # the same LoRA files at another strength: only the scales travel (lora_patches draws the same factors, but
    # as new tensors; ComfyUI's loaders keep the loaded LoRA's tensors, so give the client the same ones)
    patches = lora_patches(dit_file, 0.7)
    client.predict(x, sigma, [cond], patches)
    sent.clear()
    rescaled = [LoRAPatch(p.key, p.rows, p.offset, p.up, p.down, p.scale * 0.5) for p in patches]
    (out,) = client.predict(x, sigma, [cond], rescaled)
    assert sent[0]["lora_factors"] is None and sent[0]["lora_scales"] is not None
    assert (out - reference(dit_file, x, sigma, cond, merged(dit_file, rescaled))).abs().max() <= LORA_TOLERANCE
    (without,) = client.predict(x, sigma, [cond], [])
    assert torch.equal(without, base)  # removing the LoRA gives the base weights' output exactly


def test_captions_are_sent_once_and_a_lost_state_is_sent_again(dit_file):
    runner = LocalRunner(models)
    client, sent = recording_client(runner, dit_file)
    x, sigma, cond, uncond = inputs(SIZES["square"])
    first = client.predict(x, sigma, [cond, uncond], [])
    second = client.predict(x, sigma, [cond, uncond], [])
    assert len(sent[0]["captions"]) == 2 and sent[1]["captions"] == {}
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    cond[0].mul_(2)  # the host changes its tensor in place: a new caption, which must travel
    changed = client.predict(x, sigma, [cond, uncond], [])
    assert list(sent[2]["captions"]) == [2] and torch.equal(sent[2]["captions"][2], cond[0])
    assert not torch.equal(changed[0], first[0])
    cond[0].div_(2)
    client.predict(x, sigma, [cond, uncond], [])
    assert sent[3]["captions"] == {}  # the original is still known
    sent[:] = sent[:2]
    runner.unload("dit")  # the workers' model and state gone, as after a group restart
    runner.load("dit", "zimage_dit", transformer=dit_file)
    again = client.predict(x, sigma, [cond, uncond], [])
    assert [r["reset"] for r in sent[2:]] == [False, True]  # refused as MISSING, then everything sent again
    assert all(torch.equal(a, b) for a, b in zip(first, again))


LAYOUTS = {"ulysses2": Layout.for_world(2), "ulysses3": Layout.for_world(3), "cfg2": Layout.for_world(2, cfg=2)}


@pytest.mark.parametrize("name", LAYOUTS)
def test_parallel_predict_equals_single_process(dit_file, single, single_runner, name):
    group = WorkerGroup(LAYOUTS[name], "cpu", torch.float32)
    try:
        client = client_for(group, dit_file)
        patches = lora_patches(dit_file, 0.7)
        worst = 0.0
        for size in SIZES.values():
            x, sigma, cond, uncond = inputs(size, batch=2 if size == SIZES["odd"] else 1)
            for branches, lora in (([cond, uncond], []), ([cond], []), ([cond, uncond], patches)):
                ours = client.predict(x, sigma, branches, lora)
                ref = single.predict(x, sigma, branches, lora)
                err = max((a - b).abs().max().item() for a, b in zip(ours, ref))
                worst = max(worst, err)
                assert err <= PARALLEL_TOLERANCE, (name, size, len(branches), bool(lora), err)
        request = denoise_request(patches)  # our own Denoise with a LoRA
        err = (group.run("zimage.denoise", "dit", request) - single_runner.run("zimage.denoise", "dit", request))
        worst = max(worst, err.abs().max().item())
        assert err.abs().max() <= PARALLEL_TOLERANCE, (name, "denoise with a LoRA")
        print(f"{name}: worst max|diff| {worst:.2e}")
    finally:
        group.close()


def test_denoise_with_a_lora_equals_denoising_the_merged_weights(dit_file, tmp_path):
    """Our own Z-Image Denoise with a LoRA (the Z-Image LoRA node's factors) equals the same run on a file with
    the LoRA merged into its weights; the next request without one runs on the base weights again."""
    from comfyui_parallel_diffusion.models.zimage.comfyui_model import lora_factors

    patches = lora_patches(dit_file, 0.7)
    merged_file = tmp_path / "merged.safetensors"
    save_file(merged(dit_file, patches), merged_file)
    runner = LocalRunner(models)
    runner.load("base", "zimage_dit", transformer=dit_file)
    runner.load("merged", "zimage_dit", transformer=str(merged_file))
    gen = torch.Generator().manual_seed(1)
    latents = runner.run("zimage.prepare", "base", {"batch": 1, "height": 96, "width": 48, "seed": 1})
    request = {"latents": latents, "prompt_embeds": [torch.randn(7, 48, generator=gen)],
               "negative_prompt_embeds": [torch.randn(3, 48, generator=gen)], "steps": 2, "guidance": 1.5}
    base = runner.run("zimage.denoise", "base", request)
    ours = runner.run("zimage.denoise", "base", {**request, "lora": lora_factors(patches)})
    err = (ours - runner.run("zimage.denoise", "merged", request)).abs().max().item()
    print(f"denoise with the LoRA vs merged weights: max|diff| {err:.2e}; the LoRA moves it by "
          f"{(ours - base).abs().max().item():.2e}")
    assert err <= LORA_TOLERANCE * 10  # two steps of the sampler compound the per-call rounding
    assert (ours - base).abs().max() > 1e-2
    assert torch.equal(runner.run("zimage.denoise", "base", request), base)
