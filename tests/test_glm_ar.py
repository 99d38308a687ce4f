"""GLM-Image's fast AR decoding (models/glm_image/ar_decode.py) samples exactly the tokens plain generate() samples.

The tiny AR runs the fast path on CPU: the static KV cache, the 3D decode positions fed as a tensor, the packed-GQA
decode attention, the deferred stop check and generate()'s token selection, eagerly (compile=False), plus one run
traced by torch.compile as a single graph (fullgraph=True, the "eager" backend: what dynamo sees on the GPU)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, SuppressTokensLogitsProcessor,
                          TopKLogitsWarper)

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.models.glm_image import ar_decode, decode_step, logits_processors, tiny
from comfyui_parallel_diffusion.parallel import Cancelled, LocalRunner
from comfyui_parallel_diffusion.parallel.tensor_parallel import keep_output_features

MAX_NEW_TOKENS = 100


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ar():
    processor, tokenizer = tiny._processor()
    return tiny._ar_model(tokenizer), processor


@pytest.fixture(scope="module")
def decoder(ar):
    return ar_decode.FastDecoder(ar[0], compile=False)


def _inputs(processor, prompts, height=64, width=64, images=None):
    content = [{"type": "image", "image": img} for img in images or []]
    messages = [[{"role": "user", "content": [*content, {"type": "text", "text": p}]}] for p in prompts]
    return processor.apply_chat_template(messages, tokenize=True, padding=len(prompts) > 1, target_h=height,
                                         target_w=width, return_dict=True, return_tensors="pt")


def _image(height, width, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def _new_tokens(inputs, images):
    """As the AR stage: every grid of the first sample (the target and the preview; editing: the target), +1; capped
    at MAX_NEW_TOKENS to keep the tests quick (the AR stage test below samples whole grids)."""
    per_sample = int(inputs["images_per_sample"][0])
    sizes = [h * w for _, h, w in inputs["image_grid_thw"][:per_sample].tolist()]
    return min((sizes[-1] if images else sum(sizes)) + 1, MAX_NEW_TOKENS)


CASES = {  # name -> (prompts, height, width, condition images)
    "t2i": (["a red house by the sea"], 64, 64, None),
    "t2i landscape": (["a cat"], 64, 96, None),
    "t2i batch, left-padded": (["a red house by the sea", "dog"], 64, 64, None),
    "i2i": (["make it blue"], 64, 96, [_image(64, 96, 1)]),
}


def _both(ar, decoder, case, seed=0, **kwargs):
    model, processor = ar
    prompts, height, width, images = case
    inputs = _inputs(processor, prompts, height, width, images)
    new = _new_tokens(inputs, images)
    torch.manual_seed(seed)
    plain = model.generate(**inputs, max_new_tokens=new, **kwargs)
    torch.manual_seed(seed)
    fast = decoder.generate(inputs, max_new_tokens=new, **kwargs)
    return plain, fast


@pytest.mark.parametrize("name", CASES)
def test_greedy_equals_generate(ar, decoder, name):
    plain, fast = _both(ar, decoder, CASES[name], do_sample=False)
    inputs = _inputs(ar[1], *CASES[name])
    assert plain.shape[1] == inputs.input_ids.shape[1] + _new_tokens(inputs, CASES[name][3])
    assert torch.equal(plain, fast)


@pytest.mark.parametrize("name", CASES)
def test_seeded_sampling_equals_generate(ar, decoder, name):
    """The AR stage's call: do_sample=True, everything else from the model's generation config."""
    for seed in (0, 1):
        plain, fast = _both(ar, decoder, CASES[name], seed=seed, do_sample=True)
        assert torch.equal(plain, fast)
    assert not torch.equal(_both(ar, decoder, CASES[name], seed=2, do_sample=True)[1], fast)


@pytest.mark.parametrize("top_k", [10, 20])
def test_temperature_top_k_top_p_suppressed_tokens_as_generate(ar, decoder, top_k):
    """As a checkpoint's generation_config sets them. 45 suppressed tokens: torch.isin's sorting path, which the fast
    path replaces (logits_processors.py); with top_k 20, more than the 19 tokens left, the k-th score is -inf."""
    model = ar[0]
    config = model.generation_config
    saved = config.temperature, config.top_k, config.top_p, config.suppress_tokens
    suppressed = list(range(0, tiny.VISION_VOCAB, 2)) + list(range(1, 27, 2))
    config.temperature, config.top_k, config.top_p, config.suppress_tokens = 0.7, top_k, 0.8, suppressed
    try:
        for seed in range(3):
            plain, fast = _both(ar, decoder, CASES["t2i batch, left-padded"], seed=seed, do_sample=True)
            assert torch.equal(plain, fast)
            assert not set(fast[:, -MAX_NEW_TOKENS:].flatten().tolist()) & set(suppressed)
    finally:
        config.temperature, config.top_k, config.top_p, config.suppress_tokens = saved


@pytest.mark.parametrize("top_k", [1, 7, 60, 64, 100])
def test_replaced_processors_give_generates_scores(top_k):
    """Each replacement returns the original's scores exactly, ties and -inf included."""
    scores = torch.randn(3, 64, generator=torch.Generator().manual_seed(top_k)).round(decimals=1)  # ties
    scores[1, :10] = -float("inf")
    originals = [SuppressTokensLogitsProcessor(range(0, 64, 3)), TopKLogitsWarper(top_k, min_tokens_to_keep=2)]
    replaced = logits_processors.without_host_syncs(LogitsProcessorList(originals))
    for original, equivalent in zip(originals, replaced):
        assert type(equivalent) is not type(original)
        assert torch.equal(equivalent(None, scores), original(None, scores))


