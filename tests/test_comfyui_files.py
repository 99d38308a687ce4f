"""Z-Image as ComfyUI's split files, in a real ComfyUI (tests/comfyui_server.py; skipped unless COMFYUI_HOME names a
host).

The files (tests/comfyui_files.py) are the smallest ComfyUI takes as Z-Image: a full-width DiT with one main layer,
the full Flux VAE, and a Qwen3 text encoder of Z-Image's width that only our loader reads (ComfyUI always builds
the full Qwen3-4B, so its sampler gets caption features from a test-only node, tests/comfyui_test_nodes.py).
ComfyUI's own loaders and sampler taking them shows that tests/comfyui_layout.py writes ComfyUI's layout, which
tests/test_split_files.py then loads through our loader; here our loader node reads the same files, and latents
cross between our nodes and ComfyUI's VAE nodes both ways.

Order matters (pytest keeps file order): ComfyUI's own sampling runs first, then /free drops its DiT (3.6 GB in
float32) before our loader node loads the same files in ComfyUI's process (gpus=1, float32 on the CPU).
"""
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfyui_files  # noqa: E402

SIZE = 64
STEPS = 2
NAMES = comfyui_files.FILE_NAMES
PROMPT_TIMEOUT = 300  # loading 2.6 GB of files on two shared CPU cores


def _numel(path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())


def test_the_files_convert_back_to_the_diffusers_models_exactly(zimage_files):
    """No ComfyUI: diffusers' own converters (our loader's) read each written file back into the state dict it was
    written from, at the full geometry ComfyUI gets (2 resnets per VAE level, mid attention, fused qkv at 3840)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    levels = {"down_block_types": [None] * 4, "up_block_types": [None] * 4}
    for kind, build, convert in (
            ("vae", comfyui_files.flux_vae_state_dict, lambda sd: convert_ldm_vae_checkpoint(sd, levels)),
            ("text_encoders", comfyui_files.text_encoder_state_dict,
             lambda sd: {name.removeprefix("model."): t for name, t in sd.items()}),
            ("diffusion_models", comfyui_files.zimage_dit_state_dict,
             convert_z_image_transformer_checkpoint_to_diffusers)):
        ref = build()  # seeded: the same values the file was written from
        back = convert(load_file(zimage_files[kind]))
        assert back.keys() == ref.keys(), (kind, sorted(back.keys() ^ ref.keys())[:5])
        bad = [name for name in ref if not (back[name].shape == ref[name].shape and back[name].dtype == ref[name].dtype
                                            and torch.equal(back[name], ref[name]))]
        assert not bad, (kind, bad[:5])
        del ref, back


@pytest.fixture(scope="module")
def server(comfyui, zimage_files):
    """The session's server with the three files in its diffusion_models, text_encoders and vae folders."""
    links = []
    for kind, path in zimage_files.items():
        link = comfyui.models_dir / kind / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(path)
            links.append(link)
    yield comfyui
    comfyui.free(unload_models=True, free_memory=True)  # our model lives in ComfyUI's process (gpus=1)
    for link in links:
        link.unlink()


def run_ok(server, prompt: dict) -> dict:
    entry, _ = server.run(prompt, timeout=PROMPT_TIMEOUT)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] in ("execution_error", "execution_interrupted")]
    assert entry["status"]["status_str"] == "success" and not errors, f"{errors}\n{server.log_tail(80)}"
    return entry


def saved_png(server, entry: dict, node_id: str) -> np.ndarray:
    (item,) = entry["outputs"][node_id]["images"]
    path = server.output_dir / item["subfolder"] / item["filename"]
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB")).astype(np.int16)


def saved_latent(server, entry: dict, node_id: str) -> torch.Tensor:
    (item,) = entry["outputs"][node_id]["latents"]
    return load_file(server.output_dir / item["subfolder"] / item["filename"])["latent_tensor"]


