"""The destination's C core on the real kernel: frame parsing, placement, the received map, events.

A destination with no workers (only its carrier uffd over a small shmem memfd) is fed page-stream
bytes directly; what lands in guest RAM, the received map, the stats and the error text are checked,
and a structured fuzz holds the C decoder to the verdicts of the Python reference (FrameReader).
"""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.content import ContentSpec, Image
from postcopy_core.handler import DEFAULT_POLICY, EVENT
from postcopy_core.protocol import DISCARD_RANGE as RANGE
from postcopy_core.protocol import (
    HDR,
    MSG_DISCARD,
    MSG_EOS,
    MSG_PAGES,
    MSG_POSTCOPY_START,
    MSG_ZERO,
    Geometry,
    ProtocolError,
    encode_hello,
    page_header,
)
from tests.conftest import requires_uffd
from tests.frame_reader import FrameReader

pytestmark = [pytest.mark.kernel, requires_uffd]
PS = kernel.PAGE_SIZE
NPAGES = 16
GEO = Geometry(PS, NPAGES * PS)
SPEC = ContentSpec(PS, NPAGES, seed=21, zero_permille=0)
IMG = Image(SPEC)


class CDest:
    """A worker-less destination: carrier uffd over a fresh memfd."""

    def __init__(self) -> None:
        self.fd = kernel.memfd_create("pch-test-dest")
        os.ftruncate(self.fd, GEO.ram_size)
        self.ram = kernel.mmap_fd(self.fd, GEO.ram_size)
        self.uffd = kernel.Uffd.open(kernel.FEATURE_MISSING_SHMEM)
        self.uffd.register(self.ram.addr, GEO.ram_size)
        self.received = ffi.new("uint8_t[]", NPAGES)
        self.carrier = ffi.new("struct pch_port *", dict(fd=self.uffd.fd, alive=1, vcpu=-1, base=self.ram.addr))
        self.ports = ffi.new("struct pch_port[]", 1)
        self.tids = ffi.new("uint32_t[]", 1)
        self.tid_vcpu = ffi.new("int32_t[]", 1)
        self.d = lib.pch_dest_new(PS, NPAGES, self.received, self.ports, 0, self.carrier, self.tids, self.tid_vcpu, 0,
                                  0, 0, 0, b"pc.ram", ffi.NULL, 0, DEFAULT_POLICY.to_c())

    def feed(self, data: bytes, channel: int = 0) -> int:
        buf = ffi.from_buffer(data)
        return lib.pch_dest_on_data(self.d, buf, len(data), channel)

    @property
    def error(self) -> str:
        return ffi.string(lib.pch_dest_error(self.d)).decode()

    @property
    def stats(self):
        return lib.pch_dest_stats(self.d)

    def events(self) -> list[tuple]:
        n = ffi.new("uint64_t *")
        ptr = lib.pch_dest_events(self.d, n)
        return list(EVENT.iter_unpack(bytes(ffi.buffer(ptr, n[0]))))

    def close(self) -> None:
        lib.pch_dest_free(self.d)
        self.uffd.close()
        self.ram.close()
        os.close(self.fd)


@pytest.fixture
def dest():
    d = CDest()
    yield d
    d.close()


def pages_frame(first: int, count: int, urgent: bool = False) -> bytes:
    return page_header(MSG_PAGES, first * PS, count, PS, urgent) + bytes(IMG.mapping.buffer(first * PS, count * PS))


HELLO = encode_hello(GEO)


