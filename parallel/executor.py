"""Runs one stage on this rank the way the stage declares: the single place where parallelism types mean something."""
from __future__ import annotations

from typing import Any

from .stage import Cancelled, Parallelism, Stage, StageContext


class MainRankError(Exception):
    """A stage failed where every rank hears of it: a main-rank-only stage on rank 0, or a tensor-parallel stage
    before its ranks diverged (a bad input refused on each). Every rank raises it, so the group stays in step and
    alive."""


def execute(stage: Stage, ctx: StageContext, model: Any, inputs: dict[str, Any]) -> Any:
    parallelism = stage.parallelism_for(model)
    if Parallelism.MAIN_RANK_ONLY in parallelism:
        if not ctx.is_main:
            return None
        try:
            return stage.fn(ctx, model, **inputs)
        except Cancelled:
            raise
        except Exception as exc:  # no other rank waits on this one, so the group stays healthy
            raise MainRankError(f"stage {stage.name} failed on rank 0: {type(exc).__name__}: {exc}") from exc
    if Parallelism.MAIN_RANK_ONLY_AND_SEND_TO_OTHERS in parallelism:
        outcome: tuple[str, Any] = ("ok", None)
        if ctx.is_main:
            try:
                outcome = ("ok", stage.fn(ctx, model, **inputs))
            except Cancelled as stop:  # rank 0 alone checks cancel here: the others are waiting for its result
                outcome = ("cancelled", (stop.step, stop.total))
            except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, whatever it is
                outcome = ("error", f"{type(exc).__name__}: {exc}")
        status, value = ctx.comm.broadcast_object(outcome)
        if status == "cancelled":
            raise Cancelled(*value)
        if status == "error":
            raise MainRankError(f"stage {stage.name} failed on rank 0: {value}")
        return value
    if Parallelism.TENSOR_PARALLEL in parallelism:
        return _in_step_on_every_rank(stage, ctx, model, inputs)
    # REPLICATED, SEQUENCE_PARALLEL and CFG_PARALLEL all run on every rank; the sharding lives in the model's
    # parallel plans and in parallel.cfg, which read ctx.comm.
    return stage.fn(ctx, model, **inputs)


def _in_step_on_every_rank(stage: Stage, ctx: StageContext, model: Any, inputs: dict[str, Any]) -> Any:
    """Every rank runs the stage (a rank outside the group the weights are sharded over returns at once), then
    they compare outcomes and take rank 0's result: an exception every rank raised alike (an input the stage
    refuses before its first collective, or a cancel, which ctx.step raises on all ranks together) becomes an
    error or a cancel the group survives. A rank failing alone inside a collective cannot be saved this way: the
    others wait there, and the host's process watch ends the group."""
    try:
        outcome: tuple[str, Any] = ("ok", stage.fn(ctx, model, **inputs))
    except Cancelled as stop:
        outcome = ("cancelled", (stop.step, stop.total))
    except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, whatever it is
        outcome = ("error", f"{type(exc).__name__}: {exc}")
    # rank 0 sends its result along: the ranks left out of the sharded group have none of their own
    outcomes = ctx.comm.all_gather_object(outcome if outcome[0] != "ok" or ctx.is_main else outcome[:1])
    for rank, (status, *value) in enumerate(outcomes):
        if status == "error":
            raise MainRankError(f"stage {stage.name} failed on rank {rank}: {value[0]}")
        if status == "cancelled":
            raise Cancelled(*value[0])
    return outcomes[0][1]
