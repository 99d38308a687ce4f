"""GLM-Image (diffusers GlmImagePipeline) as stages: ar -> prepare -> denoise -> decode.

Each function mirrors one part of diffusers' GlmImagePipeline.__call__ so the single-process run equals it (the
reference tests hold it to that), and declares which ranks run it (parallel.Parallelism):

- glm_image.ar       EVERY_RANK_IN_STEP, or             ranks 0..n-1 each hold 1/n of the ~10 B AR decoder (by
                    MAIN_RANK_ONLY_AND_SEND_TO_OTHERS  default on several CUDA GPUs; n the largest GPU count it
                                                        splits over; plan.py shards it at load time) and sample in
                                                        step, rank 0 deciding each token; else rank 0 alone holds
                                                        it. Every rank gets the tokens.
- glm_image.prepare  MAIN_RANK_ONLY                     glyph embeddings, seeded noise, size conditioning and the
                                                        condition-image latents, on rank 0, which alone holds the
                                                        glyph encoder and the VAE; the host sends them on with the
                                                        denoise request.
- glm_image.denoise  EVERY_RANK                         the DiT loop: its blocks sharded over the sequence by the
                                                        hooks plan.py installs at load time, guidance branches split
                                                        by parallel.cfg.run_branches; every rank ends with the
                                                        whole latents.
- glm_image.decode   MAIN_RANK_ONLY                     only the host needs the image: rank 0 decodes, nobody
                                                        else spends time or memory on it and nothing is broadcast.

denoise returns, and decode takes, latents in the space their `latent_space` names (latent_format.py): diffusers'
normalised latents for the CLI, the VAE's raw space for ComfyUI's LATENT.

Inputs and outputs are plain CPU values (tensors, lists, PIL images, numbers): they cross process boundaries.
Batches: any number of prompts for text-to-image; editing (condition images) takes one prompt.
"""
from __future__ import annotations

from ...parallel import Loader, Parallelism, Stage
from .ar import ar, ar_parallelism
from .decode import decode
from .denoise import denoise
from .model import load
from .prepare import prepare

LOADER = Loader("glm_image", load)
STAGES = [
    Stage("glm_image.ar", ar_parallelism, ar),
    Stage("glm_image.prepare", Parallelism.MAIN_RANK_ONLY, prepare),
    Stage("glm_image.denoise", Parallelism.EVERY_RANK, denoise),
    Stage("glm_image.decode", Parallelism.MAIN_RANK_ONLY, decode),
]
