"""The wire protocol: return path (QEMU's REQ_PAGES layout) and page-stream frames over real sockets."""

from __future__ import annotations

import ctypes
import random
import re
import select
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postcopy_core.protocol import (
    HDR,
    HELLO,
    MAGIC,
    MSG_EOS,
    MSG_HELLO,
    MSG_PAGES,
    MSG_ZERO,
    REQ,
    RP_HDR,
    RP_REQ_PAGES,
    RP_REQ_PAGES_ID,
    RP_SHUT,
    Geometry,
    PageRequest,
    ProtocolError,
    ReturnPathReader,
    encode_hello,
    encode_req_pages,
    encode_shut,
    page_header,
)
from tests.frame_reader import FrameReader

PS = 4096
GEO = Geometry(PS, 64 * PS)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given positions (any order, duplicates allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


# ------------------------------------------------------------------------------------ return path


def test_req_pages_layout_matches_qemu():
    # be16 type, be16 len, be64 offset, be32 len [, u8 idlen, idstr]
    assert encode_req_pages(0x3000, 0x2000) == bytes.fromhex("0004 000c 0000000000003000 00002000")
    assert encode_req_pages(0x1000, 0x1000, "pc.ram") == (
        bytes.fromhex("0003 0013 0000000000001000 00001000 06") + b"pc.ram"
    )
    assert encode_shut(7) == bytes.fromhex("0001 0004 00000007")
    assert (RP_SHUT, RP_REQ_PAGES_ID, RP_REQ_PAGES) == (1, 3, 4)


def test_return_path_round_trip_one_byte_at_a_time():
    msgs = [encode_req_pages(0, PS, "pc.ram"), encode_req_pages(5 * PS, 3 * PS), encode_shut(3)]
    r = ReturnPathReader(GEO)
    got = []
    for b in b"".join(msgs):
        got += r.feed(bytes([b]))
    assert got == [PageRequest(0, PS, "pc.ram"), PageRequest(5 * PS, 3 * PS, None)]
    assert r.shut == 3
    assert r.buf == bytearray()


requests = st.lists(
    st.tuples(st.integers(0, 63), st.integers(1, 8), st.booleans()).filter(lambda t: t[0] + t[1] <= 64),
    min_size=1,
    max_size=20,
)


@FUZZ
@given(requests, st.lists(st.integers(0, 10_000), max_size=30), st.integers(0, 2**32 - 1))
def test_return_path_round_trip_across_any_feed_boundaries(reqs, cuts, status):
    wire, expect = b"", []
    for i, (page, npages, with_id) in enumerate(reqs):
        idstr = "pc.ram" if with_id or i == 0 else None
        wire += encode_req_pages(page * PS, npages * PS, idstr)
        expect.append(PageRequest(page * PS, npages * PS, idstr))
    wire += encode_shut(status)
    r = ReturnPathReader(GEO)
    got = []
    for piece in split(wire, cuts):
        got += r.feed(piece)
    assert got == expect
    assert r.shut == status
    assert len(r.buf) == 0


def test_return_path_holds_a_partial_message_until_it_completes():
    r = ReturnPathReader(GEO)
    msg = encode_req_pages(PS, PS, "pc.ram")
    assert r.feed(msg[:-1]) == []
    assert bytes(r.buf) == msg[:-1]
    assert r.feed(msg[-1:]) == [PageRequest(PS, PS, "pc.ram")]


def rp_error(data: bytes, geo: Geometry = GEO) -> str:
    with pytest.raises(ProtocolError) as ei:
        ReturnPathReader(geo).feed(data)
    return one_line(ei.value)


ID = encode_req_pages(0, PS, "pc.ram")  # names the RAM block first


@pytest.mark.parametrize(
    "data, match",
    [
        (RP_HDR.pack(2, 0), "unknown message type 2"),
        (RP_HDR.pack(0xFFFF, 1) + b"x", "unknown message type 65535"),
        (RP_HDR.pack(RP_REQ_PAGES, 11) + bytes(11), "REQ_PAGES: payload is 11 bytes, expected 12"),
        (RP_HDR.pack(RP_REQ_PAGES, 13) + bytes(13), "REQ_PAGES: payload is 13 bytes, expected 12"),
        (RP_HDR.pack(RP_SHUT, 3) + bytes(3), "SHUT: payload is 3 bytes, expected 4"),
        (RP_HDR.pack(RP_SHUT, 8) + bytes(8), "SHUT: payload is 8 bytes, expected 4"),
        (RP_HDR.pack(RP_REQ_PAGES_ID, 13) + REQ.pack(0, PS) + b"\x00", "too short"),
        # idlen says 7, the payload carries 6 id bytes
        (RP_HDR.pack(RP_REQ_PAGES_ID, 19) + REQ.pack(0, PS) + b"\x07pc.ram", "id length 7 does not match"),
        # idlen says 5, the payload carries 6 id bytes
        (RP_HDR.pack(RP_REQ_PAGES_ID, 19) + REQ.pack(0, PS) + b"\x05pc.ram", "id length 5 does not match"),
        (RP_HDR.pack(RP_REQ_PAGES_ID, 14) + REQ.pack(0, PS) + b"\x00x", "id length 0 does not match"),
        (encode_req_pages(0, PS, "pc.rom"), "unknown RAM block 'pc.rom'"),
        (encode_req_pages(PS, PS), "REQ_PAGES before any REQ_PAGES_ID"),
        (ID + encode_req_pages(100, PS), "0x64\\+0x1000 is not page aligned"),
        (ID + encode_req_pages(PS, 100), "0x1000\\+0x64 is not page aligned"),
        (ID + encode_req_pages(PS, 0), "0x1000\\+0x0 is not page aligned"),
        (encode_req_pages(PS, 0, "pc.ram"), "0x1000\\+0x0 is not page aligned"),
        (ID + encode_req_pages(63 * PS, 2 * PS), "past the end of RAM \\(0x40000\\)"),
        (ID + encode_req_pages(64 * PS, PS), "past the end of RAM"),
        (ID + encode_req_pages(2**64 - PS, PS), "past the end of RAM"),
        (encode_req_pages(0, 2**32 - PS, "pc.ram"), "past the end of RAM"),
    ],
)
def test_return_path_rejects(data, match):
    text = rp_error(data)
    assert re.search(match, text), text


def test_return_path_error_after_good_messages_still_returns_nothing_wrong():
    # the good request before the bad one is not silently swallowed into a later call
    r = ReturnPathReader(GEO)
    assert r.feed(ID) == [PageRequest(0, PS, "pc.ram")]
    with pytest.raises(ProtocolError, match="unknown message type 9"):
        r.feed(encode_req_pages(PS, PS) + RP_HDR.pack(9, 0))


def test_return_path_block_change_must_match_geometry():
    geo = Geometry(PS, 16 * PS, "ram-node0")
    r = ReturnPathReader(geo)
    assert r.feed(encode_req_pages(0, PS, "ram-node0")) == [PageRequest(0, PS, "ram-node0")]
    with pytest.raises(ProtocolError, match="unknown RAM block 'pc.ram'"):
        r.feed(encode_req_pages(0, PS, "pc.ram"))


def test_encode_req_pages_id_length_limits():
    assert len(encode_req_pages(0, PS, "x" * 255)) == 4 + 12 + 1 + 255
    with pytest.raises(ProtocolError, match="1..255 bytes, got 0"):
        encode_req_pages(0, PS, "")
    with pytest.raises(ProtocolError, match="got 256"):
        encode_req_pages(0, PS, "x" * 256)


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=10), st.booleans())
def test_return_path_fuzz_raises_only_protocol_error(data, cuts, named):
    r = ReturnPathReader(GEO)
    if named:
        r.feed(ID)
    try:
        for piece in split(data, cuts):
            for req in r.feed(piece):
                assert req.offset % PS == 0 and req.length > 0 and req.length % PS == 0
                assert req.offset + req.length <= GEO.ram_size
    except ProtocolError as e:
        one_line(e)


