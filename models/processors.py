"""Installing the project's attention processors through diffusers' processor API (Attention.set_processor)."""
from __future__ import annotations

from . import internals


def replace_processors(transformer, library_processor: type, processor) -> None:
    """Give every attention module of `transformer` the project's `processor` in place of diffusers'
    `library_processor`. Raises when an attention module holds another processor, or none holds it: diffusers
    changed its processors, and the project's (through which sequence parallelism attends) would not run.
    Idempotent."""
    modules = [m for m in transformer.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    foreign = {type(m.processor).__name__ for m in modules
               if not isinstance(m.processor, (library_processor, type(processor)))}
    if foreign or not modules:
        raise RuntimeError(f"{type(transformer).__name__}: expected diffusers' {library_processor.__name__} in every "
                           f"attention module, found {sorted(foreign) or 'no attention module'}; the project's "
                           f"processor ({type(processor).__name__}) follows that one and needs updating")
    for module in modules:
        module.set_processor(processor)


def check_sequence_parallel(model: str) -> None:
    """Refuse to shard `model`'s DiT where the project's processors may no longer follow diffusers' (the gate
    warns why): each rank would attend as a copy of an older processor does."""
    if not internals.SEQUENCE_PARALLEL_ATTENTION.available():
        raise RuntimeError(f"{model}: sequence parallelism is off with this diffusers (warned why); "
                           f"{internals.SEQUENCE_PARALLEL_ATTENTION.fallback}")
