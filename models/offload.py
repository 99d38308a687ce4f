"""Weights kept on the GPU only while the stages that use them run: the rest wait in page-locked host memory.

    weights = StageWeights()
    weights.add("transformer", Offloaded(dit, comm, group="ar"))   # the ranks of "ar" hold the same DiT
    weights.use("text_encoder")   # at a stage's start: the others go to the host, this one comes back

A module's parameters and buffers are moved by storage (views of one storage, e.g. GLM-Image's fused q/k/v,
come back as views of one storage), exact byte copies, so results are bit-identical to resident weights. The host
copy is made once, when a module first leaves the GPU (weights never change), and kept; leaving the GPU again
only frees the device memory. Where the ranks of a group hold the same weights (a replicated DiT), each storage's
host copy is held by one of them (storages spread over the group by size) and comes back by a broadcast from it:
the host holds one copy of the module, not one per rank, and every rank's transfer is 1/n of it (the rest arrives
over the GPU links). A rank with nothing else to make room for keeps its weights on the GPU (its module is not
added), so only the ranks that need it offload.

While offloaded, a module's parameters are meta tensors: a stage that used it without `use` fails at once instead
of computing with stale memory. CUDA graphs recorded the old addresses: `on_offload` drops them (they are captured
again on the next calls).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from ..parallel.comm import Comm

log = logging.getLogger(__name__)

MODES = ("auto", "resident", "offload")
GiB = 1 << 30


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"offload must be one of {', '.join(MODES)}, got {mode!r}")


def free_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`: the device's free memory plus what torch's allocator
    holds unused, within the cap torch.cuda.set_per_process_memory_fraction sets. None on the CPU (offloading to
    the host frees nothing there)."""
    if device.type != "cuda":
        return None
    if device.index is None:  # the 1-GPU path runs in the host process on plain "cuda"; the cap query needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    cap = int(torch.cuda.get_per_process_memory_fraction(device) * total)
    return min(free + reserved - allocated, cap - allocated)


def decide(mode: str, needed: int, free: int | None) -> bool:
    """Whether to offload: `needed` bytes (the next weights and a stage's working memory) beside what is loaded,
    against `free` (None: the CPU, where auto keeps everything resident)."""
    check_mode(mode)
    if mode != "auto":
        return mode == "offload"
    return free is not None and needed > free


def choose(comm: Comm, mode: str, needed: int, what: str, group: str | None = None) -> bool:
    """decide() with this rank's free memory, or for every member of `group` alike (they offload together, so
    every member calls it): offload where any member lacks the memory. The choice and its figures are logged."""
    free = free_memory(comm.device)
    frees = comm.all_gather_object(free, group) if group else [free]
    offload = any(decide(mode, needed, f) for f in frees)
    known = [f for f in frees if f is not None]
    seen = f"{min(known) / GiB:.1f} GiB free" if known else "no GPU"
    log.info("%s: offload=%s: %s (%.1f GiB needed beside the weights loaded so far, %s)", what, mode,
             "weights move to the host between stages" if offload else "all weights resident", needed / GiB, seen)
    return offload


class HostBuffer:
    """`nbytes` of host memory, page-locked on CUDA (asynchronous, full-speed copies) by registering a plain
    allocation with CUDA: torch's pinned allocator rounds every allocation up to a power of two, which would hold up
    to twice the weights in host memory."""

    def __init__(self, nbytes: int, page_locked: bool):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.registered = page_locked and nbytes > 0
        if self.registered:
            check = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(check) != 0:
                raise RuntimeError(f"page-locking {nbytes / GiB:.1f} GiB of host memory for offloaded weights "
                                   f"failed (CUDA error {int(check)}); use offload=resident")

    def __del__(self):
        if self.registered:  # before the memory itself is freed, with this object's attributes
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())


