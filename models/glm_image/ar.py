"""The AR stage (glm_image.ar): GLM-Image's autoregressive model samples the prior tokens the DiT is conditioned on."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import PIL.Image
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ...parallel import Cancelled, Parallelism, StageContext
from . import ar_decode
from .inputs import as_pil_images, check_prompts, check_size, prompt_list

if TYPE_CHECKING:  # model.py imports this module (it attaches the AR at load time)
    from .model import GlmImage


def ar_parallelism(model: GlmImage) -> Parallelism:
    return (Parallelism.EVERY_RANK_IN_STEP if model.ar_tensor_parallel
            else Parallelism.MAIN_RANK_ONLY_AND_SEND_TO_OTHERS)


def ar_comm(ctx: StageContext, model: GlmImage):
    return ctx.comm if model.ar_tensor_parallel else None


@torch.no_grad()
def ar(ctx: StageContext, model: GlmImage, *, prompt: str | list[str], height: int, width: int, seed: int,
       images: list | None = None) -> dict[str, Any]:
    """Sample the prior tokens as diffusers' generate_prior_tokens does, with the user's seed.

    Returns {"prior_token_ids": (B, (H/16)(W/16)) long, "condition_prior_token_ids": one (h_i/16 * w_i/16,) long
    per condition image (editing) or None, "sampled_on_rank": 0}. A rank left out of the tensor-parallel AR
    returns None at once (the executor hands it rank 0's result)."""
    if model.vision_language_encoder is None:
        return None
    check_size(height, width)
    prompts = prompt_list(prompt)
    images = as_pil_images(images)
    if images and len(prompts) != 1:
        raise ValueError(f"editing takes one prompt, got {len(prompts)}")
    check_prompts(prompts, model.processor)
    model.weights.use("ar")
    vle, dev = model.vision_language_encoder, ctx.device
    inputs, max_new_tokens, (offset, grid_h, grid_w) = ar_request(model.processor, prompts, images, height, width,
                                                                   dev)
    condition_prior_token_ids = None
    if images:
        source_grids = inputs["image_grid_thw"][:len(images)]
        check_condition_grids(images, source_grids.tolist())
        features = vle.get_image_features(inputs["pixel_values"], source_grids).pooler_output
        # One (C, h, w) map per image: get_image_tokens iterates over images. (diffusers 0.42.1 concatenates the
        # maps first, so transformers 5.23 iterates over channels and fails; the reference test splits them back.)
        tokens = vle.get_image_tokens(list(features), source_grids)
        condition_prior_token_ids = [
            upsample_token_ids(ids, h, w)[0].cpu()
            for ids, (_, h, w) in zip(tokens.split(source_grids.prod(-1).tolist()), source_grids.tolist())
        ]

    input_len = inputs["input_ids"].shape[-1]
    progress = _TokenProgress(ctx, input_len, max_new_tokens, in_step=model.ar_tensor_parallel)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # as diffusers does: generate() takes no generator
        if dev.type == "cuda":
            torch.cuda.manual_seed(seed)
        # generate() itself; on CUDA with a static KV cache and a compiled decode step (ar_decode.py): same tokens
        outputs = ar_decode.generate(vle, inputs, ar_comm(ctx, model), max_new_tokens=max_new_tokens,
                                     do_sample=True, stopping_criteria=StoppingCriteriaList([progress]))
    generated = outputs[:, input_len:]
    if generated.shape[1] < offset + grid_h * grid_w:
        raise RuntimeError(f"the AR model stopped after {generated.shape[1]} of {max_new_tokens} tokens "
                           f"(it sampled its end token early); try another seed")
    prior = torch.cat([upsample_token_ids(g[offset:offset + grid_h * grid_w], grid_h, grid_w) for g in generated])
    codebook = model.transformer.config.prior_vq_quantizer_codebook_size
    if int(prior.max()) >= codebook:  # a sample of a batch ended early and was padded
        raise RuntimeError(f"the AR model put token {int(prior.max())} into an image grid, outside the DiT's "
                           f"codebook of {codebook} (it sampled its end token early); try another seed")
    return {"prior_token_ids": prior.cpu(), "condition_prior_token_ids": condition_prior_token_ids,
            "sampled_on_rank": 0 if model.ar_tensor_parallel else ctx.comm.rank}  # tensor-parallel: rank 0's tokens


def ar_request(processor, prompts: list[str], images: list | None, height: int, width: int, dev: torch.device):
    """The AR's input ids for a request, how many tokens it samples, and where the target grid lies in them:
    (inputs, max_new_tokens, (offset, grid_h, grid_w)), as diffusers' generate_prior_tokens computes them."""
    content = [{"type": "image", "image": img} for img in images or []]
    messages = [[{"role": "user", "content": [*content, {"type": "text", "text": p}]}] for p in prompts]
    try:
        inputs = processor.apply_chat_template(
            messages, tokenize=True, padding=len(prompts) > 1, target_h=height, target_w=width, return_dict=True,
            return_tensors="pt").to(dev)
    except Exception as exc:  # noqa: BLE001 - the processor's own message, with the prompt it refused
        raise ValueError(f"the GLM-Image processor rejected the request ({prompts!r}): {exc}") from exc
    grids = inputs["image_grid_thw"]
    per_sample = int(inputs["images_per_sample"][0]) if inputs.get("images_per_sample") is not None else len(grids)
    sample_grids = grids[:per_sample].tolist()
    sizes = [h * w for _, h, w in sample_grids]
    if images:  # the target grid follows the sources
        return inputs, sizes[-1] + 1, (0, *sample_grids[-1][1:])
    # the target grid, then the small preview grid, which is sampled first
    return inputs, sum(sizes) + 1, (sum(sizes[1:]), *sample_grids[0][1:])


CANCEL_CHECK_TOKENS = 32  # tensor-parallel AR: how often the ranks agree on a cancel (a host round trip each)


class _TokenProgress(StoppingCriteria):
    """Called by generate() after every sampled token: rank-0 progress, and the cancel check (raising Cancelled
    leaves generate()). One rank: checked every token, the executor tells the others. Every rank in step
    (`in_step`, tensor-parallel): all ranks of the AR's group take rank 0's decision together after the first
    token and every CANCEL_CHECK_TOKENS tokens after it, so none is left waiting in a collective. Never stops generation itself,
    and draws no random numbers, so the sampled tokens are those of a plain generate()."""

    def __init__(self, ctx: StageContext, input_len: int, total: int, in_step: bool = False):
        self.ctx, self.input_len, self.total, self.in_step = ctx, input_len, total, in_step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = input_ids.shape[-1] - self.input_len
        if self.in_step:
            if done % CANCEL_CHECK_TOKENS == 1:  # the first token, then every CANCEL_CHECK_TOKENS
                self.ctx.step(done, self.total, "tokens", ar_decode.TP_GROUP)
            elif self.ctx.is_main:
                self.ctx.report("tokens", done, self.total)
        else:
            self.ctx.report("tokens", done, self.total)
            if self.ctx.cancel_requested():
                raise Cancelled(done, self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def check_condition_grids(images: list[PIL.Image.Image], grids: list[list[int]]) -> None:
    """The AR tokenizes a condition image on a grid the processor chooses (halved, rounded, clamped to its pixel
    limits); the DiT sees the image cropped to a multiple of 16. Their grids must match (the AR's upsampled 2x),
    else the DiT fails deep inside with a shape error: say so here instead."""
    for i, (img, (_, grid_h, grid_w)) in enumerate(zip(images, grids)):
        if (img.height // 16, img.width // 16) != (2 * grid_h, 2 * grid_w):
            raise ValueError(
                f"condition image {i} is {img.width}x{img.height}: the AR tokenizes it on a {grid_w}x{grid_h} grid, "
                f"the DiT on {img.width // 16}x{img.height // 16} (a size's 16th); resize it so that both sides are "
                f"multiples of 32 within the processor's pixel limits, e.g. {32 * grid_w}x{32 * grid_h}")


def upsample_token_ids(token_ids: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(h*w,) tokens of the H/32 grid -> (1, 4*h*w) tokens of the H/16 grid (nearest, as diffusers)."""
    grid = token_ids.view(1, 1, grid_h, grid_w).float()
    return torch.nn.functional.interpolate(grid, scale_factor=2, mode="nearest").long().view(1, -1)
