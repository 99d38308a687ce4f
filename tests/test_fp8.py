"""weight_dtype fp8_e4m3fn: Linear weights stored in fp8 and upcast per layer (models/fp8.py), float32 compute on
the CPU here; a parallel run equals one rank's in that mode as in the default one (the same tolerance as
test_zimage / test_glm_image), offloading included."""
import pytest
import torch
from torch import nn

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.models import fp8
from comfyui_parallel_diffusion.models.glm_image import pipeline as glm
from comfyui_parallel_diffusion.models.zimage import pipeline as zimage
from comfyui_parallel_diffusion.parallel import Layout, LocalRunner
from comfyui_parallel_diffusion.parallel.group import WorkerGroup

PARALLEL_TOLERANCE = 1e-4


def test_stored_in_fp8_computed_upcast():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[0, 0] = 1000.0  # beyond e4m3fn's 448: clamped, not NaN
    expected_weight = linear.weight.detach().clamp(-448, 448).to(torch.float8_e4m3fn).float()
    fp8.store_fp8([linear], torch.float32)
    assert linear.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    assert linear.weight.dtype == torch.float32 and torch.equal(linear.weight, expected_weight)
    x = torch.randn(3, 8)
    assert torch.equal(linear(x), nn.functional.linear(x, expected_weight, linear.bias))
    # an fp8 file's values, loaded in bf16 (as the loader upcasts them), are stored back as their very bytes
    values = torch.randn(64).to(torch.float8_e4m3fn)
    assert torch.equal(fp8.to_fp8(values.to(torch.bfloat16)).view(torch.uint8), values.view(torch.uint8))
    with pytest.raises(ValueError, match="weight_dtype must be one of default, fp8_e4m3fn"):
        fp8.check_weight_dtype("fp8")


def _runner(ranks):
    return LocalRunner(models) if ranks == 1 else WorkerGroup(Layout.for_world(ranks), "cpu", torch.float32)


def test_zimage_fp8_on_two_ranks_equals_one(tiny_zimage):
    kwargs = dict(prompt=["a red cat"], height=80, width=112, steps=2, guidance=3.0, seed=7)
    results = {}
    for ranks in (1, 2):
        runner = _runner(ranks)
        try:
            runner.load("fp8", "zimage", path=str(tiny_zimage), weight_dtype="fp8_e4m3fn", offload="offload")
            results[ranks] = zimage.generate(runner, "fp8", **kwargs)
            if ranks == 1:
                dit = runner.models["fp8"][1].transformer
                runner.load("bf", "zimage", path=str(tiny_zimage))
                default = zimage.generate(runner, "bf", **kwargs)
        finally:
            runner.close()
    assert all(m.parametrizations.weight.original.dtype == torch.float8_e4m3fn for m in fp8.linears(dit))
    assert (results[1][1] - default[1]).abs().max() > 1e-4  # the weights were rounded: not the default run
    assert (results[2][1] - results[1][1]).abs().max().item() <= PARALLEL_TOLERANCE
    assert (results[2][0] - results[1][0]).abs().max().item() <= 1e-3


@pytest.mark.usefixtures("one_torch_thread")
def test_glm_image_fp8_tensor_parallel_on_two_ranks_equals_one(tiny_glm_image):
    """The DiT and the AR decoder in fp8; the AR sharded over 2 ranks (its fast decode step reads the upcast
    weights) samples the tokens one rank does, and the images agree as in the default mode."""
    case = dict(prompt='a "TWO" word sign', height=64, width=64, guidance=1.5, steps=2, seed=3)
    results = {}
    for ranks in (1, 2):
        runner = _runner(ranks)
        try:
            runner.load("fp8", "glm_image", path=tiny_glm_image, ar="tensor_parallel", weight_dtype="fp8_e4m3fn")
            request = {"prompt": case["prompt"], "height": 64, "width": 64, "seed": 3, "images": None}
            tokens = runner.run("glm_image.ar", "fp8", request)["prior_token_ids"]
            results[ranks] = (tokens, glm.generate(runner, "fp8", **case))
            if ranks == 1:
                vle = runner.models["fp8"][1].vision_language_encoder
                assert all(m.parametrizations.weight.original.dtype == torch.float8_e4m3fn
                           for m in models.glm_image.model.ar_fp8_layers(vle))
        finally:
            runner.close()
    assert torch.equal(results[2][0], results[1][0])
    assert (results[2][1][1] - results[1][1][1]).abs().max().item() <= PARALLEL_TOLERANCE
    assert (results[2][1][0] - results[1][1][0]).abs().max().item() <= 1e-3
