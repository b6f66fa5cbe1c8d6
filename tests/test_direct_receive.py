"""``--place continue`` receives a big frame straight into the page cache, over several loop turns.
A page of that frame answered urgently in between is placed, CONTINUEd to its vCPU and may be
written at once: the rest of the frame's receive must leave it alone, or the source's bytes land on
the guest's store (a lost write nothing else would notice).

Driven here step by step through the C loop (``pch_dest_run``) over real socket pairs and a real
memfd, so the interleaving is certain: header and first page of a 16-page frame, then an urgent
answer for page 10, then a "vCPU" store into page 10 through a mapping of its own, then the rest of
the frame.  Before the fix this test failed: page 10 held the source's bytes again.
"""

from __future__ import annotations

import os
import select
import socket

import pytest

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.handler import DEFAULT_POLICY, DestPolicy
from postcopy_core.protocol import MSG_ZERO, page_header
from tests.conftest import requires_uffd
from tests.test_dest_c import GEO, HELLO, IMG, NPAGES, PS, pages_frame

pytestmark = [pytest.mark.kernel, requires_uffd]
MARK = b"guest store!"


class ContinueDest:
    """A worker-less destination in --place continue: pages written through its own mapping."""

    def __init__(self, policy: DestPolicy = DEFAULT_POLICY) -> None:
        self.fd = kernel.memfd_create("pch-test-direct")
        os.ftruncate(self.fd, GEO.ram_size)
        self.ram = kernel.mmap_fd(self.fd, GEO.ram_size)  # the handler's unregistered mapping
        self.guest = kernel.mmap_fd(self.fd, GEO.ram_size)  # what a vCPU sees once a page is CONTINUEd
        kernel.populate_write(self.ram)
        self.uffd = kernel.Uffd.open(kernel.FEATURE_MISSING_SHMEM)
        self.received = ffi.new("uint8_t[]", NPAGES)
        self.carrier = ffi.new("struct pch_port *", dict(fd=self.uffd.fd, alive=1, vcpu=-1, base=self.ram.addr))
        self.ports = ffi.new("struct pch_port[]", 1)
        self.tids, self.tid_vcpu = ffi.new("uint32_t[]", 1), ffi.new("int32_t[]", 1)
        self.d = lib.pch_dest_new(PS, NPAGES, self.received, self.ports, 0, self.carrier, self.tids, self.tid_vcpu,
                                  0, 0, 0, 0, b"pc.ram", ffi.NULL, 0, policy.to_c())
        lib.pch_dest_set_continue(self.d, self.ram.addr)
        self.stream, self.stream_src = socket.socketpair()
        self.urgent, self.urgent_src = socket.socketpair()
        for s in (self.stream, self.urgent):
            s.setblocking(False)
        for s in (self.stream, self.stream_src):  # small buffers: the frame cannot cross in one piece
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.quit = kernel.eventfd(0)
        self.ep, self.pri = select.epoll(), select.epoll()
        self.pri.register(self.urgent.fileno(), select.EPOLLIN)
        for fd in (self.stream.fileno(), self.urgent.fileno(), self.quit):
            self.ep.register(fd, select.EPOLLIN)
        self.port_of_fd = ffi.new("int32_t[]", [-1] * 4096)
        self.loop = ffi.new("struct pch_dest_loop *", dict(
            epfd=self.ep.fileno(), pri_epfd=self.pri.fileno(), quit_fd=self.quit, stream_fd=self.stream.fileno(),
            urgent_fd=self.urgent.fileno(), port_of_fd=self.port_of_fd, nfds=4096))

    def turn(self, ms: int = 20) -> None:
        rc = lib.pch_dest_run(self.d, self.loop, ms)
        assert rc >= 0, ffi.string(lib.pch_dest_error(self.d)).decode()

    def close(self) -> None:
        lib.pch_dest_free(self.d)
        for s in (self.stream, self.stream_src, self.urgent, self.urgent_src):
            s.close()
        self.ep.close()
        self.pri.close()
        os.close(self.quit)
        self.uffd.close()
        self.ram.close()
        self.guest.close()
        os.close(self.fd)


