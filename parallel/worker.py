"""One rank of a WorkerGroup, in its own process (started through worker_main.py): joins the process group, keeps
models resident by key, and runs every request of the host on every rank through the executor.

Protocol. The host talks to rank 0 only; rank 0 broadcasts each request to the other ranks.
  host -> rank 0   ("load", key, loader, args) | ("unload", keys) | ("run", stage, model_key, inputs, collect)
                   | ("close",)  -- requests, one at a time
                   ("cancel",)   -- only while a run is in flight: sets a flag that ctx.cancel_requested reads
  rank 0 -> host   ("progress", what, done, total)*, then exactly one reply per request (none to close):
                   ("ok", value) | ("cancelled", step, total) | ("error", message of a MainRankError)
Cancelled and MainRankError are raised on every rank at the same point, so the ranks stay in step and the group
serves the next request. Any other exception may leave the other ranks waiting in a collective forever: the
failing rank writes its error file and exits, and the host, seeing a dead process, kills the whole group.
"""
from __future__ import annotations

import faulthandler
import gc
import importlib
import json
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from .channel import connect_to_host
from .comm import Comm
from .executor import MainRankError, RankFailure, execute
from .layout import Layout
from .stage import Cancelled, StageContext

# An idle rank waits for the next request inside a gloo broadcast, which fails after gloo's 30-minute timeout;
# rank 0 broadcasts a no-op request this often while the host is quiet.
IDLE_PING_S = 60.0
HOST_CHECK_S = 1.0


def error_file(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"rank{rank}.error")


def log_file(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"rank{rank}.log")


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    rank = int(os.environ["RANK"])
    # Ctrl-C in a terminal reaches the whole process group; the host decides what happens, not each worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable()  # a crash in native code still leaves a traceback in this rank's log
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the host asks where a stuck rank is
    _exit_with_host(config["host_pid"], config["run_dir"])
    try:
        Worker(config, rank).serve()
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the host must hear of it and this rank must go
        _report_fatal(config["run_dir"], rank, exc)
        os._exit(1)
    # Nothing is left to clean up, and interpreter shutdown with torch loaded takes over a second.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Worker:
    def __init__(self, config: dict[str, Any], rank: int):
        sys.path[:0] = config["extra_sys_path"]
        plugin = importlib.import_module(config["plugin"])
        self.stages, self.loaders = plugin.STAGES, plugin.LOADERS
        layout = Layout(**config["layout"])
        device = join_process_group(config["device"], rank, layout.world_size)
        self.comm = Comm(layout, rank, device, distributed=True)
        self.ctx = StageContext(comm=self.comm, dtype=getattr(torch, config["dtype"]))
        self.models: dict[str, Any] = {}
        self.comm.barrier()  # every rank is ready before rank 0 tells the host so
        self.host = HostLink(self.ctx, config["run_dir"]) if self.comm.is_main else None

    def serve(self) -> None:
        while True:
            request = self.comm.broadcast_object(self.host.next_request() if self.host else None)
            if request[0] == "close":
                break
            if request[0] != "ping":
                self._answer(request)
        dist.destroy_process_group()

    def _answer(self, request: tuple) -> None:
        kind, *args = request
        collect_all = kind == "run" and args.pop() == "all"
        outcome = self._outcome(kind, args)
        # Rank 0 must not answer while another rank is failing: that rank exits, so the closing collective fails on
        # rank 0 too and the host hears of the failure instead of a result. Rank 0's own outcome is the answer, so
        # only collect="all" needs to gather anything.
        if collect_all:
            gathered = self.comm.all_gather_object(outcome)
            if outcome[0] == "ok":
                outcome = ("ok", [value for _, value in gathered])
        else:
            self.comm.barrier()
        if self.host:
            self.host.send(outcome)

    def _outcome(self, kind: str, args: list) -> tuple:
        handler = {"load": self._load, "unload": self._unload, "run": self._run}[kind]
        try:
            return ("ok", handler(*args))
        except Cancelled as exc:
            return ("cancelled", exc.step, exc.total)
        except MainRankError as exc:
            message = str(exc)
        # Out of the except block the failed stage's frames are gone: hand their memory back (after an
        # out-of-memory error, a smaller request must find it free).
        self._unload([])
        return ("error", message)

    def _load(self, key: str, loader: str, args: dict[str, Any]) -> None:
        self._unload([key])  # a replaced model's memory must be free before its successor loads
        self.models[key] = self.loaders[loader].fn(self.ctx, **args)

    def _unload(self, keys: list[str]) -> None:
        for key in keys:
            self.models.pop(key, None)
        gc.collect()
        if self.comm.device.type == "cuda":
            torch.cuda.empty_cache()

    def _run(self, stage: str, model_key: str | None, inputs: dict[str, Any]) -> Any:
        model = self.models[model_key] if model_key else None
        return execute(self.stages[stage], self.ctx, model, inputs)


