"""A worker group never hangs and never listens beyond this host: a rank failing alone inside a tensor-parallel
stage, a rank stuck forever, Cancel and release() while a request is stuck, out-of-memory errors, where a failed
group's logs are kept, and which addresses the workers listen on. CPU ranks on gloo, with the test plugin."""
import ipaddress
import os
import re
import tempfile
import threading
import time

import pytest

from test_worker_group import gone  # noqa: E402

from comfyui_parallel_diffusion.parallel import Cancelled, Layout, WorkerError, WorkerGroup, get_runner, release

TESTS = os.path.dirname(os.path.abspath(__file__))
PLUGIN = {"plugin": "dummy_plugin", "extra_sys_path": [TESTS]}
FAILURE_BOUND_S = 10.0  # what the issue asks of any failure on any rank
STALL_S = 4.0  # the tests' own no-progress bound: above executor.AGREE_TIMEOUT_S, small enough to cost a few seconds


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def group(request, tmp_path_factory):
    group = WorkerGroup(Layout.for_world(request.param), log_dir=str(tmp_path_factory.mktemp("kept_logs")),
                        stall_timeout_s=STALL_S, cancel_timeout_s=1.0, **PLUGIN)
    yield group
    group.close()


def pids(group) -> list[int]:
    return [s["pid"] for s in group.run("state", None, {}, collect="all")]




def assert_fresh_group_serves(group, before: list[int]) -> None:
    after = pids(group)
    assert len(after) == group.layout.world_size and not set(after) & set(before)
    assert all(gone(pid) for pid in before)


def kept_logs(error: WorkerError) -> str:
    found = re.search(r"^worker logs: (.+)$", str(error), re.M)
    assert found, str(error)
    return found.group(1)


def test_a_rank_failing_alone_inside_a_tensor_parallel_stage_is_an_error_naming_it_within_the_bound(group):
    before = pids(group)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1: RuntimeError: boom in step on rank 1 \(stage fail_in_step\)") \
            as info:
        group.run("fail_in_step", None, {"rank": 1})
    assert time.monotonic() - start < FAILURE_BOUND_S
    assert info.value.rank == 1
    assert_fresh_group_serves(group, before)


def test_an_error_every_rank_raises_alike_in_a_tensor_parallel_stage_keeps_the_group(group):
    before = pids(group)
    with pytest.raises(WorkerError, match="stage refuse_in_step failed on rank 0: ValueError: refused on every rank"):
        group.run("refuse_in_step", None, {})
    assert pids(group) == before


def test_a_rank_stuck_forever_ends_the_group_after_the_stall_bound_naming_where_each_rank_was(group):
    before = pids(group)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=f"no progress in stage hang_on for {STALL_S:g} s") as info:
        group.run("hang_on", None, {"rank": 1})
    took = time.monotonic() - start
    assert STALL_S <= took < STALL_S + 5
    message = str(info.value)
    assert re.search(r"rank 1 in hang_on \(dummy_plugin\.py line \d+\)", message), message
    assert re.search(r"rank 0 in all_gather \(comm\.py line \d+\)", message), message  # waiting for rank 1
    with open(os.path.join(kept_logs(info.value), "rank1.log")) as f:
        assert "in hang_on" in f.read()  # the whole stack dump is kept
    assert_fresh_group_serves(group, before)


def test_cancel_ends_a_stuck_request_and_the_next_one_runs_on_a_fresh_group(group):
    before = pids(group)
    start = time.monotonic()
    with pytest.raises(Cancelled):
        group.run("hang_on", None, {"rank": 1}, should_cancel=lambda: time.monotonic() - start > 0.2)
    assert time.monotonic() - start < 0.2 + group.cancel_timeout_s + 4
    assert_fresh_group_serves(group, before)


def test_release_from_another_thread_ends_a_stuck_request_at_once():
    runner = get_runner(Layout.for_world(2), **PLUGIN)
    try:
        before = pids(runner)
        timer = threading.Timer(0.5, release)  # what ComfyUI's /free does, from wherever it is called
        timer.start()
        start = time.monotonic()
        with pytest.raises(WorkerError, match="the worker group was stopped while this request ran"):
            runner.run("hang_on", None, {"rank": 1})
        assert time.monotonic() - start < 0.5 + 3
        timer.join()
        assert all(gone(pid) for pid in before)
        fresh = get_runner(Layout.for_world(2), **PLUGIN)
        assert fresh is not runner
        assert_fresh_group_serves(fresh, before)
    finally:
        release()


