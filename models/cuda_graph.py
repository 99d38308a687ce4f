"""A whole model call replayed as one CUDA graph.

    predict = GraphedCall(fn)      # fn(*args): args and result are tensors or lists/tuples of them
    predict = graphed_on(device, fn)   # a GraphedCall on a CUDA device, fn itself elsewhere
    out = predict(x, t, embeds)    # the first WARMUP calls of a signature run fn; the next captures, then replays

Why: a DiT forward launches thousands of kernels from Python (the blocks' compiled code, the all-to-alls, the
model's patchify, rotary and padding glue). On 4 GPUs each rank's share of the work is small enough that the host
cannot launch it as fast as the GPU runs it, and every host hiccup on one rank stalls the others in the next
all-to-all (a 1024x1024 Z-Image profile: 0.11-0.41 s per rank waiting in NCCL against ~37 ms of transfer,
bench/results/zimage_turbo_denoise_1024_h200x4_compiled_profile.json). Replayed from a graph, each rank's kernels,
NCCL's included, run back to back at GPU speed: on 4 H200s 0.311 s (the profile run above) -> 0.279 s
(zimage_turbo_denoise_h200x4_graphs.json), each rank busy 92-96% of the run
(zimage_turbo_denoise_1024_h200x4_graphs_profile.json).

A graph is captured per input signature (shapes, dtypes, devices and nesting); one is kept, so a new signature
(another image size, another caption length) replaces the old graph and frees its memory. The first WARMUP calls of
a signature run eagerly and are the real calls (a denoising loop's first steps): torch.compile compiles and NCCL
sets up there, never inside a capture, and a new signature costs no extra forward. Outputs are copied out of the
graph's memory, which the next replay overwrites.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

# Real calls before the capture: the first compiles (the blocks, with a dynamic length once they see a second one);
# the second must then find nothing left to compile, since compiling inside a capture would fail.
WARMUP = 2


def graphed_on(device: torch.device, fn: Callable[..., Any]) -> Callable[..., Any]:
    return GraphedCall(fn) if device.type == "cuda" else fn


class GraphedCall:
    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        # The eager calls and the capture share one stream: libraries set up per-stream state (cuBLAS workspaces)
        # on first use, which must not happen inside a capture.
        self._stream = torch.cuda.Stream()
        self.clear()

    def clear(self) -> None:
        """Drop the captured graph (the next calls warm up and capture anew): after changing what a capture would
        record."""
        self._signature = self._graph = self._inputs = self._output = None
        self._eager_calls = 0

    def __call__(self, *args: Any) -> Any:
        flat, spec = pytree.tree_flatten(args)
        signature = (spec, tuple((t.shape, t.dtype, t.device) for t in flat))
        if signature != self._signature:
            self.clear()
            self._signature = signature
        if self._graph is None and self._eager_calls < WARMUP:
            self._eager_calls += 1
            return self._on_own_stream(lambda: self.fn(*args))
        if self._graph is None:
            self._on_own_stream(lambda: self._capture(flat, spec))
        for static, new in zip(self._inputs, flat):
            static.copy_(new)
        self._graph.replay()
        return pytree.tree_map(torch.clone, self._output)

    def _on_own_stream(self, work: Callable[[], Any]) -> Any:
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            result = work()
        torch.cuda.current_stream().wait_stream(self._stream)
        return result

    def _capture(self, flat: list[torch.Tensor], spec: pytree.TreeSpec) -> None:
        inputs = [t.clone() for t in flat]  # the addresses the graph reads from
        torch.cuda.synchronize()  # no collective of the eager calls may still be in flight when the capture begins
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread keeps polling its events while this thread captures
        with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            output = self.fn(*pytree.tree_unflatten(inputs, spec))
        self._graph, self._inputs, self._output = graph, inputs, output