class Offloaded:
    """One module's weights, between the device and host memory (see the module docstring).

    comm/group: the members of `group` hold the same weights and move them together (every member calls offload
    and restore at the same point); None: this rank alone."""

    def __init__(self, module: nn.Module, comm: Comm | None = None, group: str | None = None,
                 on_offload: Callable[[], None] = lambda: None):
        self.module, self.on_offload = module, on_offload
        self.comm, self.group = comm, group
        self.device = next(module.parameters()).device
        # (module, "_parameters" | "_buffers", name): one entry per place, a module shared by two parents once
        self.slots: list[tuple[nn.Module, str, str]] = []
        tensors, seen = [], set()
        for sub in module.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(sub, kind).items():
                    if tensor is not None and (id(sub), kind, name) not in seen:
                        seen.add((id(sub), kind, name))
                        self.slots.append((sub, kind, name))
                        tensors.append(tensor)
        # the Parameter objects themselves, which come back (others may hold them, e.g. a tied head)
        self.parameters = {i: t for i, ((_, kind, _), t) in enumerate(zip(self.slots, tensors))
                           if kind == "_parameters"}
        storages: dict[int, int] = {}  # storage address -> index, in the modules' order: the same on every member
        self.sizes: list[int] = []
        self.views: list[tuple[int, int, tuple, tuple, torch.dtype]] = []
        for t in tensors:
            s = t.untyped_storage()
            index = storages.setdefault(s.data_ptr(), len(storages))
            if index == len(self.sizes):
                self.sizes.append(s.nbytes())
            self.views.append((index, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype))
        self.owners = self._spread(self.sizes)
        self.buffer: HostBuffer | None = None  # this rank's share of the host copy, made on the first offload
        self.host: dict[int, torch.Tensor] = {}  # storage index -> its bytes in the buffer
        self.resident = True

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def _members(self) -> int:
        return self.comm.group_size(self.group) if self.group else 1

    def _spread(self, sizes: list[int]) -> list[int]:
        """Each storage's owner (a group rank): largest first, to the member holding the fewest bytes so far."""
        load = [0] * self._members()
        owners = [0] * len(sizes)
        for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            owners[index] = min(range(len(load)), key=lambda m: (load[m], m))
            load[owners[index]] += sizes[index]
        return owners

    def offload(self) -> None:
        """Free the device memory, keeping (making, the first time) this rank's share of the host copy."""
        if not self.resident:
            return
        self.on_offload()
        me = self.comm.group_rank(self.group) if self.group else 0
        to_copy: set[int] = set()
        if self.buffer is None:  # the first time: this rank's storages, back to back in one buffer
            self.buffer = HostBuffer(sum(n for i, n in enumerate(self.sizes) if self.owners[i] == me),
                                     self.device.type == "cuda")
            at = 0
            for i, n in enumerate(self.sizes):
                if self.owners[i] == me:
                    self.host[i], at = self.buffer.tensor[at:at + n], at + n
            to_copy = set(self.host)
        for i, (sub, kind, name) in enumerate(self.slots):
            tensor, (index, *_) = getattr(sub, kind)[name], self.views[i]
            if index in to_copy:
                whole = torch.empty(0, dtype=torch.uint8, device=self.device).set_(tensor.untyped_storage())
                self.host[index].copy_(whole)
                to_copy.discard(index)
            placeholder = torch.empty_like(tensor, device="meta")
            if kind == "_parameters":
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=self.device)  # drops the storage
                placeholder = nn.Parameter(placeholder, requires_grad=tensor.requires_grad)
            getattr(sub, kind)[name] = placeholder
        self.resident = False

    def restore(self) -> None:
        """Bring the weights back: each storage from its owner's host copy, broadcast over the group."""
        if self.resident:
            return
        storages = []
        for index, size in enumerate(self.sizes):
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            if index in self.host:
                buffer.copy_(self.host[index], non_blocking=self.device.type == "cuda")
            if self._members() > 1:
                self.comm.broadcast_(buffer, self.group, src=self.owners[index])
            storages.append(buffer.untyped_storage())
        for i, (sub, kind, name) in enumerate(self.slots):
            index, offset, shape, stride, dtype = self.views[i]
            view = torch.empty(0, dtype=dtype, device=self.device).set_(storages[index], offset, shape, stride)
            if kind == "_parameters":
                self.parameters[i].data = view
                view = self.parameters[i]
            getattr(sub, kind)[name] = view
        self.resident = True


class StageWeights:
    """The offloaded modules of one model on one rank, by name; `use` at each stage's start. Empty when
    everything stays resident (then `use` does nothing)."""

    def __init__(self):
        self.modules: dict[str, Offloaded] = {}

    def add(self, name: str, weights: Offloaded, resident: bool = False) -> None:
        """Another offloadable module; it leaves the GPU at once unless `resident`."""
        self.modules[name] = weights
        if not resident:
            weights.offload()

    def use(self, *names: str) -> None:
        """Only `names` on the GPU (those this rank offloads): the others leave first, making room."""
        for name, weights in self.modules.items():
            if name not in names:
                weights.offload()
        for name in names:
            if name in self.modules:
                self.modules[name].restore()

    @property
    def offloaded(self) -> bool:
        return bool(self.modules)
