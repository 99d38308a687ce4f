"""Sequence parallelism: split token sequences across the SP group for a run of blocks, and attend over the whole
sequence with Ulysses all-to-all.

A model plan (in models/) names the blocks and which of their arguments are token streams, key masks and rotary
tables; `shard_blocks` installs hooks that split on entry to the first block and gather on exit from the last.
Each stream is padded to a multiple of the SP degree and the padding is left out of the keys (or masked, where a
caller's mask decides), so every size and every SP degree gives the single-process result up to floating-point
reordering. Attention does not care about key order, so the gathered sequence is rank-major (rank 0's streams, then
rank 1's, ...) and is never reordered. A model's own attention processor attends through `Region.attention` while
a region is active (`active_region()`), and through the library's call otherwise.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .comm import Comm


@dataclass
class Stream:
    """One token stream of a sharded region: `full_len` real positions padded to sp * `local_len`."""
    full_len: int
    sp: int
    local_len: int
    valid: torch.Tensor | None  # (B, sp * local_len) bool; None when every position is a real token
    masked: bool = False  # `valid` holds a caller's key mask, not only the padding added here

    @classmethod
    def plan(cls, full_len: int, sp: int, valid: torch.Tensor | None, batch: int, device: torch.device) -> "Stream":
        local_len = -(-full_len // sp)
        pad = local_len * sp - full_len
        masked = valid is not None
        if pad:
            if valid is None:
                valid = torch.ones(batch, full_len, dtype=torch.bool, device=device)
            valid = F.pad(valid, (0, pad), value=False)
        elif valid is not None:
            valid = valid.bool()
        return cls(full_len, sp, local_len, valid, masked)

    def real_len(self, rank: int) -> int:
        """How many of `rank`'s local positions are real tokens (the padding sits at the stream's end)."""
        return min(max(self.full_len - rank * self.local_len, 0), self.local_len)

    def split(self, x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
        pad = self.local_len * self.sp - x.shape[dim]
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.narrow(dim, rank * self.local_len, self.local_len)

    def gather(self, comm: Comm, local: torch.Tensor, dim: int) -> torch.Tensor:
        return comm.all_gather(local, "sp", dim=dim).narrow(dim, 0, self.full_len)

    def local_valid(self, rank: int, batch: int, device: torch.device) -> torch.Tensor:
        if self.valid is None:
            return torch.ones(batch, self.local_len, dtype=torch.bool, device=device)
        return self.valid[:, rank * self.local_len:(rank + 1) * self.local_len]


@dataclass
class Region:
    """The sharding in force while a run of blocks executes; attention reads which keys are real from it."""
    comm: Comm
    streams: dict[str, Stream]
    order: list[str]  # the order in which the attention processor concatenates the streams
    batch: int
    device: torch.device
    rope: dict[str, Any] = field(default_factory=dict)  # local rotary tables, computed once per region
    key_prefix: list[torch.Tensor] | None = None  # per SP rank: valid mask of keys prepended to the local ones
    key_index: torch.Tensor | None = None  # real_keys(), set on entry

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """A sharded block's attention over the whole sequence: (B, S_local, H, D) in and out, Ulysses over the
        region's ranks."""
        if attn_mask is not None:
            raise NotImplementedError("sequence-parallel attention takes its key mask from the sharding plan")
        index, mask = self.attention_keys()
        return ulysses_attention(self.comm, query, key, value, mask, scale, key_index=index)

    def attention_keys(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(positions, mask) of the real keys for attention: the positions built on entry, unless a caller's mask
        or a key prefix (set by a model's hook after entry) decides, as a (B, keys) mask."""
        if self.key_index is not None and self.key_prefix is None:
            return self.key_index, None
        return None, self.key_valid()

    def real_keys(self) -> torch.Tensor | None:
        """Positions of the real keys in the gathered (rank-major) key sequence, when the sharding's own padding is
        all that is not real (known on the host: no mask to read); else None. Built on the device once per region,
        outside compiled code, and given even when no key is padding: the compiled blocks then see one kind of
        input whatever the text length, and do not recompile for each new one (computing it inside them from the
        streams' lengths did, on every length)."""
        if any(self.streams[n].masked for n in self.order):
            return None
        runs, pos = [], 0
        for r in range(self.comm.layout.sp):
            for stream in (self.streams[n] for n in self.order):
                runs.append((pos, pos + stream.real_len(r)))
                pos += stream.local_len
        return torch.cat([torch.arange(start, stop, device=self.device) for start, stop in runs])

    def key_valid(self) -> torch.Tensor | None:
        """(B, gathered keys) validity in rank-major order, or None when no key is padding."""
        if self.key_prefix is None and all(self.streams[n].valid is None for n in self.order):
            return None
        parts = []
        for r in range(self.comm.layout.sp):
            if self.key_prefix is not None:
                parts.append(self.key_prefix[r])
            parts += [self.streams[n].local_valid(r, self.batch, self.device) for n in self.order]
        return torch.cat(parts, dim=1)


_active: Region | None = None


def active_region() -> Region | None:
    return _active


@dataclass(frozen=True)
class BlockSpec:
    """How a block's forward arguments relate to the token sequence (names as in the block's signature)."""
    streams: Sequence[str]  # token-stream arguments, in the order attention concatenates them; seq dim 1
    outputs: Sequence[str]  # which stream each output is (a block returning one tensor has one name)
    masks: dict[str, str] = field(default_factory=dict)  # key-mask argument (B, L) -> its stream
    rope: dict[str, tuple[str, int]] = field(default_factory=dict)  # rotary argument -> (stream, its seq dim)


def shard_blocks(blocks: Sequence[nn.Module], comm: Comm, spec: BlockSpec) -> list[Any]:
    """Install the split/gather hooks on a run of blocks; returns the hook handles. The last module may be a
    different one (e.g. a final projection), so the gather moves its smaller output instead of the hidden state."""
    if comm.layout.sp == 1:
        return []
    signatures = {id(b): inspect.signature(b.forward) for b in blocks}

    def bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        return dict(signatures[id(module)].bind(*args, **kwargs).arguments)

    def enter(module: nn.Module, args: tuple, kwargs: dict):
        global _active
        call = bind(module, args, kwargs)
        first = call[spec.streams[0]]
        batch, device = first.shape[0], first.device
        sp, rank = comm.layout.sp, comm.sp_rank
        masks = {stream: call.get(arg) for arg, stream in spec.masks.items()}
        streams = {name: Stream.plan(call[name].shape[1], sp, masks.get(name), batch, device)
                   for name in spec.streams}
        region = Region(comm, streams, list(spec.streams), batch, device)
        for name in spec.streams:
            call[name] = streams[name].split(call[name], rank, dim=1)
        for arg, (stream, dim) in spec.rope.items():
            if call.get(arg) is not None:
                region.rope[arg] = _map_tensors(call[arg], lambda t: streams[stream].split(t, rank, dim))
        region.key_index = region.real_keys()
        _active = region
        return (), _local_args(module, call, region)

    def inside(module: nn.Module, args: tuple, kwargs: dict):
        return (), _local_args(module, bind(module, args, kwargs), _active)

    def _local_args(module: nn.Module, call: dict[str, Any], region: Region) -> dict[str, Any]:
        accepted = signatures[id(module)].parameters
        for arg in spec.masks:
            if arg in call:
                call[arg] = None  # padding and masks now live in the region (key_index, key_valid())
        for arg, local in region.rope.items():
            if arg in accepted:
                call[arg] = local
        return call

    def leave(module: nn.Module, args: tuple, kwargs: dict, output: Any):
        global _active
        region = _active
        _active = None
        outs = output if isinstance(output, tuple) else (output,)
        gathered = tuple(region.streams[name].gather(comm, out, dim=1) for name, out in zip(spec.outputs, outs))
        return gathered if isinstance(output, tuple) else gathered[0]

    handles = [blocks[0].register_forward_pre_hook(enter, with_kwargs=True)]
    handles += [b.register_forward_pre_hook(inside, with_kwargs=True) for b in blocks[1:]]
    handles.append(blocks[-1].register_forward_hook(leave, with_kwargs=True))
    return handles


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    return type(value)(_map_tensors(v, fn) for v in value)


def ulysses_attention(comm: Comm, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_valid: torch.Tensor | None, scale: float | None = None,
                      key_index: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Sq_local, H, D), k/v (B, Sk_local, H, D) -> (B, Sq_local, H, D) attending over every rank's keys.

    Which gathered keys are real: `key_index`, their positions (the others are dropped before attention), or
    `key_valid`, a (B, keys) mask; neither: all. Dropping keys instead of masking them keeps SDPA on its fastest
    kernels, which take no mask (GLM-Image's 1-token negative prompt is padded on every degree).
    Heads are padded to a multiple of the Ulysses degree (Z-Image's 30 heads on 4 or 8 ranks); padded heads are
    zeros, computed and dropped, so any degree works at a cost of at most (degree - 1) heads."""
    p = comm.layout.ulysses
    heads = q.shape[2]
    pad = (-heads) % p
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    if q.shape == k.shape:  # one all-to-all carries q, k and v: fewer, larger messages
        q, k, v = _seq_to_heads(comm, (q, k, v), p)
    else:  # keys carry a prefix (a KV cache): lengths differ
        (q,), (k, v) = _seq_to_heads(comm, (q,), p), _seq_to_heads(comm, (k, v), p)
    if key_index is not None:
        k, v = k.index_select(1, key_index), v.index_select(1, key_index)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale).transpose(1, 2)
    out = _heads_to_seq(comm, out, p)
    return out[:, :, :heads] if pad else out


def _seq_to_heads(comm: Comm, xs: tuple[torch.Tensor, ...], p: int) -> tuple[torch.Tensor, ...]:
    """Each (B, S_local, H, D) -> (B, p * S_local, H / p, D): gather the sequence, keep this rank's head slice."""
    b, s, h, d = xs[0].shape
    # Stacked rather than copied into slices of one buffer: inductor's packing kernel then takes 33 instead of 59 us
    # per 2-GPU 1024x1024 Z-Image layer (bench/results/zimage_turbo_denoise_1024_h200x4_stacked_send_ab.json)
    send = torch.stack([x.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4) for x in xs], dim=1)
    recv = comm.all_to_all(send, "ulysses")  # dim 0 is now the source rank, i.e. the sequence chunk
    return tuple(recv.permute(1, 2, 0, 3, 4, 5).reshape(len(xs), b, p * s, h // p, d).unbind(0))


def _heads_to_seq(comm: Comm, x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, p * S_local, H / p, D) -> (B, S_local, H, D): the inverse of _seq_to_heads."""
    b, s, h, d = x.shape
    x = x.reshape(b, p, s // p, h, d).permute(1, 0, 2, 3, 4)
    x = comm.all_to_all(x, "ulysses")  # dim 0 is now the source rank, i.e. the head group
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h, d)
