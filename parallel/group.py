"""WorkerGroup: the LocalRunner API served by N worker processes, one per GPU (or N CPU ranks on gloo).

The host talks to rank 0 over a private control channel (channel.py); the protocol is described in worker.py.
Workers are their own programs (worker_main.py) started with subprocess, never multiprocessing: inside ComfyUI a
spawned child re-runs ComfyUI's main.py and cannot import this package (shared/comfyui-host/NOTES.md).
The host never imports the plugin: stages and loaders are looked up by name in the workers.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from typing import Any, Callable, NoReturn

import torch

from .channel import Channel, HostChannel
from .layout import Layout
from .stage import Cancelled
from .worker import error_file, log_file

DEFAULT_PLUGIN = "comfyui_parallel_diffusion.models"
WORKER_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_main.py")
POLL_S = 0.05  # how soon the host notices a dead worker or a cancel while it waits for rank 0
# CUDA adds context creation and NCCL set-up to the imports. CPU ranks share the cores, so their imports (torch,
# diffusers, transformers: ~6 s of CPU each) queue up: the allowance grows with the rank count.
START_TIMEOUT_S = {"cpu": 60.0, "cuda": 180.0}
START_TIMEOUT_PER_RANK_S = {"cpu": 15.0, "cuda": 0.0}
DEATH_GRACE_S = 5.0  # rank 0 closed the channel: how long it may take to exit and leave its error behind
CLOSE_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A request failed in the worker group; `rank` is the rank that failed first (None: nobody died, e.g. a
    start-up timeout)."""

    def __init__(self, rank: int | None, message: str):
        super().__init__(message)
        self.rank = rank


