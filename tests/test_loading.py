"""models/loading.py on the tiny Z-Image: good folders load, bad ones give one clear line; the tiny pipeline runs."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Model

from comfyui_parallel_diffusion.models.loading import (
    ModelFolderError,
    detect_pipeline,
    inspect_model_folder,
    load_component,
)
from comfyui_parallel_diffusion.models.zimage.tiny import MARKER, build_tiny_zimage

COMPONENTS = {
    "scheduler": FlowMatchEulerDiscreteScheduler,
    "text_encoder": Qwen3Model,
    "tokenizer": Qwen2Tokenizer,
    "transformer": ZImageTransformer2DModel,
    "vae": AutoencoderKL,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def copy_of(tiny_zimage, tmp_path):
    """A scratch copy of the tiny folder, for breaking it."""
    return shutil.copytree(tiny_zimage, tmp_path / "model")


@pytest.fixture(scope="module")
def pipeline(tiny_zimage):
    pipe = ZImagePipeline.from_pretrained(tiny_zimage, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a red fox", seed=0, height=64, width=64) -> np.ndarray:
    return pipe(prompt, height=height, width=width, num_inference_steps=2, guidance_scale=0.0,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


# -- good folders ----------------------------------------------------------------------------------------------

def test_the_tiny_folder_passes_inspection(tiny_zimage):
    assert detect_pipeline(tiny_zimage) == "ZImagePipeline"
    components = inspect_model_folder(tiny_zimage, "ZImagePipeline")
    assert set(components) == set(COMPONENTS)
    assert components["text_encoder"] == ("transformers", "Qwen3Model")


def test_every_component_loads_with_dtype_and_device(tiny_zimage):
    for name, cls in COMPONENTS.items():
        component = load_component(tiny_zimage, name, torch.bfloat16, "cpu")
        assert isinstance(component, cls)
        if isinstance(component, torch.nn.Module):
            assert {p.dtype for p in component.parameters()} == {torch.bfloat16}
    assert load_component(tiny_zimage, "tokenizer").apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    ) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_pipeline_assembled_by_the_loader_equals_diffusers_from_pretrained(tiny_zimage, pipeline):
    loaded = {name: load_component(tiny_zimage, name, torch.float32) for name in COMPONENTS}
    for name, component in loaded.items():
        if isinstance(component, torch.nn.Module):
            ref = getattr(pipeline, name).state_dict()
            ours = component.state_dict()
            assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name
    ours = ZImagePipeline(**loaded)
    ours.set_progress_bar_config(disable=True)
    # Equal weights; the images agree to rounding only: diffusers' tensors are views into the memory-mapped file
    # at unaligned offsets, and CPU matmul kernels sum in another order there (1e-7 per Linear, measured).
    np.testing.assert_allclose(generate(ours), generate(pipeline), rtol=0, atol=1e-5)


def test_the_tiny_model_keeps_the_real_geometry_with_three_heads(pipeline):
    config = pipeline.transformer.config
    assert config.n_heads == 3 and config.dim // config.n_heads == sum(config.axes_dims)
    assert config.cap_feat_dim == pipeline.text_encoder.config.hidden_size
    assert (config.in_channels, list(config.all_patch_size)) == (16, [2])
    assert pipeline.vae_scale_factor == 8 and pipeline.vae.config.latent_channels == 16


# -- the tiny pipeline -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(64, 64), (80, 48), (48, 96)])
def test_the_tiny_pipeline_makes_an_image_of_the_asked_size(pipeline, height, width):
    image = generate(pipeline, height=height, width=width)
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all() and image.std() > 0.01


def test_the_image_depends_on_seed_and_prompt(pipeline):
    base = generate(pipeline)
    np.testing.assert_array_equal(generate(pipeline), base)
    assert np.abs(generate(pipeline, seed=1) - base).mean() > 1e-3
    assert np.abs(generate(pipeline, prompt="a blue whale") - base).mean() > 1e-3


def test_a_build_is_deterministic_and_reused(tiny_zimage, tmp_path):
    other = build_tiny_zimage(tmp_path / "again")
    assert _digests(other) == _digests(tiny_zimage)
    marker_time = (other / MARKER).stat().st_mtime_ns
    assert build_tiny_zimage(other) == other and (other / MARKER).stat().st_mtime_ns == marker_time


def _digests(folder):
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.safetensors"))}


# -- bad folders: one line each, naming the folder ---------------------------------------------------------------

def expect_error(path, expected_pipeline="ZImagePipeline") -> str:
    with pytest.raises(ModelFolderError) as info:
        inspect_model_folder(path, expected_pipeline)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_no_model_index(copy_of):
    (copy_of / "model_index.json").unlink()
    assert expect_error(copy_of) == f"{copy_of} is not a diffusers model folder: no model_index.json"


def test_not_a_folder(copy_of):
    assert expect_error(copy_of / "nope").endswith("is not a diffusers model folder: it does not exist")
    weights = copy_of / "vae" / "diffusion_pytorch_model.safetensors"
    assert expect_error(weights).endswith("is not a diffusers model folder: it is a file")


def test_wrong_pipeline(copy_of):
    _edit_index(copy_of, _class_name="StableDiffusionPipeline")
    assert expect_error(copy_of) == f"{copy_of} holds a StableDiffusionPipeline, not a ZImagePipeline"
    assert detect_pipeline(copy_of) == "StableDiffusionPipeline"


def test_missing_component(copy_of):
    shutil.rmtree(copy_of / "vae")
    assert expect_error(copy_of) == (
        f"{copy_of} is missing component 'vae' (no folder vae/ with config.json and *.safetensors)")


def test_missing_scheduler_config(copy_of):
    (copy_of / "scheduler" / "scheduler_config.json").unlink()
    assert expect_error(copy_of) == (
        f"{copy_of} is missing component 'scheduler' (no folder scheduler/ with scheduler_config.json)")


def test_pickle_only_weights_are_refused(copy_of):
    folder = copy_of / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    assert expect_error(copy_of) == (
        f"{folder} has only .bin weights; convert to safetensors (pickle is never loaded)")


def test_a_truncated_download_is_caught(copy_of):
    weights = copy_of / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "is truncated" in expect_error(copy_of)


def test_a_git_lfs_pointer_is_caught(copy_of):
    weights = copy_of / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    assert "is not a safetensors file" in expect_error(copy_of)


def test_a_missing_shard_is_caught(copy_of):
    folder = copy_of / "transformer"
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert expect_error(copy_of) == (
        f"{folder} is incomplete: 2 of 2 shards named in diffusion_pytorch_model.safetensors.index.json are "
        f"missing, e.g. diffusion_pytorch_model-00001-of-00002.safetensors")


def test_only_diffusers_and_transformers_classes_are_instantiated(copy_of):
    _edit_index(copy_of, vae=["os", "system"])
    with pytest.raises(ModelFolderError, match="only diffusers and transformers classes load"):
        load_component(copy_of, "vae")


def test_a_class_filed_under_a_diffusers_pipeline_package_loads(copy_of, monkeypatch):
    """diffusers files transformers.models.glm_image classes under "glm_image", whose package re-exports them;
    the same lookup, shown with z_image made to re-export its transformer."""
    import diffusers.pipelines.z_image

    monkeypatch.setattr(diffusers.pipelines.z_image, "ZImageTransformer2DModel", ZImageTransformer2DModel,
                        raising=False)
    _edit_index(copy_of, transformer=["z_image", "ZImageTransformer2DModel"])
    assert isinstance(load_component(copy_of, "transformer"), ZImageTransformer2DModel)


def test_an_unlisted_component(tiny_zimage):
    with pytest.raises(ModelFolderError, match="lists no component 'processor'"):
        load_component(tiny_zimage, "processor")


def _edit_index(folder, **changes):
    index_file = folder / "model_index.json"
    index_file.write_text(json.dumps({**json.loads(index_file.read_text()), **changes}))