@pytest.fixture
def dest():
    d = ContinueDest()
    yield d
    d.close()


def test_the_rest_of_a_frame_received_into_place_skips_a_page_placed_meanwhile(dest):
    frame = pages_frame(0, NPAGES)  # 16 pages: 64 KiB, a frame that is received into place
    assert len(frame) - 16 >= 64 << 10
    dest.stream_src.sendall(HELLO)
    dest.urgent_src.sendall(HELLO)
    head = 16 + PS  # the header and page 0
    dest.stream_src.sendall(frame[:head])
    dest.turn()
    assert not dest.received[0]  # the frame is not complete: nothing of it is placed yet
    dest.urgent_src.sendall(pages_frame(10, 1, urgent=True))  # a vCPU faulted on page 10: its answer
    dest.turn()
    assert dest.received[10]
    dest.guest.buffer(10 * PS, len(MARK))[:] = MARK  # the vCPU writes it at once
    dest.stream_src.setblocking(False)
    rest = memoryview(frame)[head:]
    while rest:  # the rest of the frame, as fast as the small buffers let it through
        try:
            rest = rest[dest.stream_src.send(rest):]
        except BlockingIOError:
            pass
        dest.turn(5)
    dest.turn()
    assert all(dest.received[p] for p in range(NPAGES))
    assert bytes(dest.guest.buffer(10 * PS, len(MARK))) == MARK, "the frame's receive overwrote a placed page"
    for p in set(range(NPAGES)) - {10}:
        assert bytes(dest.guest.buffer(p * PS, PS)) == bytes(IMG.page(p))
    stats = lib.pch_dest_stats(dest.d)
    assert stats.direct_skipped == 1 and stats.duplicates == 1


def test_the_policy_reaches_the_loop():
    """direct_min above the frame's size: the same frame goes through the receive buffer instead,
    and page 10, in already, is a duplicate there (nothing received into place skips it)."""
    d = ContinueDest(DestPolicy(direct_min=1 << 20))
    try:
        d.stream_src.sendall(HELLO)
        d.urgent_src.sendall(HELLO + pages_frame(10, 1, urgent=True))
        d.turn()
        assert d.received[10]
        d.guest.buffer(10 * PS, len(MARK))[:] = MARK
        d.stream_src.setblocking(False)
        rest = memoryview(pages_frame(0, NPAGES))
        while rest:
            try:
                rest = rest[d.stream_src.send(rest):]
            except BlockingIOError:
                pass
            d.turn(5)
        d.turn()
        assert all(d.received[p] for p in range(NPAGES))
        assert bytes(d.guest.buffer(10 * PS, len(MARK))) == MARK
        stats = lib.pch_dest_stats(d.d)
        assert stats.direct_skipped == 0 and stats.duplicates == 1
    finally:
        d.close()


def test_frames_held_between_turns_are_all_placed(dest):
    """The loop takes one stream frame per turn and serves the faults between: frames that came in
    one read wait in the buffer (held) and are placed in the turns that follow, none lost."""
    dest.urgent_src.sendall(HELLO)
    zeros = b"".join(page_header(MSG_ZERO, p * PS, 1, PS) for p in range(NPAGES))  # 16 bytes each: one read
    dest.stream_src.sendall(HELLO + zeros)
    dest.turn()
    assert all(dest.received[p] for p in range(NPAGES))
    stats = lib.pch_dest_stats(dest.d)
    assert stats.frames == NPAGES + 2 and stats.placed_zero == NPAGES


@pytest.mark.parametrize("bad", [dict(rx_turn=0), dict(urgent_turns=0), dict(board_scan_slots=0),
                                 dict(spin_ns=-1), dict(rx_turn=1 << 30)])
def test_a_bad_policy_is_refused_in_one_line(bad):
    with pytest.raises(ValueError) as e:
        DestPolicy(**bad)
    assert "\n" not in str(e.value) and next(iter(bad)) in str(e.value)
