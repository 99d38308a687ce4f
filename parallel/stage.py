"""A stage is one named step of a pipeline that declares which ranks run it and which result each returns (after
sglang's StageParallelismType); the executor applies that declaration, so a stage never calls torch.distributed
itself. How a stage's work is split over the ranks is the model's, not the declaration's: what its parallel plans
install at load time (the sharded blocks' hooks, tensor-parallel layers) and parallel.cfg.run_branches (guidance
branches)."""
from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .comm import Comm


class Parallelism(enum.Enum):
    # Every rank runs it and returns its own result (replicated work, or sharded work its plan gathers). A rank that
    # fails exits and the host ends the group: its peers may be waiting for it in a collective.
    EVERY_RANK = enum.auto()
    # Rank 0 runs it for the host; the other ranks skip it (e.g. VAE decode). A failure leaves the group up.
    MAIN_RANK_ONLY = enum.auto()
    # Rank 0 runs it; its result (or its failure, or a cancel) is broadcast to every rank.
    MAIN_RANK_ONLY_AND_SEND_TO_OTHERS = enum.auto()
    # Every rank runs it, then the ranks compare outcomes: a failure or cancel every rank raised alike leaves the
    # group up, and every rank returns rank 0's result (rank 0 decides what a tensor-parallel decoder samples; the
    # ranks outside its group have no result of their own).
    EVERY_RANK_IN_STEP = enum.auto()


@dataclass(frozen=True)
class Stage:
    name: str
    # or model -> Parallelism, where it depends on how the model was loaded (sharded or on rank 0 alone)
    parallelism: Parallelism | Callable[[Any], Parallelism]
    fn: Callable[..., Any]  # fn(ctx, model, **inputs) -> result (plain CPU values when it is the last stage run)

    def parallelism_for(self, model: Any) -> Parallelism:
        return self.parallelism if isinstance(self.parallelism, Parallelism) else self.parallelism(model)


@dataclass(frozen=True)
class Loader:
    """Builds a resident model on one rank: fn(ctx, **args) -> model object kept by key between requests."""
    name: str
    fn: Callable[..., Any]


class Cancelled(Exception):
    """Raised on every rank at the same step boundary when the host asked to stop."""

    def __init__(self, step: int, total: int):
        super().__init__(f"cancelled at step {step}/{total}")
        self.step, self.total = step, total


# How many steps the host may have queued on the GPU when it reports a step. Nothing in a denoising loop waits for
# the GPU, so without a bound the host can queue the whole loop at once: progress would then reach its end long
# before the GPU, and a cancel would be read only after every step was already queued. With two, the GPU still has
# a whole queued step to run while the host launches the next one, and progress and cancel stay within two steps.
STEPS_AHEAD = 2


@dataclass
class StageContext:
    comm: Comm
    dtype: torch.dtype = torch.float32
    report: Callable[[str, int, int], None] = lambda what, done, total: None  # rank 0 -> host
    cancel_requested: Callable[[], bool] = lambda: False  # read on rank 0 only
    state: dict[str, Any] = field(default_factory=dict)  # per-rank scratch that lives as long as the worker
    _queued_steps: collections.deque = field(default_factory=collections.deque, repr=False)  # their CUDA events

    @property
    def device(self) -> torch.device:
        return self.comm.device

    @property
    def is_main(self) -> bool:
        return self.comm.is_main

    def step(self, done: int, total: int, what: str = "step", group: str = "world") -> None:
        """Call on every rank of `group` (one holding rank 0) at each step boundary: reports progress, and stops
        every rank at the same step when rank 0 has seen a cancel (a rank that stopped alone would leave the others
        waiting in a collective)."""
        self._keep_pace()
        stop = False
        if self.is_main:
            self.report(what, done, total)
            stop = self.cancel_requested()
        if self.comm.broadcast_object(stop, group=group):
            raise Cancelled(done, total)

    def _keep_pace(self) -> None:
        """Wait until the GPU has finished all but the last STEPS_AHEAD steps this rank queued."""
        if self.device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._queued_steps.append(done)
        while len(self._queued_steps) > STEPS_AHEAD:
            self._queued_steps.popleft().synchronize()
