"""Shared fixtures: tiny random-weight pipelines, built once per test session into a temporary folder."""
import pytest


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory):
    """Folder of a tiny random-weight Z-Image (diffusers layout, safetensors)."""
    from comfyui_parallel_diffusion.models.zimage.tiny import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage"))


@pytest.fixture(scope="session")
def tiny_glm_image(tmp_path_factory):
    """Folder of a tiny random-weight GLM-Image (diffusers layout, safetensors)."""
    from comfyui_parallel_diffusion.models.glm_image.tiny import build_tiny_glm_image

    return build_tiny_glm_image(tmp_path_factory.mktemp("tiny_glm_image"))