def test_pages_and_zero_pages_are_placed_recorded_and_counted(dest):
    data = HELLO + pages_frame(2, 3) + page_header(MSG_ZERO, 8 * PS, 2, PS, urgent=True) + pages_frame(3, 1)
    assert dest.feed(data) == len(data)
    assert list(dest.received) == [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert bytes(dest.ram.buffer(2 * PS, 3 * PS)) == bytes(IMG.mapping.buffer(2 * PS, 3 * PS))
    assert bytes(dest.ram.buffer(8 * PS, 2 * PS)) == bytes(2 * PS)
    st_ = dest.stats
    assert (st_.placed, st_.placed_background, st_.placed_urgent, st_.placed_zero) == (5, 3, 2, 2)
    assert st_.duplicates == 1  # page 3 came twice; the second copy was dropped, not re-placed
    placed = [(addr // PS, flag) for _, addr, vcpu, _, kind, flag in dest.events() if kind == ord("P")]
    assert placed == [(2, 0), (3, 0), (4, 0), (8, 1), (9, 1)]


def test_a_partial_frame_is_left_for_the_next_read(dest):
    frame = pages_frame(5, 1)
    assert dest.feed(HELLO + frame[:100]) == len(HELLO)
    assert dest.received[5] == 0
    assert dest.feed(frame) == len(frame)
    assert dest.received[5] == 1


def test_a_page_already_in_inside_a_run_leaves_the_rest_copied(dest):
    """EEXIST stops the kernel inside a multi-page copy: every other page must still be copied."""
    dest.uffd.copy(dest.ram.addr + 5 * PS, IMG.mapping.pointer(5 * PS), PS)  # in the page cache behind our back
    data = HELLO + pages_frame(3, 6)
    assert dest.feed(data) == len(data)
    assert [dest.received[p] for p in range(3, 9)] == [1] * 6
    assert dest.stats.copy_eexist == 1
    # read through a second, unregistered mapping: a page never copied would read as zeros there
    view = kernel.mmap_fd(dest.fd, GEO.ram_size)
    try:
        assert bytes(view.buffer(3 * PS, 6 * PS)) == bytes(IMG.mapping.buffer(3 * PS, 6 * PS))
    finally:
        view.close()


def test_eos_is_noted(dest):
    assert dest.feed(HELLO + HDR.pack(MSG_EOS, 0, 0, 0, 0)) == len(HELLO) + HDR.size
    assert dest.stats.eos == 1


@pytest.mark.parametrize("data, words", [
    (pages_frame(0, 1), "PAGES: received before HELLO"),
    (HELLO + HELLO, "HELLO: sent twice"),
    (HELLO + HDR.pack(9, 0, 1, 0, 0), "unknown message type 9"),
    (HELLO + HDR.pack(MSG_ZERO, 4, 1, 0, 0), "ZERO: unknown flags 0x4"),
    (HELLO + HDR.pack(MSG_ZERO, 0, 0, 0, 0), "ZERO: zero pages"),
    (HELLO + HDR.pack(MSG_ZERO, 0, 1, 8, 0), "ZERO: payload length 8, expected 0"),
    (HELLO + HDR.pack(MSG_PAGES, 0, 1, PS - 1, 0), f"PAGES: payload length {PS - 1}, expected {PS}"),
    (HELLO + HDR.pack(MSG_ZERO, 0, 1, 0, 100), "outside guest RAM"),
    (HELLO + HDR.pack(MSG_ZERO, 0, 2, 0, (NPAGES - 1) * PS), "outside guest RAM"),
    (HELLO + HDR.pack(MSG_EOS, 0, 1, 0, 0), "EOS: must carry no pages"),
    (encode_hello(Geometry(PS, 2 * NPAGES * PS)), "HELLO: source RAM is"),
    (encode_hello(Geometry(PS, NPAGES * PS, "pc.rom")), "HELLO: unknown RAM block id"),
    (HELLO[:16] + b"XXXX" + HELLO[20:], "HELLO: bad magic"),
    (HELLO[:20] + b"\x00\x07" + HELLO[22:], "HELLO: protocol version 7"),
    (HELLO + HDR.pack(MSG_EOS, 0, 0, 0, 0) + HDR.pack(MSG_ZERO, 0, 1, 0, 0), "ZERO: received after EOS"),
    # an impossible length is refused once the header is in, not waited for
    (HDR.pack(1, 0, 0, 1 << 30, 0), "HELLO: payload length 1073741824 out of range"),
])
def test_bad_frames_are_refused_with_one_line(dest, data, words):
    assert dest.feed(data) < 0
    assert words in dest.error and "\n" not in dest.error


# ---------------------------------------------------------------- differential fuzz


frame = st.tuples(
    st.sampled_from([MSG_PAGES, MSG_ZERO, MSG_EOS, MSG_DISCARD, MSG_POSTCOPY_START, 1, 0, 7]),  # 1: a second HELLO
    st.sampled_from([0, 1, 2]),  # flags
    st.integers(0, 3),  # count
    st.sampled_from(["right", "wrong", "huge"]),  # payload length ("huge": only the header is sent)
    st.one_of(st.integers(0, NPAGES + 1).map(lambda p: p * PS), st.integers(0, NPAGES * PS)),  # offset
)


def encode(t, flags, count, plen_kind, off) -> bytes:
    if plen_kind == "huge":
        return HDR.pack(t, flags, count, 1 << 31, off)
    plen = count * PS if t == MSG_PAGES else 0
    payload = bytes(plen)
    if t == MSG_DISCARD:  # ranges of one page from `off` on (some past the end of RAM), offset 0 mostly
        payload = b"".join(RANGE.pack(off + i * PS, PS) for i in range(count))
        plen, off = len(payload), 0 if off % 3 else off
    if plen_kind == "wrong":
        plen += 8
        payload += bytes(8)
    return HDR.pack(t, flags, count, plen, off) + payload


def c_feed_split(d: CDest, data: bytes, cuts: list[int], channel: int = 0) -> str:
    """Feed the C decoder in pieces cut at ``cuts``, keeping what it leaves (as its receive loop
    does): "ok" when it took everything, "error" at its first error, "incomplete" when it still
    waits for more bytes (an impossible length must be an error, never a wait)."""
    pending = b""
    for a, b in zip([0] + cuts, cuts + [len(data)], strict=True):
        pending += data[a:b]
        used = d.feed(pending, channel)
        if used < 0:
            return "error"
        pending = pending[used:]
    return "incomplete" if pending else "ok"


def python_verdict(data: bytes, precopy: bool = False, urgent: bool = False) -> tuple[str, set[int]]:
    """("ok" | "error" | "incomplete", pages the frames leave placed) according to the reference decoder
    (``precopy``: a destination that starts in precopy; ``urgent``: fed on the urgent channel)."""
    a, b = socket.socketpair()
    pages: set[int] = set()
    try:
        a.sendall(data)
        a.close()
        r = FrameReader(1 << 20, precopy=precopy, urgent=urgent)
        b.setblocking(False)
        while True:
            n = r.recv_from(b)
            for f in r.frames():
                if f.mtype in (MSG_PAGES, MSG_ZERO):
                    pages |= set(range(f.offset // PS, f.offset // PS + f.count))
                for off, length in f.ranges:  # DISCARD
                    pages -= set(range(off // PS, (off + length) // PS))
            if n == 0:
                return ("ok" if r.start == r.end else "incomplete"), pages
    except ProtocolError:
        return "error", pages
    finally:
        b.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(frame, min_size=1, max_size=6), st.data(), st.booleans())
def test_c_decoder_agrees_with_the_reference(frames, draw, precopy):
    data = HELLO + b"".join(encode(*f) for f in frames)
    cuts = sorted(draw.draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=6)))
    ok_py, pages = python_verdict(data, precopy)
    d = CDest()
    if precopy:
        lib.pch_dest_set_precopy(d.d, d.fd)
    try:
        ok_c = c_feed_split(d, data, cuts)
        assert ok_c == ok_py, (ok_c, ok_py, d.error)
        if ok_c == "ok":
            assert {p for p in range(NPAGES) if d.received[p]} == pages
    finally:
        d.close()


def test_c_decoder_agrees_with_the_reference_on_ten_thousand_frames():
    """The differential fuzz at scale: 2,500 random streams of 4 frames (10,000 frames), each cut at
    random boundaries and fed to one destination on the stream or the urgent channel at random (each
    channel has its own HELLO and decoder state, as in a run)."""
    import random

    rng = random.Random(20261203)
    kinds, flags = [MSG_PAGES, MSG_ZERO, MSG_EOS, MSG_DISCARD, MSG_POSTCOPY_START, 1, 0, 7], [0, 0, 0, 1, 2]
    plens = ["right"] * 6 + ["wrong", "huge"]
    disagree, frames = [], 0
    for case in range(2500):
        fs = [(rng.choice(kinds), rng.choice(flags), rng.randint(0, 3), rng.choice(plens),
               rng.randint(0, NPAGES + 1) * PS if rng.random() < 0.9 else rng.randint(0, NPAGES * PS))
              for _ in range(4)]
        frames += len(fs)
        data = HELLO + b"".join(encode(*f) for f in fs)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 5))))
        channel = rng.randint(0, 1)
        precopy = rng.random() < 0.5  # a destination that starts in precopy (run --precopy)
        ok_py, pages = python_verdict(data, precopy, urgent=channel == 1)
        d = CDest()
        if precopy:
            lib.pch_dest_set_precopy(d.d, d.fd)
        try:
            ok_c = c_feed_split(d, data, cuts, channel)
            if ok_c != ok_py or (ok_c == "ok" and {p for p in range(NPAGES) if d.received[p]} != pages):
                disagree.append((case, fs, cuts, channel, precopy, ok_c, ok_py, d.error))
        finally:
            d.close()
    assert frames >= 10_000
    assert not disagree, disagree[:3]


