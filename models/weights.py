"""Safetensors weights read straight into a model on its device, in its compute dtype, strictly.

Why not diffusers' from_pretrained: without `accelerate` (ComfyUI does not install it) diffusers builds the model
with random weights in host memory and then copies a whole state dict in, so one rank peaks at about twice the
model in float32 (8.9 GB for a 1.45 B-parameter slice of the Z-Image DiT, measured on CPU). Here the model is
built on the meta device (no memory, no random initialisation), and each tensor is read from the file into its own
host buffer, moved to the device, cast there, and assigned: a rank's host memory holds a few tensors at a time
(READ_AHEAD) on GPUs. Reads go through the page cache, so ranks on one host reading the same file share it.

Strict: every weight of the model must be filled and every tensor offered must be used, with shapes equal; an
fp8 tensor is upcast (exact: every fp8 value is a bf16 value). Problems are one line naming the file.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
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


def headers(files: Iterable) -> dict[str, TensorInfo]:
    """The tensors of several files (shards of one model); a name in two files is refused."""
    merged: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in header(file).items():
            if name in merged:
                raise WeightsError(f"{info.file} and {merged[name].file} both hold tensor {name}")
            merged[name] = info
    return merged


def read(info: TensorInfo, pin: bool = False) -> torch.Tensor:
    """One tensor from its file into a host buffer of its own (so a conversion's views can be traced to it). The
    buffer is torch's own allocation: its alignment then matches any other CPU tensor's, which CPU kernels'
    summation order depends on (a bytearray's did not, and moved results by 1e-6). `pin`: page-locked, from torch's
    caching host allocator (blocks are reused once their copy to the GPU is done), so the copy runs at full speed
    (pageable memory halved the load's speed on an H200, bench/results/load_zimage_h200.json)."""
    data = torch.empty(info.end - info.start, dtype=torch.uint8, pin_memory=pin)
    with info.file.open("rb") as f:
        f.seek(info.start)
        if data.numel() and f.readinto(memoryview(data.numpy())) != data.numel():
            raise WeightsError(f"{info.file} ended inside tensor data; download it again")
    return data.view(info.dtype).view(info.shape)


READ_AHEAD = 4  # tensors read ahead while the one before is copied to the device: bounds host memory to a few


def tensors(infos: dict[str, TensorInfo], pin: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each entry, read by a few threads ahead of the consumer (file reads release the GIL, so
    reading overlaps the consumer's copies to the device), in order; `pin` as in read()."""
    items = list(infos.items())
    with concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:
        pending: collections.deque = collections.deque()
        for i in range(len(items) + READ_AHEAD):
            if i < len(items):
                pending.append((items[i][0], pool.submit(read, items[i][1], pin)))
            if len(pending) > READ_AHEAD or (i >= len(items) and pending):
                name, future = pending.popleft()
                yield name, future.result()


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
        value = tensor.to(device, non_blocking=tensor.is_pinned())
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
              unused: Iterable[str] = (), pin: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
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
    for name, tensor in tensors({name: info for name, info in infos.items() if name not in unused}, pin):
        yield from convert({name: tensor}).items()


def converted_whole(infos: dict[str, TensorInfo], convert: Callable[[dict], dict], *, source: str
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """As `converted`, for converters that need the whole checkpoint at once (diffusers' LDM VAE converter): all
    tensors are read (small models only), and a tensor the converter silently dropped is found by storage (each
    read tensor has its own buffer, and a converter's renames, reshapes and splits keep it)."""
    read_all = dict(tensors(infos))
    out = convert(dict(read_all))
    used = {t.untyped_storage().data_ptr() for t in out.values()}
    dropped = sorted(name for name, t in read_all.items() if t.numel() and t.untyped_storage().data_ptr() not in used)
    if dropped:
        raise WeightsError(f"{source}: {len(dropped)} tensors have no place in the model, e.g. {dropped[0]}; is "
                           f"this a file of another model?")
    return iter(out.items())
