"""Entry script of one worker process: `python worker_main.py CONFIG_JSON`, started by WorkerGroup, never imported.

A program of its own rather than a multiprocessing child, because inside ComfyUI a spawned child re-runs ComfyUI's
main.py and cannot import this package by name (shared/comfyui-host/NOTES.md)."""
import os
import sys
import types


def _import_package_without_comfyui() -> None:
    """Make `comfyui_parallel_diffusion` importable from the repository root without running the root __init__.py,
    which belongs to ComfyUI: a bare package object whose path is the root lets every subpackage import as usual."""
    parallel_dir = os.path.dirname(os.path.abspath(__file__))
    # This script's folder, parallel/, heads sys.path (unless PYTHONSAFEPATH is set): its modules (stage, layout,
    # ...) would shadow other top-level names.
    if sys.path and os.path.realpath(sys.path[0]) == os.path.realpath(parallel_dir):
        del sys.path[0]
    package = types.ModuleType("comfyui_parallel_diffusion")
    package.__path__ = [os.path.dirname(parallel_dir)]
    sys.modules[package.__name__] = package


if __name__ == "__main__":
    _import_package_without_comfyui()
    from comfyui_parallel_diffusion.parallel import worker

    worker.main(sys.argv)
