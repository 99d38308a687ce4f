"""A plugin for the worker-group tests: tiny stages for each Parallelism and each way a request can end.
Workers import it by name through WorkerGroup(extra_sys_path=[tests/])."""
import os
import signal
import time

import torch

from comfyui_parallel_diffusion.parallel import Loader, Parallelism, Stage

EVERY_RANK = Parallelism.EVERY_RANK
MAIN_ONLY = Parallelism.MAIN_RANK_ONLY_AND_SEND_TO_OTHERS
IN_STEP = Parallelism.EVERY_RANK_IN_STEP


def _count(ctx, name: str) -> None:
    ctx.state[name] = ctx.state.get(name, 0) + 1


def sample(ctx, model, n: int):
    """Random numbers from a fresh OS seed: without the broadcast every rank would hold different ones."""
    _count(ctx, "sample_runs")
    torch.seed()
    return torch.randn(n)


def state(ctx, model):
    return {"rank": ctx.comm.rank, "pid": os.getpid(), **ctx.state}


def loop(ctx, model, steps: int, sleep: float):
    for i in range(steps):
        ctx.state["loop_at"] = i + 1  # survives a cancel: a later `state` request shows where each rank stopped
        ctx.step(i + 1, steps)
        time.sleep(sleep)
    return steps


def fail_on(ctx, model, rank: int):
    if ctx.comm.rank == rank:
        raise ValueError(f"boom on rank {rank}")
    return "ok"


def gather_ranks(ctx, model):
    """A tensor collective on the group's device (NCCL on GPUs), as sequence-parallel attention makes."""
    mine = torch.full((1,), float(ctx.comm.rank), device=ctx.device)
    return ctx.comm.all_gather(mine, "world").cpu()


def die_on(ctx, model, rank: int, step: int):
    """Rank `rank` is killed at `step` while the others go on into a tensor collective."""
    for i in range(step + 2):
        if i == step and ctx.comm.rank == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        gather_ranks(ctx, model)
        ctx.step(i + 1, step + 2)
    return "survived"


def fail_in_step(ctx, model, rank: int, collectives: int = 3):
    """Every rank makes `collectives` tensor collectives, as a tensor-parallel layer would, but `rank` raises after
    the first: the others wait in the second for a rank that never comes."""
    for i in range(collectives):
        gather_ranks(ctx, model)
        if i == 0 and ctx.comm.rank == rank:
            raise RuntimeError(f"boom in step on rank {rank}")
    return "ok"


def hang_on(ctx, model, rank: int):
    """`rank` never returns after the first collective (a stuck kernel, a deadlock); the others wait for it in the
    second."""
    gather_ranks(ctx, model)
    while ctx.comm.rank == rank:
        time.sleep(1)
    gather_ranks(ctx, model)
    return "ok"


def refuse_in_step(ctx, model):
    """Every rank refuses the request alike, before any collective (a bad input)."""
    raise ValueError("refused on every rank")


def out_of_memory_above(ctx, model, rank: int, width: int, height: int, pixels: int):
    """`rank` runs out of memory for a request of more than `pixels` pixels."""
    if ctx.comm.rank == rank and width * height > pixels:
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {width * height // 2**18} GiB.")
    return width * height


def fail_main(ctx, model):
    raise RuntimeError("main rank says no")


def use_model(ctx, model):
    return model


def empty(ctx, model):
    return None


def echo(ctx, model, **inputs):
    """Every rank returns the inputs it received: requests reach the other ranks through Comm.broadcast_object."""
    return inputs


def load_counter(ctx, value: int):
    _count(ctx, "loads")
    return {"value": value, "rank": ctx.comm.rank}


STAGES = {stage.name: stage for stage in (
    Stage("sample", MAIN_ONLY, sample),
    Stage("fail_main", MAIN_ONLY, fail_main),
    Stage("state", EVERY_RANK, state),
    Stage("loop", EVERY_RANK, loop),
    Stage("fail_on", EVERY_RANK, fail_on),
    Stage("die_on", EVERY_RANK, die_on),
    Stage("gather_ranks", EVERY_RANK, gather_ranks),
    Stage("use_model", EVERY_RANK, use_model),
    Stage("empty", EVERY_RANK, empty),
    Stage("echo", EVERY_RANK, echo),
    Stage("fail_in_step", IN_STEP, fail_in_step),
    Stage("hang_on", IN_STEP, hang_on),
    Stage("refuse_in_step", IN_STEP, refuse_in_step),
    Stage("out_of_memory_above", EVERY_RANK, out_of_memory_above),
    Stage("out_of_memory_above_on_rank_0", Parallelism.MAIN_RANK_ONLY, out_of_memory_above),
)}
LOADERS = {"counter": Loader("counter", load_counter)}