class WorkerGroup:
    def __init__(self, layout: Layout, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 plugin: str = DEFAULT_PLUGIN, extra_sys_path: list[str] | None = None):
        if device not in START_TIMEOUT_S:
            raise ValueError(f"device must be one of {sorted(START_TIMEOUT_S)}, got {device!r}")
        layout.check()
        layout.check_devices(device, torch.cuda.device_count())
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.plugin = plugin
        self.extra_sys_path = list(extra_sys_path or [])
        self._loads: dict[str, tuple[str, dict[str, Any]]] = {}  # what a restarted group must load again
        self._procs: list[subprocess.Popen] = []
        self._channel: HostChannel | None = None
        self._conn: Channel | None = None
        self._start()

    # -- the LocalRunner API -----------------------------------------------------------------------------------
    def load(self, key: str, loader: str, **args: Any) -> None:
        self._ensure_running()
        if self._loads.get(key) == (loader, args):
            return
        self._loads.pop(key, None)  # the workers drop the old model first: if the new load fails, neither is there
        self._request(("load", key, loader, args))
        self._loads[key] = (loader, args)

    def unload(self, key: str | None = None) -> None:
        keys = [key] if key else list(self._loads)
        for k in keys:
            self._loads.pop(k, None)
        if self._alive():
            self._request(("unload", keys))

    def run(self, stage: str, model_key: str | None, inputs: dict[str, Any], *,
            on_progress: Callable[[str, int, int], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, collect: str = "main") -> Any:
        if collect not in ("main", "all"):
            raise ValueError(f"collect must be 'main' or 'all', got {collect!r}")
        if model_key and model_key not in self._loads:
            # Checked here: a KeyError in the workers would be fatal and cost a restart of the whole group.
            raise KeyError(f"model {model_key!r} is not loaded")
        self._ensure_running()
        return self._request(("run", stage, model_key, inputs, collect), on_progress, should_cancel)

    def close(self) -> None:
        """Stop the workers (freeing their GPU memory); a later call starts a fresh group with no models."""
        self._loads.clear()
        if self._alive():
            try:
                self._conn.send(("close",))
                deadline = time.monotonic() + CLOSE_TIMEOUT_S
                for proc in self._procs:
                    proc.wait(max(0.0, deadline - time.monotonic()))
            except (OSError, subprocess.TimeoutExpired):
                pass  # what did not exit in time is killed below
        self._kill()

    # -- processes -----------------------------------------------------------------------------------------
    def _alive(self) -> bool:
        return bool(self._procs) and all(proc.poll() is None for proc in self._procs)

    def _ensure_running(self) -> None:
        """After a failure or close(), start a fresh group transparently."""
        if self._alive():
            return
        if self._procs:
            codes = [proc.poll() for proc in self._procs]
            log.warning("the worker group died while idle (%s); starting a new one",
                        _failures(self._channel.directory, codes)[0][1].splitlines()[0])
        self._kill()
        self._start()

    def _start(self) -> None:
        self._channel = HostChannel()
        config = json.dumps({
            "layout": dataclasses.asdict(self.layout),
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "plugin": self.plugin,
            "extra_sys_path": self.extra_sys_path,
            "host_pid": os.getpid(),
            "run_dir": self._channel.directory,
        })
        port = free_port()
        self._procs = [self._spawn(rank, config, port) for rank in range(self.layout.world_size)]
        self._conn = self._wait_for_rank0()
        for key, (loader, args) in list(self._loads.items()):  # the models the previous group held
            try:
                self._request(("load", key, loader, args))
            except WorkerError:
                self._loads.pop(key)
                raise

    def _spawn(self, rank: int, config: str, port: int) -> subprocess.Popen:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(self.layout.world_size)}
        if rank == 0:
            env.update(self._channel.env())
        with open(log_file(self._channel.directory, rank), "w") as stderr:
            return subprocess.Popen([sys.executable, WORKER_MAIN, config], env=env, stdin=subprocess.DEVNULL,
                                    stderr=stderr)

    def _wait_for_rank0(self) -> Channel:
        """Rank 0 connects once every rank has joined the process group and imported the plugin."""
        timeout = START_TIMEOUT_S[self.device] + START_TIMEOUT_PER_RANK_S[self.device] * self.layout.world_size
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = self._channel.accept(POLL_S)
            except (EOFError, OSError, AuthenticationError):
                conn = None  # rank 0 died while connecting (the check below reports it), or a caller had no key
            if conn is not None:
                return conn
            if not self._alive():
                self._fail("the worker group failed to start")
            if time.monotonic() > deadline:
                self._fail(f"the worker group ({self.layout.describe()}) did not start within {timeout:.0f} s")

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            proc.wait()
        if self._conn is not None:
            self._conn.close()
        if self._channel is not None:
            self._channel.close()
        self._procs, self._conn, self._channel = [], None, None

    def _fail(self, context: str, grace_s: float = 0.0) -> NoReturn:
        """Kill the group and raise the error of the rank that failed first, after up to `grace_s` for a rank to
        die by itself (rank 0 closed the channel: it is about to exit, leaving its error behind)."""
        deadline = time.monotonic() + grace_s
        while self._alive() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        codes = [proc.poll() for proc in self._procs]  # None: still running, so not a cause
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        error = _failure_error(context, self._channel.directory, codes)
        self._kill()
        raise error

    # -- requests ------------------------------------------------------------------------------------------
    def _request(self, message: tuple, on_progress: Callable[[str, int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> Any:
        self._send(message)
        try:
            status, *reply = self._await_reply(on_progress, should_cancel)
        except WorkerError:
            raise
        except BaseException:
            # on_progress raised (ComfyUI's progress bar does when the user interrupts) or the host was
            # interrupted: this request must end before the group can serve another.
            self._abandon()
            raise
        if status == "ok":
            return reply[0]
        if status == "cancelled":
            raise Cancelled(*reply)
        raise WorkerError(0, reply[0])  # a MainRankError: the group is still in step and alive

    def _await_reply(self, on_progress: Callable[[str, int, int], None] | None,
                     should_cancel: Callable[[], bool] | None) -> tuple:
        cancel_sent = False
        while True:
            if should_cancel is not None and not cancel_sent and should_cancel():
                self._send(("cancel",))
                cancel_sent = True
            message = self._receive()
            if message is None:
                continue
            if message[0] != "progress":
                return message
            if on_progress is not None:
                on_progress(*message[1:])

    def _abandon(self) -> None:
        try:
            self._send(("cancel",))
            self._await_reply(None, None)
        except BaseException:  # noqa: BLE001 - the caller is already raising; a group out of step must go
            self._kill()

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:
            self._fail("the worker group failed", DEATH_GRACE_S)

    def _receive(self) -> tuple | None:
        """The next message of rank 0, or None after POLL_S without one while every worker lives."""
        try:
            if self._conn.poll(POLL_S):
                return self._conn.recv()
            if self._alive():
                return None
        except (EOFError, OSError):
            self._fail("the worker group failed", DEATH_GRACE_S)  # rank 0 closed the channel: it is exiting
        except Exception as exc:  # noqa: BLE001 - unpickling; only a reply can fail, so the request is over
            raise WorkerError(0, f"the host cannot unpickle rank 0's reply ({type(exc).__name__}: {exc}); "
                                 f"a result must be plain values (tensors, numbers, strings, containers)") from exc
        self._fail("the worker group failed")


def _failure_error(context: str, run_dir: str, exit_codes: list[int | None]) -> WorkerError:
    failures = _failures(run_dir, exit_codes)
    if not failures:  # nobody died, so nobody reported anything: show what each rank last wrote
        tails = [f"rank {rank}'s log ends with:\n{_tail(log_file(run_dir, rank))}" for rank in range(len(exit_codes))]
        return WorkerError(None, "\n".join([context, *tails]))
    (rank, cause), *others = failures
    message = f"{context}: {cause}"
    if others:
        message += "\nthen " + "; ".join(text.splitlines()[0] for _, text in others)
    return WorkerError(rank, message)


def _failures(run_dir: str, exit_codes: list[int | None]) -> list[tuple[int, str]]:
    """(rank, what happened) for each rank that exited by itself, the cause first. The others failed in
    collectives the first one left, so they report later; a rank that died without reporting anything (killed,
    os._exit, a native crash) did not wait for anyone and is taken as first."""
    failures = []
    for rank, code in enumerate(exit_codes):
        if code is None:
            continue
        path = error_file(run_dir, rank)
        if os.path.exists(path):
            with open(path) as f:
                failures.append(((1, os.stat(path).st_mtime_ns), rank, f.read().rstrip()))
        else:
            text = (f"rank {rank} {_exit_status(code)} without reporting an error; its log ends with:\n"
                    f"{_tail(log_file(run_dir, rank))}")
            failures.append(((0, 0), rank, text.rstrip()))
    return [(rank, text) for _, rank, text in sorted(failures)]


def _exit_status(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return "".join(collections.deque(f, maxlen=LOG_TAIL_LINES)) or "(nothing)"


def free_port() -> int:
    """A port for the rendezvous store of rank 0 (a tiny race with other programs, as with torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