# ------------------------------------------------------------------------------------ page stream


def pages_frame(page: int, count: int, payload: bytes, urgent: bool = False) -> bytes:
    assert len(payload) == count * PS
    return page_header(MSG_PAGES, page * PS, count, PS, urgent) + payload


def hello_raw(magic=MAGIC, version=1, page_size=PS, ram_size=64 * PS, idstr=b"pc.ram", idlen=None) -> bytes:
    payload = HELLO.pack(magic, version, page_size, ram_size, len(idstr) if idlen is None else idlen) + idstr
    return HDR.pack(MSG_HELLO, 0, 0, len(payload), 0) + payload


class CountingReader(FrameReader):
    compactions = 0

    def _compact(self) -> None:
        self.compactions += 1
        super()._compact()


def pump(reader: FrameReader, sock: socket.socket, on_frame=None, max_loops: int = 100_000) -> None:
    """Drain ``sock`` into ``reader`` until EOF, handing each frame to ``on_frame`` right away."""
    for _ in range(max_loops):
        n = reader.recv_from(sock)
        for f in reader.frames():
            if on_frame:
                on_frame(f)
        if n == 0:
            return
        if n < 0:  # nothing buffered yet: wait for more
            select.select([sock], [], [], 1.0)
    raise AssertionError("reader never reached EOF")


