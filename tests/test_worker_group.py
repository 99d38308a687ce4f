"""The worker group serves the LocalRunner API from N processes (CPU, gloo) and survives what a prompt can do to it:
cancels, errors on any rank, a killed worker, the host dying. One group of 2 ranks (CI has 2 cores) serves the
module; the failure tests restart it, which is part of what they show."""
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
import torch

from comfyui_parallel_diffusion.parallel import (Cancelled, Layout, LayoutError, LocalRunner, WorkerError,
                                                 WorkerGroup, get_runner, release)
from comfyui_parallel_diffusion.parallel.channel import HostChannel

TESTS = os.path.dirname(os.path.abspath(__file__))
PLUGIN = {"plugin": "dummy_plugin", "extra_sys_path": [TESTS]}
WORLD = 2


@pytest.fixture(scope="module")
def group():
    group = WorkerGroup(Layout.for_world(WORLD), **PLUGIN)
    group.load("m", "counter", value=5)
    yield group
    group.close()


def ranks_state(group):
    return group.run("state", None, {}, collect="all")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_main_rank_only_stage_runs_once_and_every_rank_gets_its_result(group):
    before = ranks_state(group)
    values = group.run("sample", None, {"n": 8}, collect="all")
    after = ranks_state(group)
    assert len(values) == WORLD
    assert all(torch.equal(v, values[0]) for v in values)  # fresh OS seed: equal only through the broadcast
    assert [a.get("sample_runs", 0) - b.get("sample_runs", 0) for a, b in zip(after, before)] == [1] + [0] * (WORLD - 1)
    assert group.run("sample", None, {"n": 8}).shape == (8,)  # collect="main": rank 0's result alone


def test_tensor_collectives_run_across_the_ranks(group):
    assert group.run("gather_ranks", None, {}).tolist() == [float(r) for r in range(WORLD)]


def request_with_tensors() -> dict:
    return {"latents": torch.randn(1, 4, 6, 5, dtype=torch.bfloat16), "ids": torch.arange(7),
            "mask": torch.tensor([True, False, True]), "scale": torch.tensor(0.5), "none_yet": torch.empty(0, 3),
            "transposed": torch.randn(4, 3).t(), "image": torch.rand(1, 3, 4, 5).permute(0, 2, 3, 1),
            "gappy": torch.randn(4, 6)[:, ::2], "embeds": [torch.randn(3, 2), torch.randn(5, 2)],
            "text": "a cat", "steps": 8, "nothing": None}


def assert_same_request(got: dict, sent: dict) -> None:
    assert got.keys() == sent.keys()
    for key, value in sent.items():
        values, gots = (value, got[key]) if isinstance(value, list) else ([value], [got[key]])
        for v, g in zip(values, gots, strict=True):
            if isinstance(v, torch.Tensor):
                assert g.device.type == "cpu" and g.dtype == v.dtype and torch.equal(g, v), key
                if key != "gappy":  # a tensor with gaps in its storage arrives contiguous; the others as laid out
                    assert g.stride() == v.stride(), key
            else:
                assert g == v, key


def test_every_rank_receives_a_requests_tensors_exactly_as_sent(group):
    sent = request_with_tensors()
    for got in group.run("echo", None, sent, collect="all"):
        assert_same_request(got, sent)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: the same check with NCCL carrying tensors")
def test_every_rank_receives_a_requests_tensors_exactly_as_sent_over_nccl():
    gpu_group = WorkerGroup(Layout.for_world(2), device="cuda", **PLUGIN)
    try:
        sent = request_with_tensors()
        for got in gpu_group.run("echo", None, sent, collect="all"):
            assert_same_request(got, sent)
    finally:
        gpu_group.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pacing waits for CUDA work; on CPU every step is done")
def test_a_step_boundary_keeps_the_host_at_most_steps_ahead_of_the_gpu():
    from comfyui_parallel_diffusion.parallel.comm import Comm
    from comfyui_parallel_diffusion.parallel.stage import STEPS_AHEAD, StageContext

    ctx = StageContext(comm=Comm.single("cuda"))
    finished = []
    for step in range(1, 7):
        torch.cuda._sleep(100_000_000)  # tens of ms of GPU time, queued without waiting
        finished.append(torch.cuda.Event())
        finished[-1].record()
        ctx.step(step, 6)
        assert all(event.query() for event in finished[:step - STEPS_AHEAD])
    assert not finished[-1].query()  # the last steps are still queued: the host did not wait for everything


def test_load_is_idempotent_and_models_stay_resident(group):
    loads = [s.get("loads", 0) for s in ranks_state(group)]
    group.load("m", "counter", value=5)
    assert [s.get("loads", 0) for s in ranks_state(group)] == loads
    group.load("m2", "counter", value=7)
    assert group.run("use_model", "m2", {}, collect="all") == [{"value": 7, "rank": r} for r in range(WORLD)]
    assert group.run("use_model", "m", {})["value"] == 5
    group.unload("m2")
    with pytest.raises(KeyError, match="m2"):
        group.run("use_model", "m2", {})