@pytest.mark.parametrize("seed", range(3))
def test_early_end_token_as_generate(ar, decoder, seed):
    """A sampled end token finishes its sequence (padded from then on) and generation stops when all have: the
    deferred stop check ends on the same token as generate()."""
    case = CASES["t2i batch, left-padded"]
    reference, _ = _both(ar, decoder, case, seed=seed, do_sample=True)
    new = reference[:, -MAX_NEW_TOKENS:].tolist()
    # the token both samples reach soonest: as the end token, each sample ends at its own step, and generation then
    first = {t: max(row.index(t) for row in new) for t in set(new[0]) & set(new[1])}
    eos = min(first, key=first.get)
    plain, fast = _both(ar, decoder, case, seed=seed, do_sample=True, eos_token_id=eos)
    assert plain.shape[1] == reference.shape[1] - MAX_NEW_TOKENS + first[eos] + 1
    assert torch.equal(plain, fast)


def test_cache_is_reused_across_prompts(ar):
    decoder = ar_decode.FastDecoder(ar[0], compile=False)
    first = _both(ar, decoder, CASES["t2i"], do_sample=True)[1]
    _both(ar, decoder, CASES["t2i landscape"], do_sample=True)
    assert len(decoder.slots) == 1  # one (batch, length) slot: both prompts fit the same static cache
    assert torch.equal(_both(ar, decoder, CASES["t2i"], do_sample=True)[1], first)


class _Count(StoppingCriteria):
    def __init__(self, cancel_after=None):
        self.calls, self.cancel_after = [], cancel_after

    def __call__(self, input_ids, scores, **kwargs):
        self.calls.append(input_ids.shape[-1])
        if self.cancel_after is not None and len(self.calls) >= self.cancel_after:
            raise Cancelled(len(self.calls), 100)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_stopping_criteria_run_after_every_token(ar, decoder):
    model, processor = ar
    inputs = _inputs(processor, *CASES["t2i"])
    new = _new_tokens(inputs, None)
    count = _Count()
    decoder.generate(inputs, max_new_tokens=new, do_sample=True, stopping_criteria=StoppingCriteriaList([count]))
    prompt = inputs.input_ids.shape[1]
    assert count.calls == list(range(prompt + 1, prompt + new + 1))

    cancel = _Count(cancel_after=10)
    with pytest.raises(Cancelled):
        decoder.generate(inputs, max_new_tokens=new, do_sample=True, stopping_criteria=StoppingCriteriaList([cancel]))
    assert len(cancel.calls) == 10
    plain, fast = _both(ar, decoder, CASES["t2i"], do_sample=True)  # and it serves on
    assert torch.equal(plain, fast)


