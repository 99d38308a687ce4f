"""One process-wide runner: the worker group (or, for one rank, the in-process LocalRunner) that requests of the
current shape go to. A different shape replaces it, since two groups would hold two copies of the models in GPU
memory; release() frees it, for ComfyUI's unload / free-memory and at exit."""
from __future__ import annotations

import atexit
import gc
import importlib
from types import ModuleType

import torch

from .group import DEFAULT_PLUGIN, WorkerGroup
from .layout import Layout
from .local import LocalRunner

# The name this package was imported under: ComfyUI imports it by its folder path, pip installs it by its name.
_PACKAGE = __package__.rpartition(".")[0]
_CANONICAL = DEFAULT_PLUGIN.partition(".")[0]

_runner: LocalRunner | WorkerGroup | None = None
_shape: tuple | None = None


def get_runner(layout: Layout, device: str = "cpu", dtype: torch.dtype = torch.float32,
               plugin: str = DEFAULT_PLUGIN, extra_sys_path: list[str] | None = None,
               log_dir: str | None = None) -> LocalRunner | WorkerGroup:
    """log_dir: where a failed worker group's logs are kept (WorkerGroup's default: the temporary directory)."""
    global _runner, _shape
    shape = (layout, device, dtype, plugin, tuple(extra_sys_path or ()), log_dir)
    if _runner is not None and _shape == shape:
        return _runner
    release()
    if layout.world_size == 1:
        _runner = LocalRunner(_import_plugin(plugin), device, dtype)
    else:
        _runner = WorkerGroup(layout, device, dtype, plugin, extra_sys_path, log_dir)
    _shape = shape
    return _runner


def release() -> None:
    global _runner, _shape
    if _runner is not None:
        _runner.close()
        _runner, _shape = None, None
        gc.collect()  # a LocalRunner's models are only freed once collected
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _import_plugin(plugin: str) -> ModuleType:
    """Workers name our models by the package's canonical name; in the host the same modules live under the name
    this package was imported as, and importing them a second time under another name would duplicate the stage
    types (a Parallelism member from one copy is not one from the other)."""
    if plugin.partition(".")[0] == _CANONICAL:
        plugin = _PACKAGE + plugin[len(_CANONICAL):]
    return importlib.import_module(plugin)


atexit.register(release)
