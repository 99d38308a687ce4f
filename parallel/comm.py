"""The one place that calls torch.distributed: a rank's process groups and the collectives built on them.

Ranks are numbered cfg-major: rank = cfg_index * ulysses + ulysses_index, so a
Ulysses group is a run of neighbouring ranks (neighbouring GPUs talk fastest). A single-process Comm has every
degree 1 and every collective is the identity, so stages run unchanged without a process group.
"""
from __future__ import annotations

import datetime
import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from . import versions, wire
from .layout import Layout

log = logging.getLogger(__name__)

# Sums up to this size go through symmetric memory where enabled: one kernel that reads every member's copy over
# NVLink, faster than NCCL for a one-token decode step's 8 KB on 4 H200s (bench/README.md, GLM-Image's AR)
SMALL_ALL_REDUCE_BYTES = 256 * 1024


class Comm:
    def __init__(self, layout: Layout, rank: int, device: torch.device, distributed: bool):
        self.layout = layout
        self.rank = rank
        self.device = device
        self.distributed = distributed
        sp = layout.sp
        self.cfg_rank, self.sp_rank = divmod(rank, sp)
        self._groups: dict[str, Any] = {}
        self._object_group = None
        self._object_groups: dict[str, Any] = {}  # make_group's groups: their gloo twins, for objects
        self._made: dict[tuple[int, ...], tuple[Any, Any]] = {}  # make_group's process groups, on every rank
        # (group, dtype) -> (symmetric buffer, its group's name): all_reduce's path for small sums
        self._small_all_reduce: dict[tuple[str, torch.dtype], tuple[torch.Tensor, str]] = {}
        if distributed:
            self._make_groups()

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "Comm":
        return cls(Layout(), 0, torch.device(device), distributed=False)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group_size(self, name: str) -> int:
        """The size of a layout group, or of a make_group group this rank is in."""
        sizes = {"cfg": self.layout.cfg, "ulysses": self.layout.ulysses, "sp": self.layout.sp,
                 "world": self.layout.world_size}
        return sizes[name] if name in sizes else len(self._groups[name][1])

    def make_group(self, name: str, ranks) -> bool:
        """A group `name` of some ranks (e.g. the ones a model's part is sharded over); returns whether this rank
        is in it. Every rank of the world calls it, in the same order (torch.distributed creates groups
        collectively); a group of the same ranks is made once and reused."""
        ranks = tuple(ranks)
        if ranks == tuple(range(self.world_size)):  # the world's own groups: no second communicator
            self._groups[name] = (None, list(ranks))
            self._object_groups[name] = self._object_group
            return True
        if ranks not in self._made:
            pg = dist.new_group(list(ranks))
            self._made[ranks] = (pg, dist.new_group(list(ranks), backend="gloo"))
        if self.rank not in ranks:
            return False
        self._groups[name] = (self._made[ranks][0], list(ranks))
        self._object_groups[name] = self._made[ranks][1]
        return True

    def group_rank(self, name: str) -> int:
        """This rank's index within its group `name`."""
        return self._groups[name][1].index(self.rank) if name in self._groups else 0

    def _make_groups(self) -> None:
        lay = self.layout
        ranks = range(lay.world_size)
        members = {
            "ulysses": lambda r: r // lay.ulysses,
            "cfg": lambda r: r % lay.sp,
        }
        # Every rank must create every group, in the same order, even the ones it is not in.
        for name, key in members.items():
            buckets: dict[Any, list[int]] = {}
            for r in ranks:
                buckets.setdefault(key(r), []).append(r)
            for group_ranks in buckets.values():
                group = dist.new_group(group_ranks)
                if self.rank in group_ranks:
                    self._groups[name] = (group, group_ranks)
        self._groups["sp"] = self._groups["ulysses"]  # the sequence is sharded over the Ulysses group alone
        self._groups["world"] = (None, list(ranks))
        # Python objects travel over gloo even when tensors go over NCCL, and over a group of their own on CPU too:
        # a rank that left a stage by raising must not meet its peers' tensor collectives in its object ones.
        self._object_group = dist.new_group(list(ranks), backend="gloo")

    # -- objects (CPU, world): requests, AR results, cancel decisions ------------------------------------------
    def broadcast_object(self, obj: Any, src: int = 0, group: str = "world") -> Any:
        """`obj` of rank `src` on every member of `group` (src: a world rank), `src` included, with its tensors as
        fresh CPU tensors (as pickling would deliver them). Its structure is pickled over gloo, where an idle rank
        can wait for the next request without spinning; its tensors follow as one byte buffer over the device
        group (NCCL on GPUs)."""
        if not self.distributed or self.group_size(group) == 1:
            return obj
        objects, tensors_pg = self._object_groups.get(group, self._object_group), self._groups[group][0]
        box: list[Any] = [None]
        if self.rank == src:
            header, tensors = wire.pack(obj)
            box = [(header, [t.numel() for t in tensors])]
        dist.broadcast_object_list(box, src=src, group=objects)
        header, sizes = box[0]
        if not sizes:
            return wire.unpack(header, [])
        offsets, total = wire.offsets(sizes)
        on_gpu = self.device.type == "cuda"
        # pinned, so that the copies to and from the GPU need no staging of their own in the driver
        staging = torch.empty(total, dtype=torch.uint8, pin_memory=on_gpu)
        if self.rank == src:
            for tensor, offset in zip(tensors, offsets):
                staging[offset:offset + tensor.numel()].copy_(tensor)
        if not on_gpu:
            dist.broadcast(staging, src=src, group=tensors_pg)
        elif self.rank == src:
            dist.broadcast(staging.to(self.device, non_blocking=True), src=src, group=tensors_pg)
            torch.cuda.current_stream(self.device).synchronize()  # the caller may change staging's tensors
        else:
            buffer = torch.empty(total, dtype=torch.uint8, device=self.device)
            dist.broadcast(buffer, src=src, group=tensors_pg)
            staging.copy_(buffer, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return wire.unpack(header, [staging[offset:offset + size] for offset, size in zip(offsets, sizes)])

    def all_gather_object(self, obj: Any, group: str = "world") -> list[Any]:
        """Every member's `obj`, in group-rank order."""
        if not self.distributed or self.group_size(group) == 1:
            return [obj]
        out: list[Any] = [None] * self.group_size(group)
        dist.all_gather_object(out, obj, group=self._object_groups.get(group, self._object_group))
        return out

    def all_gather_int(self, value: int, timeout_s: float | None = None) -> list[int]:
        """Every rank's `value`, in rank order. With timeout_s, RuntimeError when a rank has not joined within it
        (it is stuck elsewhere, e.g. in a collective this rank left by raising); this rank's groups are unusable
        from then on."""
        if not self.distributed or self.world_size == 1:
            return [value]
        mine = torch.tensor([value], dtype=torch.int64)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        work = dist.all_gather(out, mine, group=self._object_group, async_op=True)
        if timeout_s is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout_s))
        return [int(t) for t in out]

    def barrier(self) -> None:
        """Returns once every rank has called it; fails where a rank has died (over gloo: an idle rank waits in it
        without spinning, however long the others take)."""
        if self.distributed and self.world_size > 1:
            dist.barrier(group=self._object_group)

    # -- tensors (device) ----------------------------------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor, group: str, dim: int = 0) -> torch.Tensor:
        """Concatenate every member's equally-shaped tensor along `dim`, in group-rank order."""
        if self.group_size(group) == 1:
            return tensor
        pg, group_ranks = self._groups[group]
        tensor = tensor.contiguous()  # empty_like keeps a permuted layout, which collectives would scramble
        parts = [torch.empty_like(tensor) for _ in group_ranks]
        dist.all_gather(parts, tensor, group=pg)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, tensor: torch.Tensor, group: str) -> torch.Tensor:
        """Dimension 0 holds one equal chunk per group member; member i receives everyone's chunk i."""
        if self.group_size(group) == 1:
            return tensor
        pg, _ = self._groups[group]
        tensor = tensor.contiguous()  # empty_like keeps a permuted layout, which collectives would scramble
        out = torch.empty_like(tensor)
        dist.all_to_all_single(out, tensor, group=pg)
        return out

    def all_reduce(self, tensor: torch.Tensor, group: str) -> torch.Tensor:
        """The elementwise sum over the group, on every member: a functional collective, or for a small sum where
        enable_small_all_reduce succeeded the one-shot kernel. torch.compile traces either into the graph, so a
        compiled tensor-parallel step keeps its reductions inside one CUDA graph."""
        if self.group_size(group) == 1:
            return tensor
        buffer, name = self._small_all_reduce.get((group, tensor.dtype), (None, None))
        if buffer is not None and tensor.numel() <= buffer.numel():
            # copies this member's tensor into its buffer, then every member sums all buffers in rank order
            out = torch.ops.symm_mem.one_shot_all_reduce_copy(buffer[:tensor.numel()], tensor.contiguous().view(-1),
                                                              "sum", name)
            return out.view(tensor.shape)
        return funcol.all_reduce(tensor, "sum", self._process_group(group))

    def enable_small_all_reduce(self, group: str, dtype: torch.dtype) -> bool:
        """Let all_reduce sum `dtype` tensors of up to SMALL_ALL_REDUCE_BYTES over `group` through CUDA symmetric
        memory instead of NCCL (torch's one-shot kernel; it can be captured in a CUDA graph). Every member of the
        group calls it. Where the GPUs cannot map each other's memory, all_reduce stays on NCCL; returns which."""
        if self.group_size(group) == 1 or self.device.type != "cuda" or (group, dtype) in self._small_all_reduce:
            return (group, dtype) in self._small_all_reduce
        if not versions.SYMMETRIC_MEMORY.available():  # the same torch on every member: all stay on NCCL
            return False
        import torch.distributed._symmetric_memory as symm_mem

        name = self._process_group(group).group_name
        try:
            symm_mem.enable_symm_mem_for_group(name)
            buffer = symm_mem.empty(SMALL_ALL_REDUCE_BYTES // dtype.itemsize, dtype=dtype, device=self.device)
            error = None
        except Exception as exc:  # noqa: BLE001 - any reason: NCCL still works
            error = f"{type(exc).__name__}: {exc}"
        errors = [e for e in self.all_gather_object(error, group) if e]  # every member must take the same path
        if errors:
            log.warning("all-reduce stays on NCCL: no symmetric memory (%s)", errors[0])
            return False
        symm_mem.rendezvous(buffer, name)
        torch._dynamo.mark_static_address(buffer)  # CUDA graphs must read it in place: peers map this address
        self._small_all_reduce[(group, dtype)] = (buffer, name)
        return True

    def all_gather_last(self, tensor: torch.Tensor, group: str) -> torch.Tensor:
        """Concatenate every member's equally-shaped tensor along the last dim (functional, as all_reduce)."""
        if self.group_size(group) == 1:
            return tensor
        gathered = funcol.all_gather_tensor(tensor.contiguous(), 0, self._process_group(group))
        return torch.cat(gathered.chunk(self.group_size(group)), dim=-1)

    def broadcast(self, tensor: torch.Tensor, group: str, src: int = 0) -> torch.Tensor:
        """Member `src`'s tensor (by group rank), on every member; the device never waits for the host."""
        if self.group_size(group) == 1:
            return tensor
        return funcol.broadcast(tensor.contiguous(), self._groups[group][1][src], self._process_group(group))

    def broadcast_(self, tensor: torch.Tensor, group: str, src: int = 0) -> None:
        """Member `src`'s tensor (by group rank) written into `tensor` on every member, in place: for large
        transfers (offloaded weights coming back), which a second buffer would double."""
        if self.group_size(group) == 1:
            return
        pg, ranks = self._groups[group]
        dist.broadcast(tensor, src=ranks[src], group=pg)

    def _process_group(self, group: str):
        pg, _ = self._groups[group]
        return pg if pg is not None else dist.group.WORLD