def address(buf: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def stream_frames(wire_pieces, capacity: int, geo=None):
    """Send the pieces over a real socketpair and return (reader, [(frame, payload bytes)])."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    reader = CountingReader(capacity, geo)
    buf, at = reader.buf, address(reader.buf)
    got = []

    def keep(f):
        got.append((f, bytes(reader.buf[f.data_at : f.data_at + f.payload_len])))

    try:
        for piece in wire_pieces:
            a.sendall(piece)
            # read what arrived before sending more, so fragments really arrive as fragments
            while True:
                n = reader.recv_from(b)
                for f in reader.frames():
                    keep(f)
                if n <= 0:
                    break
        a.shutdown(socket.SHUT_WR)
        pump(reader, b, keep)
    finally:
        a.close()
        b.close()
    # the buffer never moves: the destination hands pointers into it to UFFDIO_COPY
    assert reader.buf is buf and len(buf) == capacity and address(buf) == at
    return reader, got


def random_pages(rng: random.Random, count: int) -> bytes:
    return rng.randbytes(count * PS)


def test_hello_round_trip_sets_geometry():
    geo = Geometry(2 << 20, 8 * (2 << 20), "mem0")
    reader, got = stream_frames([encode_hello(geo)], 4096)
    assert reader.geo == geo
    assert [(f.mtype, f.count, f.offset) for f, _ in got] == [(MSG_HELLO, 0, 0)]
    assert reader.eof


def test_frames_one_byte_at_a_time():
    rng = random.Random(1)
    p1, p2 = random_pages(rng, 1), random_pages(rng, 2)
    wire = (
        encode_hello(GEO)
        + pages_frame(3, 1, p1, urgent=True)
        + page_header(MSG_ZERO, 10 * PS, 5, PS)
        + pages_frame(62, 2, p2)
        + page_header(MSG_EOS, 0, 0, PS)
    )
    reader, got = stream_frames([bytes([x]) for x in wire], 16 + 2 * PS)
    assert [(f.mtype, f.flags, f.count, f.offset, f.payload_len) for f, _ in got] == [
        (MSG_HELLO, 0, 0, 0, HELLO.size + 6),
        (MSG_PAGES, 1, 1, 3 * PS, PS),
        (MSG_ZERO, 0, 5, 10 * PS, 0),
        (MSG_PAGES, 0, 2, 62 * PS, 2 * PS),
        (MSG_EOS, 0, 0, 0, 0),
    ]
    assert got[1][1] == p1 and got[3][1] == p2
    assert got[2][1] == b"" and got[4][1] == b""


frame_specs = st.lists(
    st.tuples(st.sampled_from([MSG_PAGES, MSG_PAGES, MSG_ZERO]), st.integers(0, 63), st.integers(1, 3),
              st.booleans()).filter(lambda t: t[1] + t[2] <= 64),
    min_size=1,
    max_size=25,
)


@FUZZ
@given(frame_specs, st.lists(st.integers(0, 400_000), max_size=40), st.integers(0, 2**32),
       st.sampled_from([16 + 3 * PS, 16 + 4 * PS + 100, 64 * 1024]))
def test_frames_reassembled_from_arbitrary_fragments(specs, cuts, seed, capacity):
    rng = random.Random(seed)
    wire, expect = encode_hello(GEO), []
    for mtype, page, count, urgent in specs:
        data = random_pages(rng, count) if mtype == MSG_PAGES else b""
        wire += page_header(mtype, page * PS, count, PS, urgent) + data
        expect.append((mtype, int(urgent), count, page * PS, data))
    wire += page_header(MSG_EOS, 0, 0, PS)
    expect.append((MSG_EOS, 0, 0, 0, b""))
    reader, got = stream_frames(split(wire, cuts), capacity)
    assert got[0][0].mtype == MSG_HELLO
    assert [(f.mtype, f.flags, f.count, f.offset, data) for f, data in got[1:]] == expect
    for f, data in got[1:]:
        assert f.payload_len == len(data)
    assert reader.eof and reader.start == reader.end


def test_many_frames_through_a_small_buffer_compact_without_corruption():
    rng = random.Random(7)
    frames, pieces = [], [encode_hello(GEO)]
    for i in range(300):
        count = 1 + i % 3
        data = random_pages(rng, count)
        frames.append(((i * 5) % 60 * PS, data))
        raw = page_header(MSG_PAGES, (i * 5) % 60 * PS, count, PS) + data
        pieces += split(raw, [rng.randrange(len(raw)) for _ in range(3)])
    capacity = 16 + 3 * PS + 37  # odd size: frames straddle the end and force compaction
    reader, got = stream_frames(pieces, capacity)
    assert [(f.offset, data) for f, data in got[1:]] == frames
    assert reader.compactions > 50


def frame_error(wire: bytes, capacity: int = 16 + 4 * PS, geo=None) -> str:
    with pytest.raises(ProtocolError) as ei:
        stream_frames([wire], capacity, geo)
    return one_line(ei.value)


H = encode_hello(GEO)


@pytest.mark.parametrize(
    "wire, match",
    [
        (page_header(MSG_PAGES, 0, 1, PS) + bytes(PS), "PAGES: received before HELLO"),
        (page_header(MSG_ZERO, 0, 1, PS), "ZERO: received before HELLO"),
        (page_header(MSG_EOS, 0, 0, PS), "EOS: received before HELLO"),
        (H + H, "HELLO: sent twice"),
        (HDR.pack(9, 0, 0, 0, 0), "unknown message type 9"),
        (H + HDR.pack(0, 0, 0, 0, 0), "unknown message type 0"),
        (H + HDR.pack(MSG_ZERO, 2, 1, 0, 0), "ZERO: unknown flags 0x2"),
        (H + HDR.pack(MSG_PAGES, 0x81, 1, PS, 0), "PAGES: unknown flags 0x81"),
        (HDR.pack(MSG_HELLO, 4, 0, 25, 0) + bytes(25), "HELLO: unknown flags 0x4"),
        (H + page_header(MSG_PAGES, 0, 0, PS), "PAGES: zero pages"),
        (H + page_header(MSG_ZERO, 0, 0, PS), "ZERO: zero pages"),
        (H + HDR.pack(MSG_PAGES, 0, 2, PS, 0) + bytes(PS), "payload length 4096, expected 8192 for 2 pages"),
        (H + HDR.pack(MSG_ZERO, 0, 1, PS, 0) + bytes(PS), "ZERO: payload length 4096, expected 0"),
        (H + HDR.pack(MSG_EOS, 0, 1, 0, 0), "EOS: must carry no pages"),
        (H + HDR.pack(MSG_EOS, 0, 0, 4, 0) + bytes(4), "EOS: must carry no pages"),
        (H + HDR.pack(MSG_EOS, 0, 0, 0, PS), "EOS: must carry no pages"),
        (H + page_header(MSG_ZERO, 100, 1, PS), "ZERO: pages 0x64\\+1 pages outside RAM"),
        (H + page_header(MSG_ZERO, 63 * PS, 2, PS), "outside RAM of 0x40000 bytes"),
        (H + page_header(MSG_ZERO, 64 * PS, 1, PS), "outside RAM"),
        (H + page_header(MSG_ZERO, 2**64 - PS, 1, PS), "outside RAM"),
        (H + page_header(MSG_PAGES, 0, 5, PS), "PAGES: 20480 bytes do not fit the receive buffer"),
        (hello_raw(magic=b"QEMU"), "HELLO: bad magic b'QEMU'"),
        (hello_raw(version=2), "HELLO: protocol version 2, this destination speaks 1"),
        (hello_raw(page_size=1024), "bad geometry page_size=1024"),
        (hello_raw(page_size=3 * PS), "bad geometry page_size=12288"),
        (hello_raw(ram_size=0), "bad geometry .*ram_size=0"),
        (hello_raw(ram_size=PS + 1), "bad geometry .*ram_size=4097"),
        (hello_raw(idlen=7), "RAM block id length does not match"),
        (hello_raw(idlen=0, idstr=b""), "HELLO: payload length 19 out of range"),
        (hello_raw(idlen=0, idstr=b"x"), "RAM block id length does not match"),
        (HDR.pack(MSG_HELLO, 0, 0, 300, 0) + bytes(300), "HELLO: payload length 300 out of range"),
        (HDR.pack(MSG_HELLO, 0, 0, 10, 0) + bytes(10), "HELLO: payload length 10 out of range"),
    ],
)
def test_frame_reader_rejects(wire, match):
    text = frame_error(wire)
    assert re.search(match, text), text


def test_frame_reader_with_known_geometry_rejects_hello_and_checks_frames():
    assert "HELLO: sent twice" in frame_error(H, geo=GEO)
    reader, got = stream_frames([page_header(MSG_ZERO, PS, 2, PS)], 4096, geo=GEO)
    assert [(f.mtype, f.count, f.offset) for f, _ in got] == [(MSG_ZERO, 2, PS)]


def test_frame_exactly_filling_the_buffer_is_accepted():
    data = random.Random(3).randbytes(2 * PS)
    reader, got = stream_frames([H, pages_frame(0, 2, data), pages_frame(2, 2, data[::-1])], 16 + 2 * PS)
    assert [d for _, d in got[1:]] == [data, data[::-1]]
    assert "do not fit" in frame_error(H + page_header(MSG_PAGES, 0, 3, PS), 16 + 2 * PS)


def test_hello_larger_than_the_buffer_is_an_error_not_a_false_eof():
    # a HELLO whose payload cannot fit must be rejected like any other oversized frame, instead of
    # filling the buffer and reading into zero bytes of space (which looks like EOF)
    wire = encode_hello(Geometry(PS, 64 * PS, "r" * 200))
    assert "do not fit the receive buffer" in frame_error(wire, capacity=128)


def fuzz_stream():
    mutated = st.tuples(st.binary(max_size=600), st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)),
                                                          max_size=6))
    return st.one_of(
        st.binary(max_size=600),
        st.binary(max_size=600).map(lambda b: H + b),
        mutated.map(lambda t: _mutate(H + page_header(MSG_ZERO, PS, 2, PS) + page_header(MSG_PAGES, 0, 1, PS)
                                      + bytes(PS) + t[0], t[1])),
        mutated.map(lambda t: _mutate(H + t[0], t[1])),
        st.tuples(st.integers(1, 255), st.binary(max_size=100)).map(
            lambda t: encode_hello(Geometry(PS, 64 * PS, "x" * t[0])) + t[1]),
    )


def _mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for pos, val in edits:
        out[pos % len(out)] = val
    return bytes(out)


@FUZZ
@given(fuzz_stream(), st.lists(st.integers(0, 6000), max_size=8),
       st.sampled_from([64, 128, 300, 16 + PS, 16 + 2 * PS + 5]))
def test_frame_reader_fuzz_raises_only_protocol_error_and_never_hangs(data, cuts, capacity):
    try:
        reader, got = stream_frames(split(data, cuts), capacity)
    except ProtocolError as e:
        one_line(e)
        return
    # no error: every byte was read (no false EOF), and what is left is at most one partial frame
    assert reader.eof
    consumed = sum(HDR.size + f.payload_len for f, _ in got)
    assert consumed + (reader.end - reader.start) == len(data)
    assert reader.end - reader.start < capacity
    for f, payload in got:
        assert len(payload) == f.payload_len
        if f.mtype in (MSG_PAGES, MSG_ZERO):
            assert f.offset % PS == 0 and f.offset + f.count * PS <= reader.geo.ram_size


def test_partial_header_at_eof_is_left_unread():
    reader, got = stream_frames([H, page_header(MSG_ZERO, 0, 1, PS)[:10]], 4096)
    assert [f.mtype for f, _ in got] == [MSG_HELLO]
    assert reader.eof and reader.end - reader.start == 10


def test_struct_sizes():
    assert (HDR.size, HELLO.size, REQ.size, RP_HDR.size) == (16, 19, 12, 4)
    assert struct.unpack(">BBHIQ", page_header(MSG_PAGES, 8 * PS, 3, PS, urgent=True)) == (
        MSG_PAGES, 1, 3, 3 * PS, 8 * PS)
    assert struct.unpack(">BBHIQ", page_header(MSG_ZERO, 0, 3, PS)) == (MSG_ZERO, 0, 3, 0, 0)
