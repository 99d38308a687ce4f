"""GraphedCall (models/cuda_graph.py): a replayed call equals the eager call, bit for bit, and a new input signature
warms up and captures anew. CUDA graphs need a GPU: on a CPU machine (CI) these tests are skipped; they run on the
GPU machines (the Z-Image denoising benchmark also compares graphed runs across GPU counts)."""
import pytest
import torch

from comfyui_parallel_diffusion.models import loading
from comfyui_parallel_diffusion.models.cuda_graph import WARMUP, GraphedCall
from comfyui_parallel_diffusion.models.glm_image import model as glm_model
from comfyui_parallel_diffusion.models.zimage.stages import ZImage, _forward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_replays_equal_eager_calls_and_each_signature_is_captured_once():
    weight = torch.randn(64, 64, device="cuda")
    python_runs = []

    def fn(x, extra):
        python_runs.append(x.shape)  # Python runs for eager calls and the capture, never for a replay
        return [torch.tanh(x @ weight) + e.sum() for e in extra]

    graphed = GraphedCall(fn)
    gen = torch.Generator("cuda").manual_seed(0)
    outputs = []
    for rows in (8, 8, 8, 8, 8, 16, 16, 16, 16, 8):
        x = torch.randn(rows, 64, device="cuda", generator=gen)
        extra = [torch.randn(3, device="cuda", generator=gen)]
        got = graphed(x, extra)
        assert torch.equal(got[0], fn(x, extra)[0])
        python_runs.pop()  # the reference call above
        outputs.append((got[0], fn(x, extra)[0].clone()))
        python_runs.pop()
    # 8 rows: WARMUP eager calls + 1 capture, then replays; 16 rows the same; 8 rows again starts anew (one graph
    # is kept) with one eager call
    assert len(python_runs) == 2 * (WARMUP + 1) + 1
    for got, expected in outputs:  # results handed out earlier were not overwritten by later replays
        assert torch.equal(got, expected)


def test_zimage_denoising_call_replayed_equals_eager(tiny_zimage):
    transformer = loading.load_component(tiny_zimage, "transformer", torch.float32, "cuda")
    model = ZImage(transformer, {})
    assert isinstance(model.predict, GraphedCall)
    gen = torch.Generator().manual_seed(0)
    embeds = [torch.randn(20, transformer.config.cap_feat_dim, generator=gen).cuda()]
    with torch.no_grad():
        for step in range(WARMUP + 3):
            x = torch.randn(1, transformer.in_channels, 10, 14, generator=gen).cuda()
            t = torch.full((1,), 1 - step / 10, device="cuda")
            assert torch.equal(model.predict(x, t, embeds), _forward(transformer, x, t, embeds))


def test_glm_image_denoising_calls_replayed_equal_eager(tiny_glm_image):
    transformer = loading.load_component(tiny_glm_image, "transformer", torch.float32, "cuda")
    model = glm_model.GlmImage(transformer, None, None, None, None, {})
    config = transformer.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.in_channels, 8, 12, generator=gen).cuda()
    prior = torch.randint(0, config.prior_vq_quantizer_codebook_size, (1, 24), generator=gen).cuda()
    rope = tuple(t.cuda() for t in transformer.rope(x))
    size, crop = torch.tensor([[64.0, 96.0]], device="cuda"), torch.zeros(1, 2, device="cuda")
    with torch.no_grad():
        for step in range(WARMUP + 3):
            t = torch.full((1,), 999.0 - step, device="cuda")
            for drop, glyphs in ((False, 7), (True, 1)):  # the branches alternate, as on one GPU
                embeds = torch.randn(1, glyphs, config.text_embed_dim, generator=gen).cuda()
                args = (x, prior, embeds, t, size, crop, rope)
                assert torch.equal(model.predict[drop](*args), glm_model.forward(transformer, drop, *args))