def test_c_decoder_agrees_with_the_reference_in_precopy():
    """Precopy streams (run --precopy): pages, pages sent again, DISCARDs of what was placed and
    POSTCOPY_START, mostly well formed so that the received maps after the discards are compared
    too, not only the verdicts."""
    import random

    rng = random.Random(20261204)
    kinds = [MSG_PAGES, MSG_PAGES, MSG_ZERO, MSG_DISCARD, MSG_DISCARD] * 4 + [MSG_POSTCOPY_START]
    disagree, compared = [], 0
    for case in range(1000):
        fs = [(rng.choice(kinds), 0 if rng.random() < 0.95 else 1, rng.randint(1 if rng.random() < 0.95 else 0, 3),
               "right" if rng.random() < 0.95 else "wrong", rng.randint(0, NPAGES - 3) * PS) for _ in range(6)]
        data = HELLO + b"".join(encode(*f) for f in fs)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 4))))
        ok_py, pages = python_verdict(data, precopy=True)
        d = CDest()
        lib.pch_dest_set_precopy(d.d, d.fd)
        try:
            ok_c = c_feed_split(d, data, cuts)
            received = {p for p in range(NPAGES) if d.received[p]}
            if ok_c != ok_py or (ok_c == "ok" and received != pages):
                disagree.append((case, fs, cuts, ok_c, ok_py, d.error))
            compared += ok_c == "ok" and any(f[0] == MSG_DISCARD for f in fs) and d.stats.discarded > 0
        finally:
            d.close()
    assert not disagree, disagree[:3]
    assert compared >= 60  # streams whose discards really dropped placed pages, maps compared
