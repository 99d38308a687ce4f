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
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
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
# A request whose group sends nothing (no progress event, no reply) for this long is stuck: the group is stopped.
# Loading a model and compiling send nothing for a minute or more.
STALL_TIMEOUT_S = float(os.environ.get("PARALLEL_DIFFUSION_STALL_TIMEOUT_S", "600"))
# A cancelled request stops at its next step boundary; one that has not stopped this long after is stuck.
CANCEL_TIMEOUT_S = 10.0
STACK_DUMP_TIMEOUT_S = 2.0  # how long a stuck group's ranks get to write their Python stacks to their logs

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A request failed in the worker group; `rank` is the rank that failed first (None: nobody died, e.g. a
    start-up timeout or a stuck group). Where the group was stopped, the message says where its logs were kept."""

    def __init__(self, rank: int | None, message: str):
        super().__init__(message)
        self.rank = rank


class WorkerGroup:
    def __init__(self, layout: Layout, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 plugin: str = DEFAULT_PLUGIN, extra_sys_path: list[str] | None = None, log_dir: str | None = None,
                 stall_timeout_s: float = STALL_TIMEOUT_S, cancel_timeout_s: float = CANCEL_TIMEOUT_S):
        """log_dir: where a failed group's worker logs are kept (default: the temporary directory)."""
        if device not in START_TIMEOUT_S:
            raise ValueError(f"device must be one of {sorted(START_TIMEOUT_S)}, got {device!r}")
        layout.check()
        layout.check_devices(device, torch.cuda.device_count())
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.plugin = plugin
        self.extra_sys_path = list(extra_sys_path or [])
        self.log_dir = log_dir
        self.stall_timeout_s = stall_timeout_s
        self.cancel_timeout_s = cancel_timeout_s
        self._loads: dict[str, tuple[str, dict[str, Any]]] = {}  # what a restarted group must load again
        self._procs: list[subprocess.Popen] = []
        self._channel: HostChannel | None = None
        self._conn: Channel | None = None
        self._busy = threading.Lock()  # held by the thread whose request is in flight
        self._released = False  # close() came from another thread while a request was in flight
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
        """Stop the workers (freeing their GPU memory); a later call starts a fresh group with no models. Called
        from another thread while a request is in flight (e.g. stuck), it kills the workers and that request ends
        with an error."""
        self._loads.clear()
        if not self._busy.acquire(blocking=False):
            self._released = True
            for proc in self._procs:
                proc.kill()
            return
        try:
            self._close()
        finally:
            self._busy.release()

    def _close(self) -> None:
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
            cause = _failures(self._channel.directory, codes)[0][1].splitlines()[0]
            log.warning("the worker group died while idle (%s; worker logs: %s); starting a new one", cause,
                        self._keep_logs())
        self._kill()
        self._start()

    def _start(self) -> None:
        self._channel = HostChannel()
        self._released = False
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
        # One host: the store (see worker.join_process_group), gloo's connections and NCCL's bootstrap all listen on
        # the loopback interface alone.
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(self.layout.world_size), "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
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
        if self._released:
            self._kill()
            raise WorkerError(None, "the worker group was stopped while this request ran (its models were "
                                    "unloaded); the next request starts a new one")
        deadline = time.monotonic() + grace_s
        while self._alive() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        codes = [proc.poll() for proc in self._procs]  # None: still running, so not a cause
        self._stop_processes()
        error = _failure_error(context, self._channel.directory, codes, self._keep_logs())
        self._kill()
        raise error

    def _stop_stuck(self, context: str) -> WorkerError:
        """Stop a group that makes no progress; the error says where each rank's Python stack was."""
        run_dir, ranks = self._channel.directory, range(len(self._procs))
        offsets = [os.path.getsize(log_file(run_dir, rank)) for rank in ranks]
        for proc in self._procs:
            proc.send_signal(signal.SIGUSR1)  # each rank writes its threads' stacks to its log (faulthandler)
        deadline = time.monotonic() + STACK_DUMP_TIMEOUT_S
        while True:
            places = [_main_thread_place(log_file(run_dir, rank), offset) for rank, offset in zip(ranks, offsets)]
            if all(places) or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        self._stop_processes()
        where = "; ".join(f"rank {rank} in {place or '(no stack written)'}" for rank, place in zip(ranks, places))
        error = WorkerError(None, f"{context}, so the worker group was stopped; where each rank was: {where}\n"
                                  f"worker logs: {self._keep_logs()}")
        self._kill()
        return error

    def _stop_processes(self) -> None:
        """Kill what still runs and wait for all, so that every log is complete."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            proc.wait()

    def _keep_logs(self) -> str:
        """Copy the workers' logs out of the run folder, which goes with the group, into a folder of their own."""
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
        kept = tempfile.mkdtemp(prefix=time.strftime("parallel-diffusion-logs-%Y%m%d-%H%M%S-"), dir=self.log_dir)
        for rank in range(len(self._procs)):
            path = log_file(self._channel.directory, rank)
            if os.path.exists(path):
                shutil.copy(path, kept)
        return kept

    # -- requests ------------------------------------------------------------------------------------------
    def _request(self, message: tuple, on_progress: Callable[[str, int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> Any:
        with self._busy:
            self._send(message)
            what = f"stage {message[1]}" if message[0] == "run" else f"{message[0]} of {message[1]}"
            try:
                status, *reply = self._await_reply(on_progress, should_cancel, what)
            except (WorkerError, Cancelled):
                raise
            except BaseException:
                # on_progress raised (ComfyUI's progress bar does when the user interrupts) or the host was
                # interrupted: this request must end before the group can serve another.
                self._abandon(what)
                raise
            finally:
                if self._released:  # the reply came, but close() killed the workers meanwhile
                    self._kill()
        if status == "ok":
            return reply[0]
        if status == "cancelled":
            raise Cancelled(*reply)
        raise WorkerError(0, reply[0])  # a MainRankError: the group is still in step and alive

    def _await_reply(self, on_progress: Callable[[str, int, int], None] | None,
                     should_cancel: Callable[[], bool] | None, what: str) -> tuple:
        """Rank 0's reply, passing progress on. A group silent for stall_timeout_s, or still running
        cancel_timeout_s after a cancel, is stopped: WorkerError, or Cancelled for a cancelled request."""
        cancel_sent = heard = time.monotonic()
        cancelled = False
        progress = (0, 0)
        while True:
            if should_cancel is not None and not cancelled and should_cancel():
                self._send(("cancel",))
                cancel_sent, cancelled = time.monotonic(), True
            if cancelled and time.monotonic() - cancel_sent > self.cancel_timeout_s:
                log.warning("%s", self._stop_stuck(f"{what} did not stop within {self.cancel_timeout_s:g} s of "
                                                   f"the cancel"))
                raise Cancelled(*progress)
            if time.monotonic() - heard > self.stall_timeout_s:
                raise self._stop_stuck(f"no progress in {what} for {self.stall_timeout_s:g} s (no progress event, "
                                       f"no reply)")
            message = self._receive()
            if message is None:
                continue
            heard = time.monotonic()
            if message[0] != "progress":
                return message
            progress = message[2:]
            if on_progress is not None:
                on_progress(*message[1:])

    def _abandon(self, what: str) -> None:
        try:
            self._await_reply(None, lambda: True, what)
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


def _failure_error(context: str, run_dir: str, exit_codes: list[int | None], logs: str) -> WorkerError:
    """The error of a stopped group (its processes have ended, its logs are still in run_dir): the cause's first
    line, where the logs were kept, the other ranks' first lines, then the cause's traceback."""
    failures = _failures(run_dir, exit_codes)
    if not failures:  # nobody died, so nobody reported anything: show what each rank last wrote
        tails = [f"rank {rank}'s log ends with:\n{_tail(log_file(run_dir, rank))}" for rank in range(len(exit_codes))]
        return WorkerError(None, "\n".join([context, f"worker logs: {logs}", *tails]))
    (rank, cause), *others = failures
    first, _, rest = cause.partition("\n")
    lines = [f"{context}: {first}", f"worker logs: {logs}"]
    if others:
        lines.append("then " + "; ".join(text.splitlines()[0] for _, text in others))
    return WorkerError(rank, "\n".join(lines + ([rest] if rest else [])))


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


FAULTHANDLER_THREAD = re.compile(r"^(?:Current thread|Thread) 0x[0-9a-f]+ .*\(most recent call first\):$")
FAULTHANDLER_FRAME = re.compile(r'^  File "([^"]+)", line (\d+) in (\S+)')
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
SITE_DIRS = (sysconfig.get_paths()["purelib"] + os.sep, sysconfig.get_paths()["platlib"] + os.sep)


def _waits_for_others(file: str) -> bool:
    """A frame below the code that waits: torch's own (a collective's Python wrapper) or the standard library's."""
    return file.startswith(TORCH_DIR) or file.startswith(STDLIB_DIR) and not file.startswith(SITE_DIRS)


def _main_thread_place(path: str, offset: int) -> str | None:
    """Where the main thread of a rank stood in the stack dump faulthandler wrote to its log after `offset`: the
    innermost frame outside torch and the standard library, as "function (file line N)"; None before the dump of
    the main thread (whose outermost frame is worker_main.py) is complete."""
    with open(path, errors="replace") as f:
        f.seek(offset)
        text = f.read()
    for block in text.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines or not FAULTHANDLER_THREAD.match(lines[0]):
            continue
        frames = [m.groups() for m in map(FAULTHANDLER_FRAME.match, lines[1:]) if m]
        if not frames or os.path.basename(frames[-1][0]) != os.path.basename(WORKER_MAIN):
            continue
        file, line, function = next((frame for frame in frames if not _waits_for_others(frame[0])), frames[0])
        return f"{function} ({os.path.basename(file)} line {line})"
    return None


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return "".join(collections.deque(f, maxlen=LOG_TAIL_LINES)) or "(nothing)"


def free_port() -> int:
    """A port for the rendezvous store of rank 0 (a tiny race with other programs, as with torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