class HostLink:
    """Rank 0's end of the control channel. A reader thread takes messages off the connection even while a stage
    runs, so a cancel is seen at the next step boundary."""

    def __init__(self, ctx: StageContext, run_dir: str):
        self.run_dir = run_dir
        self.conn = connect_to_host()
        self.requests: queue.Queue = queue.Queue()
        self.cancel = threading.Event()
        ctx.report = lambda what, done, total: self.send(("progress", what, done, total))
        ctx.cancel_requested = self.cancel.is_set
        threading.Thread(target=self._read, name="host-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "cancel":
                    self.cancel.set()
                else:
                    self.requests.put(message)
        except (EOFError, OSError):
            _host_gone(self.run_dir)

    def next_request(self) -> tuple:
        try:
            request = self.requests.get(timeout=IDLE_PING_S)
        except queue.Empty:
            return ("ping",)
        # A cancel for the previous request that arrived after it ended is stale. The reader sets the flag before
        # it queues the request that follows, so clearing here never loses a cancel meant for this request.
        self.cancel.clear()
        return request

    def send(self, message: tuple) -> None:
        self.conn.send(message)


def join_process_group(device: str, rank: int, world_size: int) -> torch.device:
    """NCCL on GPUs (Comm adds a gloo group for Python objects), gloo on CPU. The rendezvous address comes from
    MASTER_ADDR/MASTER_PORT, chosen by the host."""
    # The ranks share the machine's cores; each using all of them would oversubscribe it (on GPU hosts too: the
    # CPU-side work of a model then slows every rank down).
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    store = _rendezvous_store(rank, world_size)
    if device == "cuda":
        cuda = torch.device("cuda", rank)  # one host: the local rank is the rank
        torch.cuda.set_device(cuda)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=cuda)
        return cuda
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    return torch.device("cpu")


def _rendezvous_store(rank: int, world_size: int) -> dist.TCPStore:
    """The group's TCPStore, served by rank 0 on MASTER_ADDR alone: a store torch starts by itself listens on
    every interface, so rank 0 binds the listening socket and hands it over."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(address, port, world_size, is_master=False)
    listener = socket.create_server((address, port), backlog=world_size)
    store = dist.TCPStore(address, port, world_size, is_master=True, master_listen_fd=listener.fileno())
    listener.detach()  # the store owns the socket now
    return store


def _exit_with_host(host_pid: int, run_dir: str) -> None:
    """atexit does not run when the host is killed, and a worker must not outlive it: watch the parent change."""

    def watch() -> None:
        while os.getppid() == host_pid:
            time.sleep(HOST_CHECK_S)
        _host_gone(run_dir)

    threading.Thread(target=watch, name="host-watch", daemon=True).start()


def _host_gone(run_dir: str) -> None:
    """Nobody is left to serve, nor to read or remove this group's logs."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os._exit(1)


def _report_fatal(run_dir: str, rank: int, exc: BaseException) -> None:
    cause = str(exc) if isinstance(exc, RankFailure) else f"{type(exc).__name__}: {exc}"
    text = f"rank {rank}: {cause}\n{''.join(traceback.format_exception(exc))}"
    sys.stderr.write(text)
    path = error_file(run_dir, rank)
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)  # the host, which may kill this process any moment, never reads half of it
    except OSError:
        pass  # the run folder is gone with the host: nobody is left to tell
