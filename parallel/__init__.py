"""The host-agnostic multi-GPU runtime: layouts, stages and their executor, sharding, and the worker group.
Never imports ComfyUI or a specific model."""
from .group import WorkerError, WorkerGroup
from .layout import Layout, LayoutError
from .local import LocalRunner
from .pool import get_runner, release
from .stage import Cancelled, Loader, Parallelism, Stage, StageContext

__all__ = ["Cancelled", "Layout", "LayoutError", "Loader", "LocalRunner", "Parallelism", "Stage", "StageContext",
           "WorkerError", "WorkerGroup", "get_runner", "release"]
