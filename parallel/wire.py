"""How requests and results travel between processes: pickle for their structure, raw bytes for their tensors.

pack() pickles an object with every CPU-copyable tensor left out of the pickle and returned beside it as a flat byte
tensor; unpack() puts the tensors back. The channel (channel.py) writes those bytes to its socket as they are, and
Comm.broadcast_object sends them in one transfer over the device group. Pickling tensors the default way goes
through torch.save for each storage: a 1024x1024 Z-Image request (2.4 MB) took 3.8-4.0 ms from the host to rank 0
that way on an H200 host, 0.6 ms this way (bench/results/runtime_overhead_zimage1024_h200x4.json).
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import torch

ALIGN = 64  # where tensors share one buffer, each starts at a multiple of this (any dtype may view it)


class _Packer(pickle.Pickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor) or obj.layout != torch.strided or obj.is_quantized:
            return None  # pickled as usual
        tensor = obj.detach().resolve_conj().resolve_neg().cpu()
        if not _dense(tensor):
            tensor = tensor.contiguous()
        # A dense tensor fills one run of its storage, in whatever order (a decoded image permuted to channels-last):
        # that run goes as it is, with the strides, so nothing is copied here and the receiver gets the same layout.
        self.tensors.append(tensor.as_strided((tensor.numel(),), (1,)).view(torch.uint8))
        return tensor.dtype, tuple(tensor.shape), tensor.stride()


class _Unpacker(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]):
        super().__init__(file)
        self.tensors = iter(tensors)

    def persistent_load(self, pid: Any) -> torch.Tensor:
        dtype, shape, stride = pid
        return next(self.tensors).view(dtype).as_strided(shape, stride)


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor's elements exactly fill numel consecutive places of its storage (no gaps, no overlap)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def pack(obj: Any) -> tuple[bytes, list[torch.Tensor]]:
    """(the pickle of `obj` without its tensors, each tensor's bytes as a 1-d uint8 CPU tensor, in order). A
    tensor's bytes may be the tensor's own memory: send them before changing it."""
    file, tensors = io.BytesIO(), []
    _Packer(file, tensors).dump(obj)
    return file.getvalue(), tensors


def unpack(header: bytes, tensors: list[torch.Tensor]) -> Any:
    """The object pack() took apart; `tensors` are its byte tensors (uint8, 1-d, each at an ALIGN-ed offset of its
    storage), which the tensors in the result view without copying."""
    return _Unpacker(io.BytesIO(header), tensors).load()


def offsets(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of byte tensors of these sizes in one shared buffer, and the buffer's size."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // ALIGN) * ALIGN
    return offsets, end
