"""Runs one stage on this rank the way the stage declares (which ranks run it, which result each returns, what a
failure costs): the single place where a Parallelism means something."""
from __future__ import annotations

from typing import Any

import torch

from .stage import Cancelled, Parallelism, Stage, StageContext

# How long a rank that failed inside a tensor-parallel stage waits for its peers to arrive at the comparison of
# outcomes. Peers that failed alike (a refused input) arrive within milliseconds; peers still waiting in a collective
# the failed rank left never do.
AGREE_TIMEOUT_S = 3.0


class MainRankError(Exception):
    """A stage failed where every rank hears of it: a main-rank-only stage on rank 0, or a tensor-parallel stage
    before its ranks diverged (a bad input refused on each). Every rank raises it, so the group stays in step and
    alive."""


class RankFailure(Exception):
    """A stage failed on this rank where its peers cannot hear of it (they may be waiting in a collective): the rank
    reports it and exits, and the host ends the group. The message is the cause and the stage."""


def execute(stage: Stage, ctx: StageContext, model: Any, inputs: dict[str, Any]) -> Any:
    parallelism = stage.parallelism_for(model)
    if parallelism is Parallelism.MAIN_RANK_ONLY:
        if not ctx.is_main:
            return None
        try:
            return stage.fn(ctx, model, **inputs)
        except Cancelled:
            raise
        except Exception as exc:  # no other rank waits on this one, so the group stays healthy
            raise MainRankError(f"stage {stage.name} failed on rank 0: {describe_error(exc, ctx, inputs)}") from exc
    if parallelism is Parallelism.MAIN_RANK_ONLY_AND_SEND_TO_OTHERS:
        outcome: tuple[str, Any] = ("ok", None)
        if ctx.is_main:
            try:
                outcome = ("ok", stage.fn(ctx, model, **inputs))
            except Cancelled as stop:  # rank 0 alone checks cancel here: the others are waiting for its result
                outcome = ("cancelled", (stop.step, stop.total))
            except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, whatever it is
                outcome = ("error", describe_error(exc, ctx, inputs))
        status, value = ctx.comm.broadcast_object(outcome)
        if status == "cancelled":
            raise Cancelled(*value)
        if status == "error":
            raise MainRankError(f"stage {stage.name} failed on rank 0: {value}")
        return value
    if parallelism is Parallelism.EVERY_RANK_IN_STEP:
        return _in_step_on_every_rank(stage, ctx, model, inputs)
    # EVERY_RANK: how the work is split lives in the model's parallel plans and in parallel.cfg, which read ctx.comm
    try:
        return stage.fn(ctx, model, **inputs)
    except Cancelled:
        raise
    except Exception as exc:
        raise _failure(exc, stage, ctx, inputs) from exc


def _in_step_on_every_rank(stage: Stage, ctx: StageContext, model: Any, inputs: dict[str, Any]) -> Any:
    """Every rank runs the stage (a rank outside the group its weights are sharded over returns at once), then
    they compare outcomes and take rank 0's result: an exception every rank raised alike (an input the stage
    refuses before its first collective, or a cancel, which ctx.step raises on all ranks together) becomes an
    error or a cancel the group survives. A rank that failed alone left its peers waiting inside a collective:
    after AGREE_TIMEOUT_S without them it fails for good, and the host, seeing it exit, ends the group."""
    failure = None
    try:
        outcome: tuple[str, Any] = ("ok", stage.fn(ctx, model, **inputs))
    except Cancelled as stop:
        outcome = ("cancelled", (stop.step, stop.total))
    except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, whatever it is
        failure = exc
        outcome = ("error", describe_error(exc, ctx, inputs))
    try:
        # The ranks that did not fail wait as long as their peers still run (the host bounds a request that
        # makes no progress); only then can the outcomes themselves be gathered without hanging.
        ctx.comm.all_gather_int(int(failure is not None), timeout_s=AGREE_TIMEOUT_S if failure else None)
    except RuntimeError:
        if failure is None:
            raise
        raise _failure(failure, stage, ctx, inputs) from failure
    # rank 0 sends its result along: the ranks left out of the sharded group have none of their own
    outcomes = ctx.comm.all_gather_object(outcome if outcome[0] != "ok" or ctx.is_main else outcome[:1])
    for rank, (status, *value) in enumerate(outcomes):
        if status == "error":
            raise MainRankError(f"stage {stage.name} failed on rank {rank}: {value[0]}")
        if status == "cancelled":
            raise Cancelled(*value[0])
    return outcomes[0][1]


def _failure(exc: Exception, stage: Stage, ctx: StageContext, inputs: dict[str, Any]) -> RankFailure:
    return RankFailure(f"{describe_error(exc, ctx, inputs)} (stage {stage.name})")


def describe_error(exc: Exception, ctx: StageContext, inputs: dict[str, Any]) -> str:
    """The exception as one line for the user; an out-of-memory error also says on which device, for which
    request and layout, and what may fit instead."""
    if not isinstance(exc, torch.OutOfMemoryError):
        return f"{type(exc).__name__}: {exc}"
    layout = ctx.comm.layout
    where = f"{ctx.device}, {layout.describe()}"
    size = _request_size(inputs)
    if size:
        where += f", request {size}"
    remedies = ["a smaller size or batch"]
    visible = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    if visible > layout.world_size:
        remedies.append(f"more GPUs ({layout.world_size} of the {visible} visible are used)")
    if layout.cfg > 1:
        remedies.append("cfg_parallel off (each image's tokens are then split over all the GPUs, not half)")
    cause = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else "out of memory"
    return f"OutOfMemoryError on {where}: {cause}. What may fit: {', or '.join(remedies)}"


def _request_size(inputs: dict[str, Any]) -> str:
    """The request's size as its inputs give it: width x height (and batch) where named, else its tensors' shapes."""
    width, height = inputs.get("width"), inputs.get("height")
    if isinstance(width, int) and isinstance(height, int):
        batch = next((inputs[k] for k in ("batch", "batch_size") if isinstance(inputs.get(k), int)), None)
        return f"{width}x{height}" + (f", batch {batch}" if batch is not None else "")
    return ", ".join(f"{name} {'x'.join(map(str, value.shape))}" for name, value in inputs.items()
                     if isinstance(value, torch.Tensor))