def test_unsupported_requests_go_to_plain_generate(ar, decoder):
    model, processor = ar
    inputs = _inputs(processor, ["a cat"])
    out = decoder.generate(inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == inputs.input_ids.shape[1] + 5


def test_fused_qkv_is_the_projections_own_memory():
    """fuse_qkv makes q/k/v views of one weight (no copy kept, state dict as before); it is redone only where a plan
    replaced the projections since."""
    processor, tokenizer = tiny._processor()
    model = tiny._ar_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decode_step.fuse_qkv(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    attn = model.model.language_model.layers[0].self_attn
    fused = attn._fused_qkv_weight
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    decode_step.fuse_qkv(model)
    assert attn._fused_qkv_weight is fused  # idempotent
    keep_output_features(attn.q_proj, torch.arange(8))  # as a tensor-parallel plan shards them
    keep_output_features(attn.k_proj, torch.arange(4))
    decode_step.fuse_qkv(model)
    assert attn._fused_qkv_weight.shape[0] == attn._fused_qkv_bias.shape[0] == 8 + 4 + attn.v_proj.out_features
    assert attn.k_proj.weight.data_ptr() == attn._fused_qkv_weight[8].data_ptr()


def test_compiled_step_is_one_graph(ar):
    """torch.compile traces the decode step without a graph break (compute_3d_position_ids' .item() is avoided),
    and its tokens are generate()'s."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    decoder = ar_decode.FastDecoder(ar[0], compile=True, backend="eager", fullgraph=True)
    for seed in (0, 1):
        plain, fast = _both(ar, decoder, CASES["t2i"], seed=seed, do_sample=True)
        assert torch.equal(plain, fast)
    assert decoder.compile_errors == [] and all(s.compiled for s in decoder.slots.values())
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, then reused for the next prompt


@pytest.mark.parametrize("fail_at", [1, 3])
def test_failed_compilation_decodes_eagerly_with_the_same_tokens(ar, fail_at):
    """A compiled step that fails during its slot's first request (at the first call: tracing or compiling; at the
    third: CUDA-graph capture) costs speed, not the request: it is redone eagerly from the same random state."""
    decoder = ar_decode.FastDecoder(ar[0], compile=True, backend="eager")
    calls = []

    def flaky(*args):
        calls.append(1)
        torch.rand(3)  # a random draw before failing: the redone request must not see it
        if len(calls) >= fail_at:
            raise RuntimeError("no compiler here")
        return decoder._forward(*args)

    decoder._compiled = flaky
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        plain, fast = _both(ar, decoder, CASES["t2i"], do_sample=True)
    assert torch.equal(plain, fast)
    assert [s.compiled for s in decoder.slots.values()] == [False] and len(decoder.compile_errors) == 1
    assert torch.equal(_both(ar, decoder, CASES["t2i"], do_sample=True)[1], fast)  # eager from now on, silently


def test_warm_up_compiles_the_slot_before_any_request(ar):
    """warm_up (run at load) compiles the decode step for a request shape: the slot is proven before the first
    request, which then samples generate()'s tokens without tracing anything new."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    decoder = ar_decode.FastDecoder(ar[0], compile=True, backend="eager")
    case = CASES["t2i"]
    inputs = _inputs(ar[1], *case[:3])
    decoder.warm_up(inputs, _new_tokens(inputs, None))
    assert [s.compiled for s in decoder.slots.values()] == [True]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    plain, fast = _both(ar, decoder, case, do_sample=True)
    assert torch.equal(plain, fast)
    assert counters["stats"]["unique_graphs"] == graphs and len(decoder.slots) == 1


def test_compiled_step_failing_after_probation_is_an_error(ar):
    decoder = ar_decode.FastDecoder(ar[0], compile=True, backend="eager")
    _both(ar, decoder, CASES["t2i"], do_sample=True)
    assert [s.compiled for s in decoder.slots.values()] == [True]

    def broken(*args):
        raise RuntimeError("device lost")

    decoder._compiled = broken
    with pytest.raises(RuntimeError, match="device lost"):
        _both(ar, decoder, CASES["t2i"], do_sample=True)


def test_fast_path_is_for_cuda_and_tensor_parallel(ar):
    class OnCuda:
        device = torch.device("cuda")

    assert not ar_decode.enabled(ar[0])  # one CPU process: plain generate()
    assert ar_decode.enabled(OnCuda())
    assert ar_decode.enabled(ar[0], comm=object())  # tensor-parallel: only the fast loop broadcasts the tokens


def test_ar_stage_through_the_fast_path(tiny_glm_image, monkeypatch):
    """The AR stage's own call (progress per token, seed) gives the same prior tokens on either path."""
    runner = LocalRunner(models)
    runner.load("g", "glm_image", path=tiny_glm_image)
    request = {"prompt": ["a red house", "a dog"], "height": 64, "width": 96, "seed": 3, "images": None}
    plain_events, fast_events = [], []
    plain = runner.run("glm_image.ar", "g", request, on_progress=lambda *e: plain_events.append(e))
    monkeypatch.setattr(ar_decode, "enabled", lambda model, comm=None: True)
    fast = runner.run("glm_image.ar", "g", request, on_progress=lambda *e: fast_events.append(e))
    vle = runner.models["g"][1].vision_language_encoder
    assert isinstance(vle.__dict__.get(ar_decode._ATTR), ar_decode.FastDecoder)  # it did take the fast path
    assert torch.equal(plain["prior_token_ids"], fast["prior_token_ids"])
    total = fast_events[-1][2]
    assert fast_events == plain_events == [("tokens", i, total) for i in range(1, total + 1)]
    with pytest.raises(Cancelled):
        runner.run("glm_image.ar", "g", request, should_cancel=lambda: True)
    runner.close()
