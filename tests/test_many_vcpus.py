"""Many vCPUs: workers forked and run in C (csrc/worker.c), each started once and reaped once, none
left after Ctrl-C; small idle workers; the access board scanned per batch still wakes every vCPU."""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest

from harness.config import RunConfig
from harness.report import build_report
from harness.run import execute
from postcopy_core import handoff, kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.board import AccessBoard, worker_slot
from postcopy_core.content import ContentSpec
from postcopy_core.handler import DEFAULT_POLICY
from tests.conftest import requires_uffd
from tests.test_teardown import SLOW_RUN, assert_clean, finish, start_cli, wait_for_children
from tests.test_wake import GEO, PAGE, PS, _dest, _pending, _stream_page, _word_read
from vcpu_workers import results as R
from vcpu_workers.worker import WorkerPlan, c_plan

pytestmark = [pytest.mark.kernel, requires_uffd]


def test_64_vcpus_each_started_once_small_and_verified(clean_machine):
    cfg = RunConfig(vcpus=64, ram=8 << 20, workload="sequential", background=False).validate()
    raw = execute(cfg)
    rep = build_report(cfg, raw, None)
    assert rep["status"] == "completed" and rep["verification"]["mismatches"] == 0
    assert rep["verification"]["ram-pages-verified"] == cfg.npages
    pids = [int(p) for p in raw["summary"]["pid"]]
    assert len(set(pids)) == 64 and all(p > 0 for p in pids)  # every worker once, each its own process
    assert list(raw["summary"]["vcpu"]) == list(range(64))
    assert (raw["summary"]["state"] == R.STATE_DONE).all()
    assert (raw["summary"]["t_forked"] <= raw["summary"]["t_ready"]).all()
    assert rep["workers"]["startup-s"] > 0
    # a worker that never returns to Python copies almost nothing of the zygote (a Python worker
    # dirtied ~1.4 MiB of it); what is left is its stack and its own small buffers
    assert 0 < max(rep["workers"]["uss-bytes"]) < 512 << 10, rep["workers"]["uss-bytes"]


def test_ctrl_c_with_64_c_workers_leaves_nothing():
    proc = start_cli([*SLOW_RUN[:2], "64", *SLOW_RUN[3:]])
    kids = wait_for_children(proc, "pch-vcpu-", 64)
    assert len({k.pid for k in kids}) == 64
    os.killpg(proc.pid, signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err
    assert_clean()


def test_c_workers_that_cannot_hand_off_fail_in_one_line_and_are_reaped_once(capfd):
    """Nobody listens on the hand-off address: each worker says so on stderr and exits 5."""
    n = 4
    spec = ContentSpec(PS, 16, seed=3)
    memfd = kernel.memfd_create("pch-test-spawn")
    os.ftruncate(memfd, spec.size)
    area, board = R.ResultsArea(n, 16), AccessBoard(n)
    start_r, start_w = os.pipe()
    plan = WorkerPlan(n, memfd, False, spec, "sequential", 0.0, handoff.abstract_address("nobody"), start_r,
                      area.fd, area.capacity, board.fd)
    c, _keep = c_plan(plan)
    pids, err = ffi.new("int32_t[]", n), ffi.new("int *")
    try:
        assert lib.pch_spawn_workers(c, 0, n, pids, err) == n
        statuses = {}
        deadline = time.monotonic() + 30
        while len(statuses) < n and time.monotonic() < deadline:
            pid, status = os.waitpid(-1, 0)
            assert pid not in statuses
            statuses[pid] = status
        assert sorted(statuses) == sorted(int(p) for p in pids)
        assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == lib.PCH_WORKER_FAILED for s in statuses.values())
        with pytest.raises(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)  # none left
        lines = capfd.readouterr().err.splitlines()
        for v in range(n):
            assert any(ln.startswith(f"vcpu {v}: KernelError: connect(hand-off socket) failed: ECONNREFUSED")
                       for ln in lines), lines
    finally:
        for fd in (memfd, start_r, start_w):
            os.close(fd)
        area.close()
        board.close()


NBOARD, VCPU = 256, 200  # a board big enough that placements are scanned in batches of 4


def test_a_batch_that_never_fills_still_wakes_its_vcpu():
    """One streamed page, fewer than a batch: the scan at the end of the receive wakes the vCPU."""
    memfd = kernel.memfd_create("pch-test-board-batch")
    os.ftruncate(memfd, GEO.ram_size)
    board = AccessBoard(NBOARD)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            ram = kernel.mmap_fd(memfd, GEO.ram_size)
            uffd = kernel.Uffd.open(kernel.FEATURE_THREAD_ID | kernel.FEATURE_MISSING_SHMEM)
            uffd.register(ram.addr, GEO.ram_size)
            socket.send_fds(b, [ram.addr.to_bytes(8, "little")], [uffd.fd])
            uffd.close()
            slot, _m = worker_slot(board.fd, NBOARD, VCPU)
            slot[0] = PAGE + 1
            word = ffi.cast("uint64_t *", ram.addr + PAGE * PS)[0]
            os.write(out_w, word.to_bytes(8, "little"))
        finally:
            os._exit(0)
    b.close()
    os.close(out_w)
    try:
        data, fds, _, _ = socket.recv_fds(a, 8, 1)
        uffd_fd, base = fds[0], int.from_bytes(data, "little")
        deadline = time.monotonic() + 5
        while _pending(uffd_fd) == 0:
            assert time.monotonic() < deadline, "the vCPU never faulted"
            time.sleep(0.01)
        d, keep = _dest(memfd, uffd_fd, base, None)
        keep["ports"][0].vcpu = VCPU
        d = lib.pch_dest_new(PS, GEO.npages, keep["received"], keep["ports"], 1, keep["carrier"], keep["tids"],
                             keep["tid_vcpu"], 0, 0, 0, 0, b"pc.ram", board.slots, NBOARD, DEFAULT_POLICY.to_c())
        d = ffi.gc(d, lib.pch_dest_free)
        _stream_page(d)
        assert _word_read(out_r, 5.0) is not None, "the vCPU still sleeps on a page that is in"
        assert lib.pch_dest_stats(d).board_wakes == 1
        os.close(uffd_fd)
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        for fd in (memfd, out_r):
            os.close(fd)
        a.close()
        board.close()
    assert not [c for c in psutil.Process().children() if c.pid == pid]