@pytest.fixture(scope="module")
def cfg_group(tmp_path_factory):
    group = WorkerGroup(Layout.for_world(2, cfg=2), log_dir=str(tmp_path_factory.mktemp("kept_logs")), **PLUGIN)
    yield group
    group.close()


def test_out_of_memory_on_a_rank_says_where_for_what_and_what_may_fit_and_a_smaller_request_then_runs(cfg_group):
    request = {"rank": 1, "width": 2048, "height": 2048, "pixels": 1024 * 1024}
    with pytest.raises(WorkerError) as info:
        cfg_group.run("out_of_memory_above", None, request)
    first = str(info.value).splitlines()[0]
    assert first == ("the worker group failed: rank 1: OutOfMemoryError on cpu, 2 rank(s): cfg 2 x ulysses 1, "
                     "request 2048x2048: CUDA out of memory. Tried to allocate 16 GiB. What may fit: a smaller size "
                     "or batch, or cfg_parallel off (each image's tokens are then split over all the GPUs, not half) "
                     "(stage out_of_memory_above)")
    assert info.value.rank == 1
    assert cfg_group.run("out_of_memory_above", None, {**request, "width": 1024, "height": 1024}) == 1024 * 1024


def test_out_of_memory_on_rank_0_alone_keeps_the_group(cfg_group):
    before = pids(cfg_group)
    request = {"rank": 0, "width": 1024, "height": 2048, "pixels": 1024 * 1024}
    with pytest.raises(WorkerError, match=r"stage out_of_memory_above_on_rank_0 failed on rank 0: OutOfMemoryError on "
                                          r"cpu, .*request 1024x2048: .* What may fit: a smaller size"):
        cfg_group.run("out_of_memory_above_on_rank_0", None, request)
    assert cfg_group.run("out_of_memory_above_on_rank_0", None, {**request, "height": 512}) == 1024 * 512
    assert pids(cfg_group) == before


def test_a_failed_groups_logs_are_kept_where_asked_and_the_error_says_where(tmp_path):
    group = WorkerGroup(Layout.for_world(2), log_dir=str(tmp_path / "logs"), **PLUGIN)
    try:
        run_dir = group._channel.directory
        with pytest.raises(WorkerError, match="rank 1: ValueError: boom on rank 1") as info:
            group.run("fail_on", None, {"rank": 1})
        kept = kept_logs(info.value)
        assert os.path.dirname(kept) == str(tmp_path / "logs")
        assert sorted(os.listdir(kept)) == ["rank0.log", "rank1.log"]
        with open(os.path.join(kept, "rank1.log")) as f:
            assert "ValueError: boom on rank 1" in f.read()  # the traceback, in the log itself
        assert not os.path.exists(run_dir)  # the private run folder still goes with its group
        group.run("state", None, {})
    finally:
        group.close()
    assert os.listdir(tmp_path / "logs") == [os.path.basename(kept)]  # a clean stop keeps nothing


def test_without_a_log_dir_a_failed_groups_logs_go_to_the_temporary_directory():
    group = WorkerGroup(Layout.for_world(2), **PLUGIN)
    try:
        with pytest.raises(WorkerError) as info:
            group.run("fail_on", None, {"rank": 0})
        kept = kept_logs(info.value)
        assert os.path.dirname(kept) == tempfile.gettempdir() and os.path.isfile(os.path.join(kept, "rank0.log"))
    finally:
        group.close()


def listening_addresses(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold: /proc/<pid>/fd names each socket's
    inode, /proc/net/tcp and tcp6 list the sockets by inode."""
    owner = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                owner[target[len("socket:["):-1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in owner:  # 0A: LISTEN
                    address, port = local.split(":")
                    raw = bytes.fromhex(address)  # each 32-bit word in the kernel's (little-endian) order
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    found.append((owner[inode], str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_the_workers_listen_on_loopback_only(monkeypatch):
    # An interface a user may have named for gloo: the group must not follow it (nor the hostname's address).
    others = sorted(name for name in os.listdir("/sys/class/net") if name != "lo")
    if others:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", others[0])
        monkeypatch.setenv("NCCL_SOCKET_IFNAME", others[0])
    group = WorkerGroup(Layout.for_world(2), **PLUGIN)
    try:
        workers = pids(group)
        assert group.run("gather_ranks", None, {}).tolist() == [0.0, 1.0]  # gloo's pairs are connected by now
        found = listening_addresses(workers)
        assert {pid for pid, _, _ in found} == set(workers)  # the store on rank 0, gloo's pairs on each
        assert all(is_loopback(address) for _, address, _ in found), found
    finally:
        group.close()