def test_cancel_stops_every_rank_at_the_same_step_and_the_group_serves_on(group):
    seen = []
    with pytest.raises(Cancelled) as stop:
        group.run("loop", None, {"steps": 500, "sleep": 0.005}, on_progress=lambda what, done, total: seen.append(done),
                  should_cancel=lambda: len(seen) >= 3)
    assert seen[:3] == [1, 2, 3]
    assert 3 <= stop.value.step < 500
    assert [s["loop_at"] for s in ranks_state(group)] == [stop.value.step] * WORLD
    assert group.run("loop", None, {"steps": 2, "sleep": 0.0}) == 2


def test_an_exception_in_on_progress_ends_the_request_on_every_rank_then_propagates(group):
    class Interrupted(Exception):
        pass

    def on_progress(what, done, total):
        if done == 2:
            raise Interrupted  # what ComfyUI's progress bar does when the user presses Cancel

    with pytest.raises(Interrupted):
        group.run("loop", None, {"steps": 500, "sleep": 0.005}, on_progress=on_progress)
    assert len({s["loop_at"] for s in ranks_state(group)}) == 1
    assert group.run("loop", None, {"steps": 2, "sleep": 0.0}) == 2


def test_a_main_rank_error_is_an_ordinary_error_and_keeps_the_group(group):
    pids = [s["pid"] for s in ranks_state(group)]
    with pytest.raises(WorkerError, match="stage fail_main failed on rank 0: RuntimeError: main rank says no") as info:
        group.run("fail_main", None, {})
    assert info.value.rank == 0
    assert [s["pid"] for s in ranks_state(group)] == pids


def test_an_exception_on_rank_1_reaches_the_host_naming_rank_1(group):
    with pytest.raises(WorkerError, match="rank 1: ValueError: boom on rank 1") as info:
        group.run("fail_on", None, {"rank": 1})
    assert info.value.rank == 1
    assert group.run("fail_on", None, {"rank": -1}) == "ok"


def test_a_killed_worker_is_an_error_naming_it_within_seconds_and_the_next_request_restarts_the_group(group):
    pids = [s["pid"] for s in ranks_state(group)]
    start = time.monotonic()
    with pytest.raises(WorkerError, match=f"rank {WORLD - 1} was killed by SIGKILL") as info:
        group.run("die_on", None, {"rank": WORLD - 1, "step": 3})
    assert time.monotonic() - start < 10
    assert info.value.rank == WORLD - 1
    assert all(gone(pid) for pid in pids)  # the whole group went, not just the dead rank
    # A fresh group, with the resident model loaded again from the remembered arguments.
    assert group.run("use_model", "m", {}, collect="all") == [{"value": 5, "rank": r} for r in range(WORLD)]
    assert [s["loads"] for s in ranks_state(group)] == [1] * WORLD


def test_a_worker_that_fails_at_start_is_an_error_not_a_hang():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="failed to start: rank .: ModuleNotFoundError: No module named 'nope'"):
        WorkerGroup(Layout.for_world(2), plugin="nope")
    assert time.monotonic() - start < 30


def test_more_ranks_than_gpus_is_a_layout_error():
    ranks = torch.cuda.device_count() + 1
    with pytest.raises(LayoutError, match=f"{ranks} ranks requested but only {ranks - 1} CUDA GPU"):
        WorkerGroup(Layout.for_world(ranks), device="cuda")


def test_workers_die_with_their_host():
    host = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from comfyui_parallel_diffusion.parallel import Layout, WorkerGroup\n"
         f"g = WorkerGroup(Layout.for_world(2), plugin='dummy_plugin', extra_sys_path=[{TESTS!r}])\n"
         "print(g._channel.directory, *[s['pid'] for s in g.run('state', None, {}, collect='all')], flush=True)\n"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    run_dir, *pids = host.stdout.readline().split()
    pids = [int(pid) for pid in pids]
    assert len(pids) == 2
    host.send_signal(signal.SIGKILL)  # no atexit, no close(): the workers must notice by themselves
    host.wait()
    deadline = time.monotonic() + 5
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(pid) for pid in pids)
    assert not os.path.exists(run_dir)  # nor do their logs and socket outlive it


def test_pool_keeps_one_runner_per_shape_and_frees_the_old_one():
    try:
        local = get_runner(Layout(), plugin="dummy_plugin")
        assert isinstance(local, LocalRunner)
        assert get_runner(Layout(), plugin="dummy_plugin") is local
        pair = get_runner(Layout.for_world(2), **PLUGIN)
        assert isinstance(pair, WorkerGroup)
        assert get_runner(Layout.for_world(2), **PLUGIN) is pair
        pids = [s["pid"] for s in ranks_state(pair)]
        assert isinstance(get_runner(Layout(), plugin="dummy_plugin"), LocalRunner)
        assert all(gone(pid) for pid in pids)
    finally:
        release()


def test_the_control_channel_is_private_and_refuses_a_wrong_key():
    channel = HostChannel()
    try:
        assert stat.S_IMODE(os.stat(channel.directory).st_mode) == 0o700
        refused = []

        def intruder():
            try:
                Client(channel.address, family="AF_UNIX", authkey=os.urandom(32))
            except AuthenticationError:
                refused.append(True)

        thread = threading.Thread(target=intruder)
        thread.start()
        with pytest.raises(AuthenticationError):
            channel.accept(timeout=10)  # before anything the intruder sends could be unpickled
        thread.join()
        assert refused == [True]
    finally:
        channel.close()
    assert not os.path.exists(channel.directory)
