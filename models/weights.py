"""Safetensors weights read straight into a model on its device, in its compute dtype, strictly.

Why not from_pretrained(...).to(device): it holds the model in host memory first; for Z-Image-Turbo's folder one
process peaked at 20.7 GB over its baseline, with accelerate or without (bench/results/load_h200.json, an H200).
Here a diffusers model is built on the meta device (no memory, no random initialisation) and a transformers model
on its device in the compute dtype (its constructor makes its non-persistent buffers there; its random weights are
freed as each is replaced), and each tensor is read from the file through a
small ring of staging buffers into its place on the device, cast there, and assigned: a rank's host memory for
loading is that ring (256 MB), whatever the model. Reads go through the page cache, so ranks on one host reading
the same file share it.

Strict: every weight of the model must be filled and every tensor offered must be used, with shapes equal; an
fp8 tensor is upcast (exact: every fp8 value is a bf16 value). Problems are one line naming the file.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}


class WeightsError(ValueError):
    """A weights file that cannot fill the model; the message is one line naming the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def header(file) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, from its header alone; a truncated or foreign file is refused."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            entries = json.loads(f.read(length))
        base = 8 + length
        infos = {}
        for name, entry in entries.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name} has dtype {entry['dtype']}, which this loader does not read")
            start, end = entry["data_offsets"]
            infos[name] = TensorInfo(file, DTYPES[entry["dtype"]], tuple(entry["shape"]), base + start, base + end)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise WeightsError(f"{file} is not a safetensors file ({exc})") from None
    end = max((t.end for t in infos.values()), default=base)
    if size < end:
        raise WeightsError(f"{file} is truncated ({size} of {end} bytes); download it again")
    return infos


def holds(file, probes: dict[str, torch.Tensor], prefix: str = "") -> bool:
    """Whether the file's tensors of these names (or prefix + name) equal `probes`, compared in the probes' dtype
    (a model loaded in a narrower dtype than its file still matches); only those tensors are read."""
    try:
        infos = header(file)
    except WeightsError:
        return False
    names = {name: name if name in infos else prefix + name for name in probes}
    if any(infos.get(stored) is None or infos[stored].shape != tuple(probes[name].shape)
           for name, stored in names.items()):
        return False
    with Path(file).open("rb") as f:
        for name, stored in names.items():
            info, probe = infos[stored], probes[name]
            f.seek(info.start)
            value = torch.frombuffer(bytearray(f.read(info.end - info.start)), dtype=info.dtype).reshape(info.shape)
            if not torch.equal(value.to(probe.dtype), probe.cpu()):
                return False
    return True


def headers(files: Iterable) -> dict[str, TensorInfo]:
    """The tensors of several files (shards of one model); a name in two files is refused."""
    merged: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in header(file).items():
            if name in merged:
                raise WeightsError(f"{info.file} and {merged[name].file} both hold tensor {name}")
            merged[name] = info
    return merged


def nbytes(infos: dict[str, TensorInfo], dtype: torch.dtype) -> int:
    """What the tensors take once loaded, floating-point ones in `dtype` (as fill casts them)."""
    return sum(math.prod(t.shape) * (dtype.itemsize if t.dtype.is_floating_point else t.dtype.itemsize)
               for t in infos.values())


READ_AHEAD = 4  # staging buffers, each filled by a reader thread while the one before is copied out
CHUNK = 64 << 20  # bytes per staging buffer: host memory for reading is READ_AHEAD x CHUNK, whatever the model