def assert_same_image(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    """Equal to one 8-bit level: SaveImage truncates, so a float difference of 1e-6 can flip a level."""
    assert ours.shape == theirs.shape == (SIZE, SIZE, 3), what
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1, f"{what}: max {diff.max()} levels, {np.mean(diff > 1):.1%} of values over 1"
    assert np.mean(diff > 0) < 0.05, f"{what}: {np.mean(diff > 0):.1%} of values differ"


def assert_an_image(image: np.ndarray, what: str) -> None:
    """Random weights make noise, but not a flat image (NaN saves as 0, an overflow as 255)."""
    assert image.shape == (SIZE, SIZE, 3), what
    assert image.std() > 2 and len(np.unique(image)) > 16, f"{what}: flat image (std {image.std():.2f})"


def test_comfyui_samples_our_files_as_z_image(server):
    """ComfyUI's Load Diffusion Model and Load VAE on our files, KSampler (Turbo's settings: euler, simple,
    cfg 1), VAE Decode: ComfyUI matched the DiT as Z-Image (its ZImage model config and shift 3; other widths load
    as Lumina 2, shift 6; the log's "Requested to load Lumina2" names the base class either way), every tensor of
    both files found its place, and the image is finite."""
    log_start = len(server.log_text())
    prompt = {
        "1": {"class_type": "UNETLoader",
              "inputs": {"unet_name": NAMES["diffusion_models"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": NAMES["vae"]}},
        "3": {"class_type": "PDTestRandomConditioning", "inputs": {"seed": 0, "length": 16, "width": 2560}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "comfyui_files/ksampler"}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "comfyui_files/ksampler"}},
        "10": {"class_type": "PDTestModelInfo", "inputs": {"model": ["1", 0], "vae": ["2", 0]}},
    }
    started = time.monotonic()
    entry = run_ok(server, prompt)
    print(f"ComfyUI's loaders + {STEPS}-step KSampler + VAE Decode: {time.monotonic() - started:.1f} s")
    (info,) = entry["outputs"]["10"]["info"]
    print(info)
    assert info["model_config"] == "ZImage" and info["latent_format"] == "Flux" and info["shift"] == 3.0, info
    assert info["diffusion_model"] == "NextDiT" and info["n_layers"] == comfyui_files.COMFYUI_MIN_LAYERS, info
    assert info["vae_latent_channels"] == 16, info
    # Nothing missing (ComfyUI warns) and nothing left over (equal weight counts; ComfyUI only debug-logs these).
    log = server.log_text()[log_start:]
    for warning in ("unet missing", "unet unexpected", "Missing VAE keys", "left over keys"):
        assert warning not in log, f"{warning}:\n{log[-3000:]}"
    assert info["diffusion_model_numel"] == _numel(server.models_dir / "diffusion_models" / NAMES["diffusion_models"])
    assert info["vae_numel"] == _numel(server.models_dir / "vae" / NAMES["vae"])
    latent = saved_latent(server, entry, "9")
    assert latent.shape == (1, 16, SIZE // 8, SIZE // 8) and torch.isfinite(latent).all() and latent.std() > 0
    assert_an_image(saved_png(server, entry, "8"), "KSampler's image")


# -- our loader node on the same files -------------------------------------------------------------------------

LOADER = {"class_type": "PDZImageFilesLoader", "inputs": {
    "transformer": NAMES["diffusion_models"], "text_encoder": NAMES["text_encoders"], "vae": NAMES["vae"],
    "gpus": 1, "cfg_parallel": False, "device": "cpu"}}
VAE = {"class_type": "VAELoader", "inputs": {"vae_name": NAMES["vae"]}}


@pytest.fixture(scope="module")
def ours(server):
    """Our loader node -> text encode -> denoise -> decode; the denoised LATENT also through ComfyUI's VAE Decode
    (Load VAE on the same file). Run once for the tests below."""
    server.free(unload_models=True, free_memory=True)  # ComfyUI's DiT of the test above: 3.6 GB
    time.sleep(2)  # /free is taken when the prompt worker is idle; let it be taken before the next prompt
    prompt = {
        "1": LOADER,
        "2": {"class_type": "PDZImageTextEncode", "inputs": {"model": ["1", 0], "prompt": "a red cat",
                                                             "negative_prompt": ""}},
        "3": {"class_type": "PDZImageDenoise", "inputs": {
            "model": ["1", 0], "conditioning": ["2", 0], "seed": 0, "steps": STEPS, "guidance": 0.0,
            "width": SIZE, "height": SIZE, "batch_size": 1}},
        "4": {"class_type": "PDZImageDecode", "inputs": {"model": ["1", 0], "latent": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "comfyui_files/ours"}},
        "6": VAE,
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0],
                                                    "filename_prefix": "comfyui_files/ours_comfyui_vae"}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "comfyui_files/ours"}},
    }
    started = time.monotonic()
    entry, _ = server.run(prompt, timeout=PROMPT_TIMEOUT)
    print(f"our loader + encode + {STEPS}-step denoise + both decodes: {time.monotonic() - started:.1f} s")
    return entry


def test_our_loader_node_makes_an_image_from_the_files(server, ours):
    """PDZImageFilesLoader lists and loads the three files by their ComfyUI names, with ComfyUI's Qwen tokenizer."""
    errors = [m[1] for m in ours["status"]["messages"] if m[0] in ("execution_error", "execution_interrupted")]
    assert ours["status"]["status_str"] == "success" and not errors, f"{errors}\n{server.log_tail(80)}"
    latent = saved_latent(server, ours, "9")
    assert latent.shape == (1, 16, SIZE // 8, SIZE // 8) and torch.isfinite(latent).all() and latent.std() > 0
    assert_an_image(saved_png(server, ours, "5"), "our image")


def test_our_latent_decodes_in_comfyui_as_in_ours(server, ours):
    """Our Denoise's LATENT is in ComfyUI's space (the VAE's raw latents): ComfyUI's VAE Decode of it is our
    Decode's image."""
    assert ours["status"]["status_str"] == "success", server.log_tail(80)
    assert_same_image(saved_png(server, ours, "5"), saved_png(server, ours, "8"), "our Decode vs ComfyUI's VAE Decode")


def test_comfyui_vae_encode_decodes_in_ours_as_in_comfyui(server, ours):
    """ComfyUI's VAE Encode of an image, decoded by our Decode node, is ComfyUI's own encode -> decode round trip."""
    pixels = np.indices((SIZE, SIZE)).sum(0) * 2 % 256
    Image.fromarray(np.stack([pixels, 255 - pixels, np.full_like(pixels, 96)], -1).astype(np.uint8)).save(
        server.input_dir / "comfyui_files_input.png")
    prompt = {
        "1": LOADER,  # the same inputs: ComfyUI's cache hands back the model loaded above
        "6": VAE,
        "10": {"class_type": "LoadImage", "inputs": {"image": "comfyui_files_input.png"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["6", 0]}},
        "12": {"class_type": "PDZImageDecode", "inputs": {"model": ["1", 0], "latent": ["11", 0]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0],
                                                     "filename_prefix": "comfyui_files/encoded_ours"}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["6", 0]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0],
                                                     "filename_prefix": "comfyui_files/encoded_comfyui"}},
    }
    entry = run_ok(server, prompt)
    ours_image, theirs = saved_png(server, entry, "13"), saved_png(server, entry, "15")
    assert_an_image(theirs, "ComfyUI's round trip")
    assert_same_image(ours_image, theirs, "VAE Encode -> our Decode vs VAE Encode -> VAE Decode")
