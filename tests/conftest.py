"""Shared fixtures: tiny random-weight pipelines, built once per test session into a temporary folder."""
import os
import shutil
import sys
import time

import pytest
import torch
from comfyui_server import comfyui  # noqa: F401  the session fixture of the ComfyUI end-to-end tests


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core host OpenMP's spinning threads made them
    10-20x slower (the tiny AR decodes ~260 tokens one by one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def zimage_files(tmp_path_factory):
    """Z-Image as ComfyUI's three split files at the smallest size ComfyUI takes as Z-Image (tests/comfyui_files.py),
    written once per session and deleted after it (pytest keeps old sessions' temp folders, and these are 3 GB)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import comfyui_files

    folder = tmp_path_factory.mktemp("comfyui_zimage_files")
    started = time.monotonic()
    paths = comfyui_files.write_zimage_files(folder)
    print(f"wrote {sum(p.stat().st_size for p in paths.values()) / 1e9:.2f} GB in {time.monotonic() - started:.1f} s")
    yield paths
    shutil.rmtree(folder, ignore_errors=True)