def tensors(infos: dict[str, TensorInfo], device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor on `device`, in the file's dtype) for each entry, in order.

    Each tensor is read in CHUNK pieces into a ring of READ_AHEAD staging buffers by reader threads (file reads
    release the GIL) and copied from there into a tensor of its own on the device, so host memory stays at the
    ring's 256 MB for any model. On CUDA the ring is page-locked and the copies asynchronous: from pageable memory
    Z-Image's folder took 12.1 s to load on an H200 (4.6 s page-locked), and one page-locked buffer per tensor made
    torch's host cache grow to the largest tensors (bench/results/load_zimage_h200_pageable.json,
    load_zimage_h200_pinned_per_tensor.json; the ring: load_h200.json, 3.19 s). On the
    CPU each tensor gets torch's own allocation, whose alignment CPU kernels' summation order depends on (the
    views into a memory map that diffusers makes move results by 1e-7 per Linear)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    staging = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=cuda) for _ in range(READ_AHEAD)]
    copied: list = [None] * READ_AHEAD  # CUDA events: the last copy out of each buffer has finished
    jobs = [(name, info, offset) for name, info in infos.items() for offset in range(info.start, info.end, CHUNK)]

    def fill_buffer(j: int) -> int:
        _, info, offset = jobs[j]
        buffer = j % READ_AHEAD
        if copied[buffer] is not None:
            copied[buffer].synchronize()
        n = min(CHUNK, info.end - offset)
        with info.file.open("rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(staging[buffer].numpy())[:n]) != n:
                raise WeightsError(f"{info.file} ended inside tensor data; download it again")
        return n

    with concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:
        pending = {j: pool.submit(fill_buffer, j) for j in range(min(READ_AHEAD, len(jobs)))}
        j = 0
        for name, info in infos.items():
            out = torch.empty(info.end - info.start, dtype=torch.uint8, device=device)
            while j < len(jobs) and jobs[j][0] == name:
                n, buffer, at = pending.pop(j).result(), j % READ_AHEAD, jobs[j][2] - info.start
                out[at:at + n].copy_(staging[buffer][:n], non_blocking=cuda)
                if cuda:
                    copied[buffer] = torch.cuda.Event()
                    copied[buffer].record()
                if j + READ_AHEAD < len(jobs):
                    pending[j + READ_AHEAD] = pool.submit(fill_buffer, j + READ_AHEAD)
                j += 1
            yield name, out.view(info.dtype).view(info.shape)


def empty_model(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The module `build` makes, on the meta device: no memory and no random initialisation."""
    with torch.device("meta"):
        return build()


def fill(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, source: str,
         device, dtype: torch.dtype) -> torch.nn.Module:
    """Assign each (name, tensor) to `model`'s weight of that name (a state-dict name), on `device`, floating-point
    tensors cast to `dtype` there. Every weight must be filled exactly once; a weight the model ties to another
    (transformers' `_tied_weights_keys`) may be left out and then shares the filled one. Afterwards no tensor of
    the model may be left on the meta device."""
    # Shapes and dtypes only: holding the tensors would keep a device-built model's random weights alive until the
    # end (8 GB more GPU memory for Qwen3-4B, bench/results/load_zimage_h200.json).
    targets = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict(keep_vars=True).items()}
    filled: set[str] = set()
    for name, tensor in tensors:
        target = targets.get(name)
        if target is None:
            raise WeightsError(f"{source}: tensor {name} is not a weight of {type(model).__name__}; is this a "
                               f"file of another model?")
        shape, target_dtype = target
        if tuple(tensor.shape) != shape:
            raise WeightsError(f"{source}: {name} has shape {tuple(tensor.shape)}, {type(model).__name__} needs "
                               f"{shape}")
        if name in filled:
            raise WeightsError(f"{source}: {name} is given twice")
        value = tensor.to(device)
        _assign(model, name, value.to(dtype if target_dtype.is_floating_point else target_dtype))
        filled.add(name)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    for name in set(targets) - filled:
        if isinstance(tied, dict) and tied.get(name) in filled:
            _assign(model, name, model.get_parameter(tied[name]))
            filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        raise WeightsError(f"{source} lacks {len(missing)} of the {len(targets)} weights of "
                           f"{type(model).__name__}, e.g. {missing[0]}; the file is incomplete or of another model")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"{type(model).__name__} from {source}: {len(left)} tensors the files do not hold were "
                           f"never made, e.g. {left[0]}")
    return model


def _assign(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(
            value, requires_grad=False)
    else:
        module._buffers[attr] = value


def converted(infos: dict[str, TensorInfo], convert: Callable[[dict], dict], *, source: str,
              unused: Iterable[str] = (), device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors from a file's, through a library's checkpoint converter (diffusers' single-file
    converters take and return {name: tensor}), one file tensor at a time so that host memory holds a few tensors.
    `convert` must then map each tensor on its own (renames and splits, as Z-Image's DiT converter does).
    Every file tensor must reach the model except those named in `unused`; checked on the header first (on meta
    tensors: no data read), so a wrong file fails before any weight is loaded."""
    unused = set(unused)
    for name, info in infos.items():
        if name not in unused and not convert({name: torch.empty(info.shape, dtype=info.dtype, device="meta")}):
            raise WeightsError(f"{source}: tensor {name} has no place in the model; is this a file of another "
                               f"model?")
    for name, tensor in tensors({name: info for name, info in infos.items() if name not in unused}, device):
        yield from convert({name: tensor}).items()


def converted_whole(infos: dict[str, TensorInfo], convert: Callable[[dict], dict], *, source: str
                    , device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """As `converted`, for converters that need the whole checkpoint at once (diffusers' LDM VAE converter): all
    tensors are read (small models only), and a tensor the converter silently dropped is found by storage (each
    read tensor has its own buffer, and a converter's renames, reshapes and splits keep it)."""
    read_all = dict(tensors(infos, device))
    out = convert(dict(read_all))
    used = {t.untyped_storage().data_ptr() for t in out.values()}
    dropped = sorted(name for name, t in read_all.items() if t.numel() and t.untyped_storage().data_ptr() not in used)
    if dropped:
        raise WeightsError(f"{source}: {len(dropped)} tensors have no place in the model, e.g. {dropped[0]}; is "
                           f"this a file of another model?")
    return iter(out.items())
