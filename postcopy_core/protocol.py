"""The wire protocol between source and destination.

Return path (destination -> source), laid out like QEMU's: ``be16 type, be16 len, payload``.
  REQ_PAGES     payload: be64 offset, be32 len                   (offset/len in bytes, in the RAM block)
  REQ_PAGES_ID  payload: be64 offset, be32 len, u8 idlen, idstr  (sent when the RAM block changes)
  SHUT          payload: be32 status                             (destination is done)
  RECV_BITMAP   payload: be64 first page, be32 pages, bits       (postcopy recovery: pages the destination
                                                                  holds, LSB first; to a new source only)
  RESUME        payload: be64 pages received                     (ends the bitmap; requests follow)

Page stream (source -> destination, on the stream and the urgent channel), our own design:
  header  ``u8 type, u8 flags, be16 count, be32 payload_len, be64 offset``  (16 bytes)
  HELLO   payload: 4s magic "PCHS", be16 version, be32 page_size, be64 ram_size, u8 idlen, idstr
  PAGES   ``count`` pages starting at ``offset``; payload is count * page_size bytes of data
  ZERO    ``count`` all-zero pages starting at ``offset``; no payload
  EOS     the source has sent every page (stream channel only); no payload
  DISCARD ``count`` ranges (1..12), offset 0; payload: per range be64 offset, be64 length (bytes):
          pages dirtied since precopy sent them, dropped so that they fault again (precopy only)
  POSTCOPY_START  precopy is over, the vCPUs may run; no payload (precopy only)
  (DISCARD and POSTCOPY_START come only on the stream channel of a destination told it starts in
  precopy, before POSTCOPY_START, with flags 0)
  flags   URGENT (1): the pages answer a request

Every field is validated against the RAM geometry announced in HELLO; anything off raises
:class:`ProtocolError`, whose message is one line that says what and where.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from postcopy_core._uffd import lib

# the numbers are written once, in csrc/wire.h, which the C lanes include too
VERSION = lib.PCH_PROTO_VERSION
MAGIC = b"PCHS"

# return path message types: the numbers QEMU uses for the same messages
RP_SHUT = lib.PCH_RP_SHUT
RP_REQ_PAGES_ID = lib.PCH_RP_REQ_PAGES_ID
RP_REQ_PAGES = lib.PCH_RP_REQ_PAGES
RP_RECV_BITMAP = lib.PCH_RP_RECV_BITMAP
RP_RESUME = lib.PCH_RP_RESUME

# page stream message types and flags
MSG_HELLO = lib.PCH_MSG_HELLO
MSG_PAGES = lib.PCH_MSG_PAGES
MSG_ZERO = lib.PCH_MSG_ZERO
MSG_EOS = lib.PCH_MSG_EOS
MSG_DISCARD = lib.PCH_MSG_DISCARD
MSG_POSTCOPY_START = lib.PCH_MSG_POSTCOPY_START
MSG_NAMES = {MSG_HELLO: "HELLO", MSG_PAGES: "PAGES", MSG_ZERO: "ZERO", MSG_EOS: "EOS", MSG_DISCARD: "DISCARD",
             MSG_POSTCOPY_START: "POSTCOPY_START"}
DISCARD_MAX_RANGES = lib.PCH_DISCARD_MAX_RANGES
DISCARD_RANGE = struct.Struct(">QQ")
FLAG_URGENT = lib.PCH_FLAG_URGENT
KNOWN_FLAGS = FLAG_URGENT

RP_HDR = struct.Struct(">HH")
REQ = struct.Struct(">QI")
SHUT = struct.Struct(">I")
BITMAP = struct.Struct(">QI")
RESUME = struct.Struct(">Q")
assert BITMAP.size == lib.PCH_BITMAP_HDR
HDR = struct.Struct(">BBHIQ")
HELLO = struct.Struct(">4sHIQB")
assert HDR.size == lib.PCH_HDR_SIZE and HELLO.size == lib.PCH_HELLO_SIZE
assert RP_HDR.size + REQ.size == lib.PCH_REQ_PAGES_SIZE
assert DISCARD_RANGE.size == lib.PCH_DISCARD_RANGE_SIZE
MAX_HELLO = HELLO.size + 255


class ProtocolError(ValueError):
    """A malformed or out-of-range message; the text is one line naming the field."""


@dataclass(frozen=True)
class Geometry:
    """What HELLO announces and every later message is checked against."""

    page_size: int
    ram_size: int
    idstr: str = "pc.ram"

    @property
    def npages(self) -> int:
        return self.ram_size // self.page_size


# ---------------------------------------------------------------- return path


def encode_req_pages(offset: int, length: int, idstr: str | None = None) -> bytes:
    """A REQ_PAGES message, or REQ_PAGES_ID when ``idstr`` is given."""
    if idstr is None:
        return RP_HDR.pack(RP_REQ_PAGES, REQ.size) + REQ.pack(offset, length)
    raw = idstr.encode()
    if not 0 < len(raw) < 256:
        raise ProtocolError(f"RAM block id must be 1..255 bytes, got {len(raw)}")
    payload = REQ.pack(offset, length) + bytes([len(raw)]) + raw
    return RP_HDR.pack(RP_REQ_PAGES_ID, len(payload)) + payload


def encode_shut(status: int = 0) -> bytes:
    return RP_HDR.pack(RP_SHUT, SHUT.size) + SHUT.pack(status)


def received_bits(received: bytes | bytearray):
    """One bit per page (LSB first) from one byte per page."""
    import numpy as np

    return np.packbits(np.frombuffer(bytes(received), np.uint8) != 0, bitorder="little")


def encode_received(received: bytes | bytearray) -> bytes:
    """The received map (one byte per page) as RECV_BITMAP messages and RESUME, as a paused
    destination sends it to a new source (the destination's C lane writes the same bytes)."""
    out = []
    chunk = lib.PCH_BITMAP_CHUNK * 8
    for first in range(0, len(received), chunk):
        part = received[first : first + chunk]
        bits = bytes(received_bits(part))
        out.append(RP_HDR.pack(RP_RECV_BITMAP, BITMAP.size + len(bits)) + BITMAP.pack(first, len(part)) + bits)
    total = len(received) - bytes(received).count(0)
    return b"".join(out) + RP_HDR.pack(RP_RESUME, RESUME.size) + RESUME.pack(total)


@dataclass(frozen=True)
class PageRequest:
    offset: int
    length: int
    idstr: str | None = None


class ReturnPathReader:
    """Splits the return path byte stream into validated requests (the source side)."""

    def __init__(self, geo: Geometry) -> None:
        self.geo = geo
        self.buf = bytearray()
        self.idstr: str | None = None  # the RAM block the last REQ_PAGES_ID named
        self.shut: int | None = None
        # postcopy recovery: the destination's received map (RECV_BITMAP), complete once RESUME came
        self.received: bytearray | None = None
        self.resumed = False

    def feed(self, data: bytes) -> list[PageRequest]:
        self.buf += data
        out: list[PageRequest] = []
        pos = 0
        buf = self.buf
        while len(buf) - pos >= RP_HDR.size:
            mtype, mlen = RP_HDR.unpack_from(buf, pos)
            if len(buf) - pos - RP_HDR.size < mlen:
                break
            body = bytes(buf[pos + RP_HDR.size : pos + RP_HDR.size + mlen])
            pos += RP_HDR.size + mlen
            req = self._message(mtype, body)
            if req is not None:
                out.append(req)
        del buf[:pos]
        return out

    def _message(self, mtype: int, body: bytes) -> PageRequest | None:
        if mtype == RP_REQ_PAGES:
            if len(body) != REQ.size:
                raise ProtocolError(f"REQ_PAGES: payload is {len(body)} bytes, expected {REQ.size}")
            if self.idstr is None:
                raise ProtocolError("REQ_PAGES before any REQ_PAGES_ID named the RAM block")
            offset, length = REQ.unpack(body)
            return self._checked(offset, length, None)
        if mtype == RP_REQ_PAGES_ID:
            if len(body) < REQ.size + 2:
                raise ProtocolError(f"REQ_PAGES_ID: payload of {len(body)} bytes is too short")
            offset, length = REQ.unpack_from(body)
            idlen = body[REQ.size]
            if len(body) != REQ.size + 1 + idlen or idlen == 0:
                raise ProtocolError(f"REQ_PAGES_ID: id length {idlen} does not match payload of {len(body)} bytes")
            idstr = body[REQ.size + 1 :].decode(errors="replace")
            if idstr != self.geo.idstr:
                raise ProtocolError(f"REQ_PAGES_ID: unknown RAM block {idstr!r}")
            self.idstr = idstr
            return self._checked(offset, length, idstr)
        if mtype == RP_SHUT:
            if len(body) != SHUT.size:
                raise ProtocolError(f"SHUT: payload is {len(body)} bytes, expected {SHUT.size}")
            self.shut = SHUT.unpack(body)[0]
            return None
        if mtype in (RP_RECV_BITMAP, RP_RESUME):
            self._recovery_message(mtype, body)
            return None
        raise ProtocolError(f"return path: unknown message type {mtype}")

    def _recovery_message(self, mtype: int, body: bytes) -> None:
        """RECV_BITMAP / RESUME: the received map of a destination that lost its source."""
        if self.resumed:
            raise ProtocolError("RECV_BITMAP/RESUME after RESUME")
        npages = self.geo.npages
        if self.received is None:
            self.received = bytearray(npages)
        if mtype == RP_RESUME:
            if len(body) != RESUME.size:
                raise ProtocolError(f"RESUME: payload is {len(body)} bytes, expected {RESUME.size}")
            (total,) = RESUME.unpack(body)
            have = self.received.count(1)
            if total != have:
                raise ProtocolError(f"RESUME: says {total} pages received, the bitmap holds {have}")
            self.resumed = True
            return
        if len(body) < BITMAP.size:
            raise ProtocolError(f"RECV_BITMAP: payload of {len(body)} bytes is too short")
        first, count = BITMAP.unpack_from(body)
        if count == 0 or first + count > npages:
            raise ProtocolError(f"RECV_BITMAP: pages {first}+{count} outside RAM of {npages} pages")
        if len(body) != BITMAP.size + (count + 7) // 8:
            raise ProtocolError(f"RECV_BITMAP: {len(body) - BITMAP.size} bytes of bits for {count} pages")
        import numpy as np

        bits = np.unpackbits(np.frombuffer(body, np.uint8, offset=BITMAP.size), bitorder="little")[:count]
        self.received[first : first + count] = bits.tobytes()

    def _checked(self, offset: int, length: int, idstr: str | None) -> PageRequest:
        ps = self.geo.page_size
        if offset % ps or length == 0 or length % ps:
            raise ProtocolError(f"page request {offset:#x}+{length:#x} is not page aligned (page size {ps})")
        if offset + length > self.geo.ram_size:
            raise ProtocolError(f"page request {offset:#x}+{length:#x} is past the end of RAM ({self.geo.ram_size:#x})")
        return PageRequest(offset, length, idstr)


# ---------------------------------------------------------------- page stream


def encode_hello(geo: Geometry) -> bytes:
    raw = geo.idstr.encode()
    payload = HELLO.pack(MAGIC, VERSION, geo.page_size, geo.ram_size, len(raw)) + raw
    return HDR.pack(MSG_HELLO, 0, 0, len(payload), 0) + payload


def decode_hello(payload: bytes | memoryview) -> Geometry:
    if len(payload) < HELLO.size:
        raise ProtocolError(f"HELLO: payload of {len(payload)} bytes is too short")
    magic, version, page_size, ram_size, idlen = HELLO.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError(f"HELLO: bad magic {bytes(magic)!r} (not a postcopy-harness source?)")
    if version != VERSION:
        raise ProtocolError(f"HELLO: protocol version {version}, this destination speaks {VERSION}")
    if len(payload) != HELLO.size + idlen or idlen == 0:
        raise ProtocolError("HELLO: RAM block id length does not match the payload")
    if page_size < 4096 or page_size & (page_size - 1) or ram_size == 0 or ram_size % page_size:
        raise ProtocolError(f"HELLO: bad geometry page_size={page_size} ram_size={ram_size}")
    return Geometry(page_size, ram_size, bytes(payload[HELLO.size :]).decode(errors="replace"))


def page_header(mtype: int, offset: int, count: int, page_size: int, urgent: bool = False) -> bytes:
    plen = count * page_size if mtype == MSG_PAGES else 0
    return HDR.pack(mtype, FLAG_URGENT if urgent else 0, count, plen, offset)


def encode_discards(ranges, page_size: int) -> bytes:
    """DISCARD messages for ``ranges`` of (first page, page count), at most 12 ranges each (QEMU's batch)."""
    out = []
    ranges = list(ranges)
    for i in range(0, len(ranges), DISCARD_MAX_RANGES):
        batch = ranges[i : i + DISCARD_MAX_RANGES]
        payload = b"".join(DISCARD_RANGE.pack(first * page_size, count * page_size) for first, count in batch)
        out.append(HDR.pack(MSG_DISCARD, 0, len(batch), len(payload), 0) + payload)
    return b"".join(out)


def encode_postcopy_start() -> bytes:
    return HDR.pack(MSG_POSTCOPY_START, 0, 0, 0, 0)


@dataclass
class Frame:
    """One page-stream message; ``data_at`` is where its payload starts in the reader's buffer."""

    mtype: int
    flags: int
    count: int
    offset: int
    data_at: int
    payload_len: int
    ranges: tuple = ()  # DISCARD: the (offset, length) ranges in bytes, checked


class FrameReader:
    """Reassembles page-stream frames from a non-blocking socket into one fixed buffer.

    A reference decoder of the page stream in Python, used only by the tests: the destination
    decodes frames in C (csrc/dest.c, ``pch_dest_on_data``), and the tests hold that decoder to
    this one's verdicts.

    The buffer is a bytearray of fixed capacity with the unread bytes in [start, end); it is
    compacted only when a frame does not fit behind ``end``.
    """

    def __init__(self, capacity: int, geo: Geometry | None = None, precopy: bool = False,
                 urgent: bool = False) -> None:
        self.precopy = precopy  # DISCARD and POSTCOPY_START allowed (until POSTCOPY_START)
        self.urgent = urgent  # this reader is the urgent channel's: no DISCARD there
        self.buf = bytearray(capacity)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.geo = geo
        self.eof = False
        self.eos = False  # nothing may follow EOS on a channel

    def recv_from(self, sock) -> int:
        """Read what the socket has (without blocking); returns bytes read, 0 at EOF."""
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.buf) - self.end < HDR.size + self._wanted_payload():
            self._compact()
        try:
            n = sock.recv_into(self.view[self.end :])
        except BlockingIOError:
            return -1
        if n == 0:
            self.eof = True
        self.end += n
        return n

    def _wanted_payload(self) -> int:
        if self.end - self.start >= HDR.size:
            return HDR.unpack_from(self.buf, self.start)[3]
        return 0

    def _compact(self) -> None:
        n = self.end - self.start
        self.view[0:n] = self.view[self.start : self.end]  # same size: the buffer never moves
        self.start, self.end = 0, n

    def frames(self):
        """Yield complete frames; each must be used before the next recv_from()."""
        buf = self.buf
        while self.end - self.start >= HDR.size:
            mtype, flags, count, plen, offset = HDR.unpack_from(buf, self.start)
            self._validate(mtype, flags, count, plen, offset)
            if self.end - self.start - HDR.size < plen:
                return
            at = self.start + HDR.size
            self.start = at + plen
            self.eos = mtype == MSG_EOS
            ranges = ()
            if mtype == MSG_HELLO:
                self.geo = decode_hello(self.view[at : at + plen])
            elif mtype == MSG_DISCARD:
                ranges = self._discard_ranges(at, count)
            elif mtype == MSG_POSTCOPY_START:
                self.precopy = False
            yield Frame(mtype, flags, count, offset, at, plen, ranges)

    def _discard_ranges(self, at: int, count: int) -> tuple:
        ps, ram = self.geo.page_size, self.geo.ram_size
        out = tuple(DISCARD_RANGE.unpack_from(self.buf, at + i * DISCARD_RANGE.size) for i in range(count))
        for i, (off, length) in enumerate(out):
            if length == 0 or (off | length) % ps:
                raise ProtocolError(f"DISCARD: range {i} ({off:#x}+{length:#x}) is not whole pages")
            if off > ram or length > ram - off:
                raise ProtocolError(f"DISCARD: range {i} ({off:#x}+{length:#x}) outside guest RAM")
        return out

    def _validate_hello(self, plen: int) -> None:
        if self.geo is not None:
            raise ProtocolError("HELLO: sent twice")
        if not HELLO.size < plen <= MAX_HELLO:
            raise ProtocolError(f"HELLO: payload length {plen} out of range")
        if plen > len(self.buf) - HDR.size:
            raise ProtocolError(f"HELLO: {plen} bytes do not fit the receive buffer")

    def _validate_precopy_message(self, mtype: int, name: str, flags: int, count: int, plen: int,
                                  offset: int) -> None:
        """DISCARD and POSTCOPY_START: only on the stream channel of a destination in precopy."""
        if self.urgent:
            raise ProtocolError(f"{name}: on the urgent channel")
        if not self.precopy:
            raise ProtocolError(f"{name}: not in precopy")
        if flags:
            raise ProtocolError(f"{name}: unknown flags {flags:#x}")
        if offset:
            raise ProtocolError(f"{name}: offset must be 0")
        if mtype == MSG_POSTCOPY_START:
            if count or plen:
                raise ProtocolError("POSTCOPY_START: must carry nothing")
            return
        if not 1 <= count <= DISCARD_MAX_RANGES:
            raise ProtocolError(f"DISCARD: {count} ranges, must be 1..{DISCARD_MAX_RANGES}")
        if plen != count * DISCARD_RANGE.size:
            raise ProtocolError(f"DISCARD: payload length {plen}, expected {count * DISCARD_RANGE.size} "
                                f"for {count} ranges")

    def _validate(self, mtype: int, flags: int, count: int, plen: int, offset: int) -> None:
        name = MSG_NAMES.get(mtype)
        if name is None:
            raise ProtocolError(f"page stream: unknown message type {mtype}")
        if flags & ~KNOWN_FLAGS:
            raise ProtocolError(f"{name}: unknown flags {flags:#x}")
        if self.eos:
            raise ProtocolError(f"{name}: received after EOS")
        if mtype == MSG_HELLO:
            self._validate_hello(plen)
            return
        geo = self.geo
        if geo is None:
            raise ProtocolError(f"{name}: received before HELLO")
        if mtype == MSG_EOS:
            if count or plen or offset:
                raise ProtocolError("EOS: must carry no pages")
            return
        if mtype in (MSG_DISCARD, MSG_POSTCOPY_START):
            self._validate_precopy_message(mtype, name, flags, count, plen, offset)
            return
        if count == 0:
            raise ProtocolError(f"{name}: zero pages")
        expect = count * geo.page_size if mtype == MSG_PAGES else 0
        if plen != expect:
            raise ProtocolError(f"{name}: payload length {plen}, expected {expect} for {count} pages")
        if offset % geo.page_size or offset + count * geo.page_size > geo.ram_size:
            raise ProtocolError(f"{name}: pages {offset:#x}+{count} pages outside RAM of {geo.ram_size:#x} bytes")
        if plen > len(self.buf) - HDR.size:
            raise ProtocolError(f"{name}: {plen} bytes do not fit the receive buffer")
