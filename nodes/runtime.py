"""The bridge between ComfyUI nodes and the parallel runtime: model handles, the process-wide runner, progress bars,
interrupts, user-facing errors, and releasing the worker group when ComfyUI frees memory.

A node never holds a runner. It holds a ModelHandle (a small frozen value ComfyUI caches like any output) and asks
for the runner each time it runs: parallel.pool keeps one worker group, for the layout asked for last, reused
across prompts and models; after ComfyUI's "free memory" (or a node of a loader with another layout) a group is
started again and the model loaded again, transparently.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_execution.utils import get_executing_context

from ..models.loading import ModelFolderError
from ..parallel import Cancelled, Layout, LayoutError, WorkerError, pool
from ..parallel.executor import MainRankError

log = logging.getLogger(__name__)

DEVICES = ["auto", "cuda", "cpu"]
MAX_GPUS = 16
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # what torch.Generator.manual_seed accepts, as KSampler's seed
# Errors whose message is written for the user: the runtime's, and the ValueErrors of the models' own checks
# (sizes, prompts). Shown without a traceback, and without their type name.
USER_FACING = (WorkerError, LayoutError, ModelFolderError, MainRankError, ValueError)


class ParallelDiffusionError(RuntimeError):
    """What a node raises for a request the runtime refused: its message is meant for the user."""


# ComfyUI shows an error as "<module>.<class>: <message>", and this package's module name is its folder's path.
ParallelDiffusionError.__module__ = "parallel_diffusion"


@dataclass(frozen=True)
class ModelHandle:
    """What a loader node outputs: which model, on which layout. Plain and hashable, so ComfyUI caches it."""
    loader: str  # the runtime's loader name: "zimage", "zimage_files" or "glm_image"
    source: tuple[tuple[str, str], ...]  # the loader's arguments: (("path", folder),) or the split files
    layout: Layout
    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file name, strength) of the Z-Image LoRA nodes, in order

    @property
    def key(self) -> str:
        return f"{self.loader}:" + ",".join(value for _, value in self.source)

    def describe(self) -> str:
        files = ", ".join(os.path.basename(value) for _, value in self.source)
        return f"{files} on {self.layout.describe()}, {self.device}"


def with_lora(handle: ModelHandle, name: str, strength: float) -> ModelHandle:
    """The same loaded model with one more LoRA: applied by the stages that take one, per request."""
    return dataclasses.replace(handle, loras=handle.loras + ((name, strength),))


def resolve_device(device: str) -> str:
    """"auto" follows ComfyUI's own device: CUDA unless ComfyUI runs on the CPU (--cpu, or no CUDA GPU)."""
    if device == "auto":
        return "cuda" if mm.get_torch_device().type == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParallelDiffusionError("device 'cuda' was chosen but this ComfyUI sees no CUDA GPU; choose 'cpu' or "
                                     "'auto'")
    return device


def load_model(loader: str, source: dict[str, str], gpus: int, cfg_parallel: bool, device: str,
               inspect: Callable[[], Any]) -> ModelHandle:
    """What a loader node does: check the files here with `inspect` (one clear line instead of a worker's
    traceback), build the layout, and load the model on the worker group so that loading errors show on the
    loader node."""
    device = resolve_device(device)
    with user_errors():
        inspect()
        layout = Layout.for_world(gpus, cfg=2 if cfg_parallel else 1)
        layout.check_devices(device, torch.cuda.device_count())
    handle = ModelHandle(loader, tuple(source.items()), layout, device,
                         torch.bfloat16 if device == "cuda" else torch.float32)
    runner_for(handle)
    log.info("parallel_diffusion: %s loaded (%s)", loader, handle.describe())
    return handle


def runner_for(handle: ModelHandle):
    """The pool's runner for the handle's layout, with the handle's model loaded (a no-op when it already is)."""
    with user_errors(f"loading {handle.describe()}", any_error=True):
        # a failed group's logs are kept in ComfyUI's temp folder (emptied when ComfyUI starts and exits)
        runner = pool.get_runner(handle.layout, handle.device, handle.dtype,
                                 log_dir=os.path.join(folder_paths.get_temp_directory(), "parallel_diffusion_logs"))
        runner.load(handle.key, handle.loader, **dict(handle.source))
    return runner


