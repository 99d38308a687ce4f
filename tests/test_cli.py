"""The `parallel-diffusion` command as a user runs it: generate on 1 and 4 ranks gives the same latents, and a
wrong model folder is one line on stderr, not a traceback."""
import subprocess
import sys

from safetensors.torch import load_file


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "comfyui_parallel_diffusion.models.cli", *args],
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
