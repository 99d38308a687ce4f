"""Z-Image's DiT as ComfyUI's samplers call it: one model evaluation per request, on the worker group.

ComfyUI keeps its text encoder, VAE and sampler; each evaluation its sampler makes (the conditional and the
unconditional branch of one step together) is one `zimage.predict` request. The workers hold only the DiT, loaded
from the same diffusion model file ComfyUI loaded (`DIT_LOADER`), and return what ComfyUI's own NextDiT returns.

ComfyUI's conventions (checked against its NextDiT and KSampler, ComfyUI 0.8.0): the model gets ComfyUI's timestep
(sigma, multiplier 1) and runs at diffusers' time 1 - sigma; its output is the negated DiT output, which equals
diffusers' `noise_pred`. The latents are the model's own space (ComfyUI's process_in has already been applied).

What does not change between steps stays in the workers for the prompt: each caption's features are sent once and
named by a key; a LoRA's factors are sent once, and a new strength sends only the scales. `DiTClient` is the host's
side of that (it needs no ComfyUI); a worker that lost the state (a restarted group) answers MISSING and the client
sends everything again.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

from ...parallel import Loader, Parallelism, Stage, StageContext
from ...parallel.cfg import run_branches
from ..lora import LoRAFactor
from . import comfyui_files
from .stages import ZImage, apply_lora, setup_transformer

MISSING = "missing"  # a worker's answer when the host refers to state it does not hold
MAX_CAPTIONS = 8  # captions kept resident: a prompt's positive and negative, and a few of earlier prompts


def load_dit(ctx: StageContext, *, transformer: str, weight_dtype: str = "default") -> ZImage:
    """Only the DiT of a ComfyUI diffusion model file: ComfyUI encodes the text and decodes the latents itself.
    weight_dtype as the loaders' (fp8_e4m3fn where ComfyUI's Load Diffusion Model stores the weights in fp8)."""
    comfyui_files.inspect_transformer(transformer)
    dit = comfyui_files.load_transformer(transformer, ctx.dtype, ctx.device)
    setup_transformer(ctx, dit, weight_dtype)
    return ZImage(dit, comfyui_files.scheduler_config())


# -- LoRA: ComfyUI's patches of its NextDiT's weights, as factors of the diffusers DiT's layers ------------------

@dataclass(frozen=True)
class LoRAPatch:
    """One LoRA patch of a weight of ComfyUI's NextDiT, as ComfyUI's LoRA loaders leave it on a MODEL."""
    key: str  # the NextDiT weight's name, e.g. "layers.0.attention.qkv.weight"
    rows: int  # that weight's row count
    offset: tuple[int, int] | None  # (first row, row count) the patch covers; None: the whole weight
    up: torch.Tensor  # (patched rows, rank)
    down: torch.Tensor  # (rank, in features)
    scale: float  # strength x alpha / rank


def diffusers_rows(key: str, rows: int) -> dict[str, torch.Tensor]:
    """Which rows of the NextDiT weight `key` each diffusers weight holds, by diffusers' own key converter run on the
    row numbers (a fused qkv weight becomes to_q, to_k and to_v)."""
    probe = {key: torch.arange(rows, dtype=torch.float64).unsqueeze(1)}
    return {name: t[:, 0].long() for name, t in convert_z_image_transformer_checkpoint_to_diffusers(probe).items()}


def lora_layers(patches: list[LoRAPatch]) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Each diffusers weight's LoRA factors: (index of the patch, up rows for that weight), zero rows where the
    patch does not reach (an offset patch covering part of a weight)."""
    layers: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for index, patch in enumerate(patches):
        start, count = patch.offset or (0, patch.rows)
        if patch.up.shape[0] != count:
            raise ValueError(f"a LoRA patch of {patch.key} has {patch.up.shape[0]} rows, its offset {patch.offset} "
                             f"covers {count}")
        for name, rows in diffusers_rows(patch.key, patch.rows).items():
            covered = (rows >= start) & (rows < start + count)
            if not covered.any():
                continue
            up = patch.up.new_zeros(len(rows), patch.up.shape[1])
            up[covered] = patch.up[rows[covered] - start]
            layers.setdefault(name, []).append((index, up))
    return layers


def lora_factors(patches: list[LoRAPatch]) -> dict[str, list[LoRAFactor]]:
    """The patches as the diffusers DiT's LoRA factors (what stages.denoise takes)."""
    return {name: [LoRAFactor(up, patches[index].down, patches[index].scale) for index, up in entries]
            for name, entries in lora_layers(patches).items()}


# -- the worker's stage ------------------------------------------------------------------------------------------

@dataclass
class _Resident:
    """What a worker keeps for one host client between requests."""
    model: ZImage
    session: str
    captions: dict[int, torch.Tensor] = field(default_factory=dict)  # key -> (L, D) on the device
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # layer -> (up, down)


