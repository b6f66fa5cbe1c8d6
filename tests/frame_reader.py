"""A reference decoder of the page stream (postcopy_core/protocol.py's layout), for the tests only.

The destination decodes frames in C (csrc/dest.c, ``pch_dest_on_data``); this Python one is what
the tests hold it to.
"""

from __future__ import annotations

from dataclasses import dataclass

from postcopy_core.protocol import (
    DISCARD_MAX_RANGES,
    DISCARD_RANGE,
    HDR,
    HELLO,
    KNOWN_FLAGS,
    MAGIC,
    MAX_HELLO,
    MSG_DISCARD,
    MSG_EOS,
    MSG_HELLO,
    MSG_NAMES,
    MSG_PAGES,
    MSG_POSTCOPY_START,
    VERSION,
    Geometry,
    ProtocolError,
)


def decode_hello(payload: bytes | memoryview) -> Geometry:
    """HELLO's payload as the destination checks it (csrc/dest.c, ``hello``), for the tests."""
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

    The reference decoder of the page stream, in Python, for the tests only: they hold the
    destination's own decoder (csrc/dest.c, ``pch_dest_on_data``) to the same verdicts.

    The buffer never moves (the destination hands pointers into it straight to UFFDIO_COPY), so
    it is a bytearray of fixed capacity with the unread bytes in [start, end); it is compacted
    only when a frame does not fit behind ``end``.
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

    def _validate(self, mtype: int, flags: int, count: int, plen: int, offset: int) -> None:
        name = MSG_NAMES.get(mtype)
        if name is None:
            raise ProtocolError(f"page stream: unknown message type {mtype}")
        if flags & ~KNOWN_FLAGS:
            raise ProtocolError(f"{name}: unknown flags {flags:#x}")
        if self.eos:
            raise ProtocolError(f"{name}: received after EOS")
        if mtype == MSG_HELLO:
            if self.geo is not None:
                raise ProtocolError("HELLO: sent twice")
            if not HELLO.size < plen <= MAX_HELLO:
                raise ProtocolError(f"HELLO: payload length {plen} out of range")
            if plen > len(self.buf) - HDR.size:
                raise ProtocolError(f"HELLO: {plen} bytes do not fit the receive buffer")
            return
        geo = self.geo
        if geo is None:
            raise ProtocolError(f"{name}: received before HELLO")
        if mtype == MSG_EOS:
            if count or plen or offset:
                raise ProtocolError("EOS: must carry no pages")
            return
        if mtype in (MSG_DISCARD, MSG_POSTCOPY_START):
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
