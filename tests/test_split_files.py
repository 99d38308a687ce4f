"""Z-Image from ComfyUI's split files (models/zimage/comfyui_files.py): the tiny model's weights written in
ComfyUI's layouts (tests/comfyui_layout.py; tests/test_comfyui_files.py shows ComfyUI's own loaders accept that
layout) load into exactly the model the diffusers folder gives, and bad files are refused in one line."""
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfyui_layout  # noqa: E402

from comfyui_parallel_diffusion import models  # noqa: E402
from comfyui_parallel_diffusion.models.weights import WeightsError  # noqa: E402
from comfyui_parallel_diffusion.models.zimage import comfyui_files as split  # noqa: E402
from comfyui_parallel_diffusion.models.zimage import pipeline as zimage  # noqa: E402
from comfyui_parallel_diffusion.parallel import Layout, LocalRunner  # noqa: E402
from comfyui_parallel_diffusion.parallel.group import WorkerGroup  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZES = [(64, 64), (48, 96)]  # square, landscape


@pytest.fixture(scope="module")
def files(tiny_zimage, tmp_path_factory):
    """The tiny Z-Image as ComfyUI's three files (fp32, so that equality can be exact)."""
    folder = tmp_path_factory.mktemp("split_files")
    paths = {"transformer": folder / "z_image_turbo.safetensors", "text_encoder": folder / "qwen_3_4b.safetensors",
             "vae": folder / "ae.safetensors"}
    dit = load_file(tiny_zimage / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(comfyui_layout.comfyui_transformer_state_dict(dit), paths["transformer"])
    te = load_file(tiny_zimage / "text_encoder" / "model.safetensors")
    save_file(comfyui_layout.causal_lm_state_dict(te), paths["text_encoder"])
    vae = load_file(tiny_zimage / "vae" / "diffusion_pytorch_model.safetensors")
    save_file(comfyui_layout.ldm_vae_state_dict(vae), paths["vae"])
    return {**{k: str(v) for k, v in paths.items()}, "tokenizer": str(tiny_zimage / "tokenizer")}


def _generate(runner, key, height, width):
    return zimage.generate(runner, key, prompt="a red cat", height=height, width=width, steps=2, guidance=0.0,
                           seed=5)


@pytest.fixture(scope="module")
def folder_results(tiny_zimage):
    runner = LocalRunner(models)
    runner.load("folder", "zimage", path=str(tiny_zimage))
    return {size: _generate(runner, "folder", *size) for size in SIZES}


def test_every_weight_equals_the_folders(tiny_zimage, files):
    from comfyui_parallel_diffusion.models import loading

    for name, load in (("transformer", split.load_transformer), ("text_encoder", split.load_text_encoder),
                       ("vae", split.load_vae)):
        ours = load(files[name], torch.float32, "cpu").state_dict()
        ref = loading.load_component(tiny_zimage, name, torch.float32, "cpu").state_dict()
        assert ours.keys() == ref.keys(), name
        assert all(torch.equal(ours[k], ref[k]) for k in ref), name


@pytest.mark.parametrize("world", [1, 2])
def test_the_split_files_give_the_folders_images_bit_for_bit(files, folder_results, world):
    if world == 1:
        runner = LocalRunner(models)
    else:
        runner = WorkerGroup(Layout.for_world(world), device="cpu", dtype=torch.float32)
    try:
        runner.load("files", "zimage_files", **files)
        for size in SIZES:
            images, latents = _generate(runner, "files", *size)
            ref_images, ref_latents = folder_results[size]
            assert torch.equal(latents, ref_latents), (world, size, (latents - ref_latents).abs().max())
            assert torch.equal(images, ref_images), (world, size)
    finally:
        if world > 1:
            runner.close()


# -- bad files: one line naming the file ------------------------------------------------------------------------

def test_a_file_of_another_model_is_refused(files):
    with pytest.raises(WeightsError, match=r"ae\.safetensors is not a Z-Image diffusion model"):
        split.inspect_files(files["vae"], files["text_encoder"], files["vae"])
    with pytest.raises(WeightsError, match=r"z_image_turbo\.safetensors is not a Qwen3 text encoder"):
        split.inspect_files(files["transformer"], files["transformer"], files["vae"])
    with pytest.raises(WeightsError, match=r"qwen_3_4b\.safetensors is not a Flux VAE"):
        split.inspect_files(files["transformer"], files["text_encoder"], files["text_encoder"])


def test_a_truncated_file_is_refused(files, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = open(files["transformer"], "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut\.safetensors is truncated"):
        split.inspect_files(str(cut), files["text_encoder"], files["vae"])


def test_a_missing_tensor_is_named(files, tmp_path):
    sd = load_file(files["transformer"])
    del sd["layers.1.attention.out.weight"]
    save_file(sd, tmp_path / "lacking.safetensors")
    with pytest.raises(WeightsError, match=r"lacking\.safetensors lacks 1 of .* layers\.1\.attention\.to_out\.0"):
        split.load_transformer(str(tmp_path / "lacking.safetensors"), torch.float32, "cpu")


def test_an_extra_tensor_is_named(files, tmp_path):
    sd = load_file(files["vae"])
    sd["encoder.mystery.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match=r"extra\.safetensors: 1 tensors have no place .* encoder\.mystery"):
        split.load_vae(str(tmp_path / "extra.safetensors"), torch.float32, "cpu")


def test_a_plain_fp8_file_loads_upcast_and_a_scaled_one_is_refused(files, tmp_path):
    sd = load_file(files["transformer"])
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    save_file(fp8, tmp_path / "z_image_fp8_e4m3fn.safetensors")
    model = split.load_transformer(str(tmp_path / "z_image_fp8_e4m3fn.safetensors"), torch.bfloat16, "cpu")
    weight = model.state_dict()["layers.0.attention.to_out.0.weight"]
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, sd["layers.0.attention.out.weight"].to(torch.float8_e4m3fn).to(torch.bfloat16))
    save_file({**fp8, "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
               "layers.0.attention.out.scale_weight": torch.ones(1)}, tmp_path / "z_image_fp8_scaled.safetensors")
    with pytest.raises(WeightsError, match=r"scaled fp8 file .* use the bf16 file, z_image_turbo_bf16"):
        split.inspect_files(str(tmp_path / "z_image_fp8_scaled.safetensors"), files["text_encoder"], files["vae"])


def test_any_layer_count_loads(files, tmp_path):
    """ComfyUI recognises Z-Image only at full width; our loader reads depth and width from the file."""
    sd = {k: v for k, v in load_file(files["transformer"]).items() if not k.startswith("layers.1.")}
    save_file(sd, tmp_path / "one_layer.safetensors")
    model = split.load_transformer(str(tmp_path / "one_layer.safetensors"), torch.float32, "cpu")
    assert model.config.n_layers == 1 and len(model.layers) == 1


def test_the_writers_invert_the_loaders_converters(tiny_zimage):
    """tests/comfyui_layout.py writes exactly what diffusers' converters read back."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    for folder, write, convert in (
            ("transformer", comfyui_layout.comfyui_transformer_state_dict,
             convert_z_image_transformer_checkpoint_to_diffusers),
            ("vae", comfyui_layout.ldm_vae_state_dict,
             lambda sd: convert_ldm_vae_checkpoint(sd, {"down_block_types": [0] * 4, "up_block_types": [0] * 4}))):
        sd = load_file(tiny_zimage / folder / "diffusion_pytorch_model.safetensors")
        back = convert(dict(write(sd)))
        assert back.keys() == sd.keys(), folder
        assert all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) and back[k].shape == sd[k].shape
                   for k in sd), folder
