"""GLM-Image's request checks and input conversions, shared by the stages, the library's generate, the CLI and the
nodes."""
from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from .. import checks

SIZE_MULTIPLE = 32  # the AR grid is H/32 x W/32
MAX_SIZE = 4096  # the largest side the nodes offer; the library and the CLI refuse larger too
# Strings the AR processor gives a meaning of its own: in a user prompt they would corrupt the token grid.
RESERVED = ("<|image|>", "<sop>", "<eop>", "<|dit_token_")


def check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        checks.side("GLM-Image", name, value, SIZE_MULTIPLE, MAX_SIZE, f" (the AR token grid is {name}/32)")


def check_inputs(*, prompts: list[str] | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | None = None) -> None:
    """The values of a GLM-Image request, each checked alone, where the request enters (the library's generate,
    the CLI, the nodes, at queue time through VALIDATE_INPUTS): a refusal inside the workers would restart the
    group. None: not known there (a node input linked to another node's output)."""
    if prompts is not None:
        check_prompts(prompts)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            checks.side("GLM-Image", name, value, SIZE_MULTIPLE, MAX_SIZE, f" (the AR token grid is {name}/32)")
    if steps is not None:
        checks.integer("GLM-Image steps", steps, 1, hint="GLM-Image takes 50")
    if guidance is not None:
        checks.number("GLM-Image guidance", guidance, 0.0, "1 or less turns it off, GLM-Image takes 1.5")
    if seed is not None:
        checks.seed(seed)


def check_prompts(prompts: list[str], processor=None) -> None:
    """Refuse prompts the AR processor would misread (its image, grid and DiT token markers). An empty prompt is
    a prompt (diffusers takes it too: an image from the glyph-free, text-free AR)."""
    reserved = list(RESERVED)
    if processor is not None:
        tok = processor.tokenizer
        reserved += [t for t in (processor.image_token, processor.grid_bos_token, processor.grid_eos_token,
                                 tok.bos_token, tok.eos_token) if t]
    if not prompts:
        raise ValueError("no prompt given; GLM-Image takes one or more prompts (an empty one too)")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"a GLM-Image prompt must be a string, got {p!r}")
        found = [r for r in reserved if r in p]
        if found:
            raise ValueError(f"the GLM-Image prompt {p!r} contains {found[0]!r}, which the AR processor reserves "
                             f"for its own markers (the image size comes from height and width); remove it")


def as_pil_images(images) -> list[PIL.Image.Image] | None:
    """Condition images as RGB PIL images: PIL images, or (H, W, 3) / (B, H, W, 3) float [0, 1] tensors or arrays
    (ComfyUI's IMAGE), or uint8 arrays."""
    if images is None:
        return None
    if isinstance(images, (PIL.Image.Image, torch.Tensor, np.ndarray)):
        images = [images]
    out = []
    for img in images:
        if isinstance(img, PIL.Image.Image):
            out.append(img.convert("RGB"))
            continue
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if arr.ndim == 4:
            out.extend(as_pil_images(list(arr)))
            continue
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"a condition image must be (H, W, 3), got shape {tuple(arr.shape)}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        out.append(PIL.Image.fromarray(arr, "RGB"))
    return out or None


def prompt_list(prompt: str | list[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    return prompts