def run_stage(handle: ModelHandle, stage: str, inputs: dict[str, Any], node_id: str | None = None) -> Any:
    """Run one stage of the handle's model. Progress events of rank 0 feed a ComfyUI progress bar of node_id; an
    interrupt (the Cancel button, POST /interrupt) is passed to rank 0, which stops every rank at the same step
    boundary, and then surfaces as ComfyUI's own interruption."""
    runner = runner_for(handle)
    bars: dict[str, comfy.utils.ProgressBar] = {}

    def on_progress(what: str, done: int, total: int) -> None:
        # The bar's global hook raises InterruptProcessingException, and clears the flag, when an interrupt is
        # pending: raised here, it would abandon the request instead of letting rank 0 stop the group in step.
        # So: no update while interrupted (should_cancel carries it), and a flag taken by a race is put back.
        if mm.processing_interrupted():
            return
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = comfy.utils.ProgressBar(total, node_id=node_id)
        try:
            bar.update_absolute(done, total)
        except mm.InterruptProcessingException:
            mm.interrupt_current_processing(True)

    try:
        with user_errors(stage):
            return runner.run(stage, handle.key, inputs, on_progress=on_progress,
                              should_cancel=mm.processing_interrupted)
    except Cancelled:
        log.info("parallel_diffusion: %s interrupted", stage)
        raise mm.InterruptProcessingException() from None


def stage_runner(handle: ModelHandle, node_id: str | None = None) -> Callable[[str, dict[str, Any]], Any]:
    """run(stage, inputs) for a model pipeline's steps (models/*/pipeline.py), as run_stage runs them for a node."""
    return lambda stage, inputs: run_stage(handle, stage, inputs, node_id)


@contextlib.contextmanager
def user_errors(context: str | None = None, any_error: bool = False):
    """Turn the runtime's refusals into ParallelDiffusionError with a readable message: no worker traceback (the
    server log keeps it, as the exception's cause). any_error: every Exception, named by its type (loading a
    model, where whatever fails is the folder's or the model's problem, not a bug of the node)."""
    try:
        yield
    except ParallelDiffusionError:
        raise
    except USER_FACING as exc:
        raise ParallelDiffusionError(user_message(exc, context)) from exc
    except Exception as exc:
        if not any_error:
            raise
        raise ParallelDiffusionError(user_message(exc, context)) from exc


REMOTE_TRACEBACK = "Traceback (most recent call last)"  # what a worker's fatal error carries after its cause
FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
MAX_LINES = 12


def user_message(exc: Exception, context: str | None = None) -> str:
    """The cause without any traceback; where it was raised when the exception says nothing (e.g. a bare
    AssertionError in a model's constructor); the runtime's own errors without their type name."""
    text, _, remote_trace = str(exc).partition(REMOTE_TRACEBACK)
    text = text.rstrip()
    if not isinstance(exc, USER_FACING):
        text = f"{type(exc).__name__}: {text}".rstrip()
    frames = FRAME.findall(remote_trace) or [(f.filename, f.lineno, f.name)
                                             for f in traceback.extract_tb(exc.__traceback__)]
    if text.endswith(":") and frames:
        path, line, function = frames[-1]
        text += f" (raised in {function}, {os.path.basename(path)} line {line})"
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES] + ["... (see the ComfyUI log for the rest)"]
    text = "\n".join(lines)
    if isinstance(exc, WorkerError) and not text.startswith("stage "):  # not a main-rank error: the group died
        text += "\n(the worker group was stopped; the next prompt starts a new one)"
    if context and not isinstance(exc, (ModelFolderError, LayoutError)) and not text.startswith("stage "):
        text = f"{context}: {text}"
    return text


# -- ComfyUI's unload / free memory also frees our worker group --------------------------------------------------

def install_release_hook() -> None:
    """ComfyUI has no callback for freeing memory; its prompt worker calls
    comfy.model_management.unload_all_models() through the module attribute for POST /free and the UI's "Unload
    models" (between prompts), after an out-of-memory error and, with --disable-smart-memory, after every prompt.
    Wrapping it once makes those stop our workers too (their GPUs are invisible to ComfyUI's own memory
    accounting). A call from inside a node while it runs (another custom node freeing ComfyUI's memory mid-workflow)
    keeps the group, and logs that: it asks ComfyUI to unload ComfyUI's models, and stopping the workers each time
    would cost our next node a restart and a reload (30-45 s)."""
    original = mm.unload_all_models
    if getattr(original, "_parallel_diffusion_release", False):
        return

    def unload_all_models(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            node = get_executing_context()
            try:
                if node is not None:
                    log.info("parallel_diffusion: node %s called unload_all_models() while it ran; the worker group "
                             "stays (Unload Models or /free stops it)", node.node_id)
                else:
                    pool.release()
            except Exception:  # noqa: BLE001 - freeing must never break ComfyUI's own unloading
                log.exception("parallel_diffusion: releasing the worker group failed")

    unload_all_models._parallel_diffusion_release = True
    unload_all_models.__wrapped__ = original
    mm.unload_all_models = unload_all_models
