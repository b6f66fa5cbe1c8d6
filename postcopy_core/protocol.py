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

Each layout is declared once, as a packed struct in csrc/wire.h (``struct pch_frame_hdr``,
``pch_hello``, ``pch_discard_range``, ``pch_rp_hdr``, ``pch_rp_req``, ``pch_rp_shut``,
``pch_rp_bitmap``, ``pch_rp_resume``); the struct formats below are made from cffi's view of them.
Each direction has one parser: the page stream's is the destination's, in C (csrc/dest.c,
``pch_dest_on_data``); the return path's is csrc/wire.h's ``pch_rp_parse``, which the source's C
lane (csrc/source.c) and :class:`ReturnPathReader` both call.
"""

from __future__ import annotations

from dataclasses import dataclass

from postcopy_core._uffd import ffi, lib
from postcopy_core.layouts import struct_format

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
DISCARD_RANGE = struct_format("struct pch_discard_range", ">")  # offset, length
FLAG_URGENT = lib.PCH_FLAG_URGENT
KNOWN_FLAGS = FLAG_URGENT

# big endian, from csrc/wire.h's structs (field order as declared there)
RP_HDR = struct_format("struct pch_rp_hdr", ">")  # type, len
REQ = struct_format("struct pch_rp_req", ">")  # offset, length
SHUT = struct_format("struct pch_rp_shut", ">")  # status
BITMAP = struct_format("struct pch_rp_bitmap", ">")  # first page, pages
RESUME = struct_format("struct pch_rp_resume", ">")  # pages received
HDR = struct_format("struct pch_frame_hdr", ">")  # type, flags, count, payload_len, offset
HELLO = struct_format("struct pch_hello", ">")  # magic, version, page_size, ram_size, idlen
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
    """Splits the return path byte stream into validated requests (the source side).  Each message
    is decoded and checked by csrc/wire.h's ``pch_rp_parse``, the one return-path parser (the C
    lane's too); this class keeps the bytes and acts on what it decodes."""

    def __init__(self, geo: Geometry) -> None:
        self.geo = geo
        self.buf = bytearray()
        self.idstr: str | None = None  # the RAM block the last REQ_PAGES_ID named
        self.shut: int | None = None
        # postcopy recovery: the destination's received map (RECV_BITMAP), complete once RESUME came
        self.received: bytearray | None = None
        self.resumed = False
        self._id = ffi.new("char[]", geo.idstr.encode())  # kept alive: the C reader points at it
        # what the parser checks against; the source's C lane reads the same struct (pch_source.rp)
        self.c = ffi.new("struct pch_rp_reader *", dict(page_size=geo.page_size, ram_size=geo.ram_size,
                                                         idstr=self._id))
        self._msg = ffi.new("struct pch_rp_msg *")

    def feed(self, data: bytes) -> list[PageRequest]:
        self.buf += data
        out: list[PageRequest] = []
        pos, m = 0, self._msg
        with ffi.from_buffer("uint8_t[]", self.buf) as p:
            while (n := lib.pch_rp_parse(self.c, p + pos, len(self.buf) - pos, m)) > 0:
                req = self._take(m, pos, n)
                pos += n
                if req is not None:
                    out.append(req)
        if n < 0:
            raise ProtocolError(ffi.string(m.error).decode(errors="replace"))
        del self.buf[:pos]
        return out

    def _take(self, m, pos: int, n: int) -> PageRequest | None:
        """Act on one decoded message (buf[pos:pos+n]); the parser checked it."""
        if m.type == RP_REQ_PAGES:
            return PageRequest(m.offset, m.length, None)
        if m.type == RP_REQ_PAGES_ID:
            self.idstr = self.geo.idstr  # the parser holds it to the one block there is
            self.c.id_known = 1
            return PageRequest(m.offset, m.length, self.idstr)
        if m.type == RP_SHUT:
            self.shut = m.status
            return None
        if self.received is None:
            self.received = bytearray(self.geo.npages)
        if m.type == RP_RESUME:
            have = self.received.count(1)
            if m.received != have:
                raise ProtocolError(f"RESUME: says {m.received} pages received, the bitmap holds {have}")
            self.resumed = True
            self.c.resumed = 1
            return None
        import numpy as np  # RECV_BITMAP

        bits = np.frombuffer(self.buf, np.uint8, count=n - m.bits_at, offset=pos + m.bits_at)
        self.received[m.first : m.first + m.pages] = np.unpackbits(bits, bitorder="little")[: m.pages].tobytes()
        return None


# ---------------------------------------------------------------- page stream


def encode_hello(geo: Geometry) -> bytes:
    raw = geo.idstr.encode()
    payload = HELLO.pack(MAGIC, VERSION, geo.page_size, geo.ram_size, len(raw)) + raw
    return HDR.pack(MSG_HELLO, 0, 0, len(payload), 0) + payload


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
