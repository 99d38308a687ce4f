"""Sequence parallelism from the inside: Ulysses attention equals full attention for odd lengths and head counts
that the degree does not divide, and the Z-Image plan really hands each block 1/sp of the sequence."""
import math
from pathlib import Path

import pytest

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.parallel import Layout, LocalRunner
from comfyui_parallel_diffusion.parallel.group import WorkerGroup

PLUGIN = {"plugin": "sequence_probe_plugin", "extra_sys_path": [str(Path(__file__).parent)]}


@pytest.fixture(scope="module", params=[3, 4], ids=["3 ranks", "4 ranks"])
def group(request, tiny_zimage):
    group = WorkerGroup(Layout.for_world(request.param), **PLUGIN)
    group.load("z", "zimage", path=str(tiny_zimage))
    yield group
    group.close()


@pytest.mark.parametrize("masked", [True, False], ids=["key mask", "real keys"])
@pytest.mark.parametrize("length,heads", [(37, 5), (64, 3), (5, 30)])
def test_ulysses_attention_equals_full_attention(group, length, heads, masked):
    errors = group.run("probe.ulysses_error", None,
                       {"batch": 2, "length": length, "heads": heads, "head_dim": 8,
                        "padded_from": length - 3 if masked else None},
                       collect="all")
    assert max(errors) <= 1e-6, errors


def test_each_rank_sees_its_share_of_the_sequence(group, tiny_zimage):
    local = LocalRunner(models)
    local.load("z", "zimage", path=str(tiny_zimage))
    embeds = local.run("zimage.encode", "z", {"prompts": ["a cat"]})["prompt_embeds"]
    height, width = 80, 112  # 35 image tokens, which Z-Image pads to 64
    seen = group.run("probe.shard_lengths", "z", {"height": height, "width": width, "prompt_embeds": embeds},
                     collect="all")
    sp = group.layout.sp
    image_tokens = 64
    caption_tokens = math.ceil(embeds[0].shape[0] / 32) * 32
    for rank_seen in seen:
        assert rank_seen["noise_refiner"] == math.ceil(image_tokens / sp)
        assert rank_seen["layers"] == math.ceil((image_tokens + caption_tokens) / sp)
        assert rank_seen["context_refiner"] == caption_tokens  # short caption: not sharded


def test_new_text_lengths_do_not_recompile_sharded_blocks(tiny_glm_image):
    """A user's next prompt brings another glyph length. With the sequence sharded, the compiled blocks must not
    specialise to each: dynamo compiles for the first few (static, dynamic, padded or not, the 1-token shards that
    it always specialises) and never after, well inside its recompile limit (past it, blocks would run uncompiled).
    Computing the real keys inside the blocks recompiled at every length until that limit."""
    group = WorkerGroup(Layout.for_world(2), **PLUGIN)
    try:
        group.load("g", "glm_image", path=str(tiny_glm_image))
        made = group.run("probe.block_compiles", "g", {"glyph_lengths": [5, 10, 32, 7, 1, 2, 13, 40, 9, 64, 3, 17]}, collect="all")
    finally:
        group.close()
    for per_call in made:
        assert per_call[0] > 0 and per_call[6:] == [0] * 6, made
