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