@torch.no_grad()
def predict(ctx: StageContext, model: ZImage, *, session: str, reset: bool, x: torch.Tensor, timestep: torch.Tensor,
            branches: list[list[int]], captions: dict[int, torch.Tensor], drop: list[int],
            lora_factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None,
            lora_scales: dict[str, list[float]] | None) -> list[torch.Tensor] | str:
    """ComfyUI's model output for each branch (a list of caption keys, one per image of x), all at ComfyUI's
    timestep. Branches run on the cfg groups when the layout has two and there are two; else batched in one call."""
    resident = ctx.state.get("zimage.predict")
    if reset or resident is None or resident.model is not model:
        if not reset:
            return MISSING
        resident = ctx.state["zimage.predict"] = _Resident(model, session)
        lora_factors = lora_factors or {}
    elif resident.session != session:
        return MISSING
    model.weights.use("transformer")
    for key in drop:
        resident.captions.pop(key, None)
    dev, dtype = ctx.device, model.transformer.dtype
    resident.captions.update({key: c.to(dev, dtype) for key, c in captions.items()})
    if lora_factors is not None:
        resident.factors = {name: [(up.to(dev), down.to(dev)) for up, down in fs] for name, fs in lora_factors.items()}
    if lora_scales is not None:
        _apply_lora(model, resident.factors, lora_scales)
    if any(key not in resident.captions for branch in branches for key in branch):
        return MISSING
    x = x.to(dev, dtype)
    time = (1 - timestep.float()).to(dev)  # ComfyUI's NextDiT runs at 1 - sigma, as diffusers' pipeline does
    embeds = [[resident.captions[key] for key in branch] for branch in branches]
    # one branch on a cfg layout (ComfyUI at cfg 1, or a call it did not batch): every cfg group computes it
    if ctx.comm.layout.cfg > 1 and len(branches) == ctx.comm.layout.cfg:
        raw = run_branches(ctx.comm, [lambda e=e: model.predict(x, time, e) for e in embeds])
    else:  # one batched call, as ComfyUI batches cond and uncond
        n = len(branches)
        raw = model.predict(torch.cat([x] * n), torch.cat([time] * n), sum(embeds, [])).chunk(n)
    return [-r.cpu() for r in raw]


def _apply_lora(model: ZImage, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                scales: dict[str, list[float]]) -> None:
    apply_lora(model, {name: [LoRAFactor(up, down, scale) for (up, down), scale in zip(factors[name], scales[name])]
                       for name in scales})


PREDICT = Stage("zimage.predict", Parallelism.EVERY_RANK, predict)
DIT_LOADER = Loader("zimage_dit", load_dit)


# -- the host's side ---------------------------------------------------------------------------------------------

class DiTClient:
    """Sends one model evaluation per call, with only what the workers do not hold yet.

        client = DiTClient(run)     # run(stage, inputs) -> the stage's result, e.g. a runner bound to a model
        outputs = client.predict(x, timestep, [cond_captions, uncond_captions], lora_patches)
    """

    def __init__(self, run: Callable[[str, dict[str, Any]], Any]):
        self.run = run
        self._forget()

    def _forget(self) -> None:
        self.session = uuid.uuid4().hex
        self._reset = True
        # (key, a copy of the host's tensor on its own device), most recent last: a caption is compared where it
        # is, since copying it to the CPU each step to compare it there would wait on the GPU every time
        self._captions: list[tuple[int, torch.Tensor]] = []
        self._next_key = 0
        self._lora: tuple | None = None  # the factors sent: ((layer, patch index, up, down)...) by identity
        self._scales: dict[str, list[float]] | None = None

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, branches: list[list[torch.Tensor]],
                lora: list[LoRAPatch]) -> list[torch.Tensor]:
        """x: (B, 16, H, W) latents in the model's space; timestep: (B,) ComfyUI's; branches: per branch, one
        caption (L, D) per image. Returns ComfyUI's model output per branch."""
        for _ in range(2):  # a second time only after the workers answered MISSING (their state was lost)
            result = self.run("zimage.predict", self._request(x, timestep, branches, lora))
            if result != MISSING:
                self._reset = False
                return result
            self._forget()
        raise RuntimeError("the workers lost the captions they were just sent")

    def _request(self, x, timestep, branches, lora) -> dict[str, Any]:
        new: dict[int, torch.Tensor] = {}
        keys = [[self._caption_key(c.detach(), new) for c in branch] for branch in branches]
        used = {key for branch in keys for key in branch}
        drop = [key for key, _ in self._captions if key not in used][:max(0, len(self._captions) - MAX_CAPTIONS)]
        self._captions = [(key, c) for key, c in self._captions if key not in drop]
        factors, scales = self._lora_update(lora)
        return {"session": self.session, "reset": self._reset, "x": x.detach().float().cpu(),
                "timestep": timestep.detach().float().cpu(), "branches": keys, "captions": new, "drop": drop,
                "lora_factors": factors, "lora_scales": scales}

    def _caption_key(self, caption: torch.Tensor, new: dict[int, torch.Tensor]) -> int:
        for i, (key, known) in enumerate(self._captions):
            if (known.device, known.dtype, known.shape) == (caption.device, caption.dtype, caption.shape) and \
                    torch.equal(known, caption):
                self._captions.append(self._captions.pop(i))  # most recently used last
                if self._reset:
                    new[key] = known.float().cpu()
                return key
        key, self._next_key = self._next_key, self._next_key + 1
        self._captions.append((key, caption.clone()))  # a copy: the host may change its tensor in place later
        new[key] = caption.float().cpu()
        return key

    def _lora_update(self, patches: list[LoRAPatch]):
        """(factors or None, scales or None): what changed since the last request. The factors are the LoRA
        files' tensors, known by identity (ComfyUI keeps a loaded LoRA's tensors across strength changes)."""
        layers = lora_layers(patches)
        identity = tuple((name, index, id(patches[index].up), id(patches[index].down))
                         for name, entries in sorted(layers.items()) for index, _ in entries)
        scales = {name: [patches[index].scale for index, _ in entries] for name, entries in layers.items()}
        factors = None
        if self._reset or identity != (self._lora and self._lora[0]):
            factors = {name: [(up, patches[index].down) for index, up in entries] for name, entries in layers.items()}
            # the tensors themselves are kept, so that an id is never reused while it names sent factors
            self._lora = (identity, [(p.up, p.down) for p in patches])
        elif scales == self._scales:
            return None, None
        self._scales = scales
        return factors, scales
