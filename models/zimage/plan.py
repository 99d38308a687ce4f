"""Z-Image's sequence-parallel plan: which blocks run sharded and how their arguments relate to the sequence.

The noise refiner (image tokens) and the main layers (the unified image + caption sequence, already padded by the
model to multiples of 32) run sharded; the context refiner sees only the short caption and runs whole on every
rank. The main region ends after the final layer, so ranks exchange its 64-wide output, not the 3840-wide hidden
state. Attention inside the sharded blocks runs through Ulysses by the project's processor (attention.py), which the
stages install whatever the degree.
"""
from __future__ import annotations

from ...parallel.comm import Comm
from ...parallel.sequence import BlockSpec, shard_blocks
from ..processors import check_sequence_parallel

BLOCK = BlockSpec(streams=["x"], outputs=["x"], masks={"attn_mask": "x"}, rope={"freqs_cis": ("x", 1)})


def apply_sequence_parallel(transformer, comm: Comm) -> None:
    if comm.layout.sp == 1:
        return
    check_sequence_parallel("Z-Image")
    shard_blocks(list(transformer.noise_refiner), comm, BLOCK)
    final_layer = transformer.all_final_layer["2-1"]  # patch 2, frame patch 1: what ZImagePipeline runs
    shard_blocks([*transformer.layers, final_layer], comm, BLOCK)

