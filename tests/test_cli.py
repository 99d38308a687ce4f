"""The `parallel-diffusion` command as a user runs it: generate on 1 and 4 ranks gives the same latents, a wrong
model folder is one line on stderr, not a traceback, and bad values are refused before anything loads."""
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from comfyui_parallel_diffusion.cli import main


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "comfyui_parallel_diffusion.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_generate_on_four_ranks_equals_one(tiny_zimage, tmp_path):
    outputs = {}
    for world in (1, 4):
        out, latents = tmp_path / f"{world}.png", tmp_path / f"{world}.safetensors"
        done = _cli("generate", "--model", str(tiny_zimage), "--prompt", 'a "SALE" sign', "--height", "96",
                    "--width", "64", "--steps", "2", "--seed", "3", "--world-size", str(world), "--device", "cpu",
                    "--out", str(out), "--latents-out", str(latents))
        assert done.returncode == 0, done.stderr[-2000:]
        assert out.stat().st_size > 0 and f"wrote {out}" in done.stdout
        outputs[world] = load_file(latents)["latents"]
    assert outputs[1].shape[-2:] == (12, 8)
    assert (outputs[4] - outputs[1]).abs().max().item() <= 1e-4


def test_a_wrong_model_folder_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    done = _cli("generate", "--model", str(tmp_path), "--prompt", "x", "--device", "cpu")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {tmp_path} holds a StableDiffusionPipeline; supported: "
                                   f"GlmImagePipeline, ZImagePipeline")


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: must be 1 or more, got 0"),  # was taken as the default, 8
    (["--steps", "-2"], "argument --steps: must be 1 or more, got -2"),
    (["--seed", str(2 ** 64)], "argument --seed: must be from 0 to 18446744073709551615"),
    (["--guidance", "nan"], "argument --guidance: guidance must be a finite number"),
    (["--world-size", "0"], "argument --world-size: must be 1 or more"),
])
def test_out_of_range_arguments_are_usage_errors(tiny_zimage, capsys, args, message):
    with pytest.raises(SystemExit) as done:
        main(["generate", "--model", str(tiny_zimage), "--prompt", "x", "--device", "cpu", *args])
    assert done.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--height", "8192"], "error: Z-Image height must be at most 4096, got 8192; use 4096 or less"),
    (["--width", "72"], "error: Z-Image width must be a multiple of 16, got 72; use 64 or 80"),
    (["--ar", "rank0"], "error: --ar applies to GLM-Image only"),
])
def test_the_models_check_refuses_before_loading(tiny_zimage, capsys, args, message):
    assert main(["generate", "--model", str(tiny_zimage), "--prompt", "x", "--device", "cpu", *args]) == 2
    assert capsys.readouterr().err.startswith(message)


def test_glm_image_ar_on_three_ranks_says_where_it_runs(tiny_glm_image, tmp_path):
    done = _cli("generate", "--model", str(tiny_glm_image), "--prompt", "a cat", "--height", "64", "--width", "64",
                "--steps", "1", "--world-size", "3", "--ar", "tensor_parallel", "--device", "cpu",
                "--out", str(tmp_path / "glm.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GLM-Image AR: tensor parallel over ranks 0-1, 2 of 3" in done.stderr and "rank 2 waits" in done.stderr
    bad = _cli("generate", "--model", str(tiny_glm_image), "--prompt", "x", "--height", "48", "--device", "cpu")
    assert bad.returncode == 2 and "GLM-Image height must be a multiple of 32" in bad.stderr
