"""A vCPU blocked on a page is woken by whatever places that page, on the real kernel.

A forked "vCPU" registers its own uffd on a shared memfd, hands it over (SCM_RIGHTS), writes its
access-board slot and touches a missing page.  The destination's C core then gets that page on
the *background stream* (placed through its own carrier uffd, which wakes nobody else) and must
wake the vCPU without reading its fault message first (the wake also drops that unread message).
"""

from __future__ import annotations

import os
import select
import socket
import time

import pytest

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.board import AccessBoard, worker_slot
from postcopy_core.content import ContentSpec, Image
from postcopy_core.handler import DEFAULT_POLICY
from postcopy_core.protocol import MSG_PAGES, Geometry, encode_hello, page_header
from tests.conftest import requires_uffd

pytestmark = [pytest.mark.kernel, requires_uffd]
PS = kernel.PAGE_SIZE
NPAGES = 8
GEO = Geometry(PS, NPAGES * PS)
SPEC = ContentSpec(PS, NPAGES, seed=5, zero_permille=0)
PAGE = 3


def _pending(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("pending:"):
                return int(line.split()[1])
    raise AssertionError("no pending: line in the uffd's fdinfo")


def _vcpu(memfd: int, board_fd: int, sock: socket.socket, out_w: int) -> None:
    """The forked vCPU: register, hand over, publish the page, touch it, report the word read."""
    try:
        ram = kernel.mmap_fd(memfd, GEO.ram_size)
        uffd = kernel.Uffd.open(kernel.FEATURE_THREAD_ID | kernel.FEATURE_MISSING_SHMEM)
        uffd.register(ram.addr, GEO.ram_size)
        socket.send_fds(sock, [ram.addr.to_bytes(8, "little")], [uffd.fd])
        uffd.close()
        slot, _keep = worker_slot(board_fd, 1, 0)
        slot[0] = PAGE + 1
        word = ffi.cast("uint64_t *", ram.addr + PAGE * PS)[0]  # blocks until someone wakes us
        os.write(out_w, word.to_bytes(8, "little"))
    finally:
        os._exit(0)


@pytest.fixture
def blocked_vcpu():
    """A forked vCPU blocked on PAGE: (its pid, the uffd, its guest RAM base, memfd, board, result pipe)."""
    memfd = kernel.memfd_create("pch-test-wake")
    os.ftruncate(memfd, GEO.ram_size)
    board = AccessBoard(1)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        a.close()
        _vcpu(memfd, board.fd, b, out_w)
    b.close()
    os.close(out_w)
    data, fds, _, _ = socket.recv_fds(a, 8, 1)
    uffd_fd, base = fds[0], int.from_bytes(data, "little")
    deadline = time.monotonic() + 5
    while _pending(uffd_fd) == 0:  # the vCPU's fault is queued: it sleeps in the kernel
        assert time.monotonic() < deadline, "the vCPU never faulted"
        time.sleep(0.01)
    yield pid, uffd_fd, base, memfd, board, out_r
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    for fd in (uffd_fd, memfd, out_r):
        os.close(fd)
    a.close()
    board.close()


def _dest(memfd: int, uffd_fd: int, base: int, board: AccessBoard | None):
    """A C destination with one vCPU port and its own carrier mapping of the memfd."""
    ram = kernel.mmap_fd(memfd, GEO.ram_size)
    carrier_uffd = kernel.Uffd.open(kernel.FEATURE_MISSING_SHMEM)
    carrier_uffd.register(ram.addr, GEO.ram_size)
    keep = dict(ram=ram, carrier_uffd=carrier_uffd)
    keep["received"] = ffi.new("uint8_t[]", NPAGES)
    keep["ports"] = ffi.new("struct pch_port[]", [dict(fd=uffd_fd, alive=1, vcpu=0, base=base)])
    keep["carrier"] = ffi.new("struct pch_port *", dict(fd=carrier_uffd.fd, alive=1, vcpu=-1, base=ram.addr))
    keep["tids"], keep["tid_vcpu"] = ffi.new("uint32_t[]", 1), ffi.new("int32_t[]", 1)
    d = lib.pch_dest_new(PS, NPAGES, keep["received"], keep["ports"], 1, keep["carrier"], keep["tids"],
                         keep["tid_vcpu"], 0, 0, 0, 0, b"pc.ram", board.slots if board else ffi.NULL,
                         1 if board else 0, DEFAULT_POLICY.to_c())
    return ffi.gc(d, lib.pch_dest_free), keep


def _stream_page(d) -> None:
    """HELLO, then PAGE as a background (not urgent) PAGES frame."""
    img = Image(SPEC)
    frame = encode_hello(GEO) + page_header(MSG_PAGES, PAGE * PS, 1, PS) + img.mapping.buffer(PAGE * PS, PS)
    assert lib.pch_dest_on_data(d, ffi.from_buffer(frame), len(frame), 0) == len(frame)
    img.close()


def _word_read(out_r: int, timeout: float) -> bytes | None:
    return os.read(out_r, 8) if select.select([out_r], [], [], timeout)[0] else None


def test_stream_placed_page_wakes_a_vcpu_whose_fault_was_never_read(blocked_vcpu):
    pid, uffd_fd, base, memfd, board, out_r = blocked_vcpu
    d, keep = _dest(memfd, uffd_fd, base, board)
    _stream_page(d)
    got = _word_read(out_r, 5.0)
    assert got is not None, "the vCPU still sleeps on a page that is in"
    want = ffi.cast("uint64_t *", keep["ram"].addr + PAGE * PS)[0]
    assert int.from_bytes(got, "little") == want
    assert lib.pch_dest_stats(d).board_wakes == 1
    assert lib.pch_dest_stats(d).faults == 0, "woken without the handler reading its fault message"
    assert _pending(uffd_fd) == 0  # a wake also takes the unread message off the uffd's queue


def test_without_the_board_the_vcpu_sleeps_until_its_fault_is_read(blocked_vcpu):
    """The kernel fact the board exists for: a copy through another uffd wakes nobody here."""
    pid, uffd_fd, base, memfd, board, out_r = blocked_vcpu
    d, keep = _dest(memfd, uffd_fd, base, None)
    _stream_page(d)
    assert _word_read(out_r, 0.5) is None
    assert lib.pch_dest_on_uffd(d, 0) == 1  # reading the fault: already received, so a wake
    assert _word_read(out_r, 5.0) is not None
