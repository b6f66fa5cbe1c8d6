"""The source: owns the RAM image, answers page requests first, streams the rest in the background.

Like QEMU's source in postcopy: requested pages (the return path) jump the queue and go out on
the urgent channel; the background stream walks RAM in order and skips pages already sent.  All
output passes through the link model (postcopy_core.link).
"""

from __future__ import annotations

import heapq
import os
import resource
import select
import socket
import time
from collections import deque

import numpy as np

from postcopy_core._uffd import ffi, lib
from postcopy_core.channel import ControlLine, Outbox
from postcopy_core.content import ContentSpec, Image
from postcopy_core.link import Link
from postcopy_core.protocol import (
    MSG_EOS,
    MSG_PAGES,
    MSG_ZERO,
    Geometry,
    ProtocolError,
    ReturnPathReader,
    encode_hello,
    page_header,
)

BACKGROUND_CHUNK = 256 << 10  # bytes per background message: big enough to amortise, small enough to preempt
BACKGROUND_AHEAD = 1 << 20  # background bytes allowed to sit in the outbox before we wait


class Source:
    """One source process's state; :meth:`run` is its main loop."""

    def __init__(self, spec: ContentSpec, geo: Geometry, stream: socket.socket, urgent: socket.socket,
                 link: Link, control: ControlLine) -> None:
        self.spec, self.geo, self.link, self.control = spec, geo, link, control
        self.stream, self.urgent = stream, urgent
        self.image = Image(spec)
        words = np.frombuffer(self.image.mapping.buffer(), dtype=np.uint64).reshape(spec.npages, -1)
        # per page, 1 byte each: which pages go as ZERO messages, which were sent (bytes index fast)
        self.zero = (~words.any(axis=1)).astype(np.uint8).tobytes()
        self.sent = bytearray(spec.npages)
        self._rest = ffi.new("uint8_t[]", 1 << 16)  # what the C serve loop hands back to the parser
        self._rest_len = ffi.new("uint64_t *")
        # the C answer lane shares these maps and counts into its own struct (merged in run())
        self.fast = ffi.new("struct pch_source *", dict(
            fd=urgent.fileno(), image=self.image.pointer(), zero=ffi.from_buffer(self.zero),
            sent=ffi.from_buffer(self.sent), page_size=spec.page_size, ram_size=spec.size))
        self.rp = ReturnPathReader(geo)
        self.out_stream, self.out_urgent = Outbox(stream), Outbox(urgent)
        self.cursor = 0  # next page the background stream looks at
        self.chunk = max(1, BACKGROUND_CHUNK // spec.page_size)
        self.requests: deque[tuple[int, int, int]] = deque()  # (ready_ns, first page, count)
        self.link_free = 0  # when the modelled wire is idle again
        self.in_flight: list[tuple[int, int, int, list]] = []  # heap of (arrive_ns, seq, urgent, bufs)
        self.seq = 0
        self.eos_sent = False
        self.stats = dict(pages_urgent=0, pages_background=0, pages_zero=0, bytes_sent=0, requests=0,
                          requested_already_sent=0)

    # -- what to send

    def _pages_message(self, first: int, count: int, urgent: bool) -> list:
        """Header (+ data) for ``count`` pages of one kind starting at ``first``; marks them sent."""
        ps = self.spec.page_size
        self.sent[first : first + count] = b"\x01" * count
        key = "pages_urgent" if urgent else "pages_background"
        self.stats[key] += count
        if self.zero[first]:
            self.stats["pages_zero"] += count
            return [page_header(MSG_ZERO, first * ps, count, ps, urgent)]
        data = self.image.mapping.buffer(first * ps, count * ps)
        return [page_header(MSG_PAGES, first * ps, count, ps, urgent), data]

    def _runs(self, first: int, count: int, limit: int):
        """Split pages [first, first+count) into runs of unsent pages of one kind (zero or data)."""
        p, end = first, first + count
        while p < end:
            if self.sent[p]:
                p += 1
                continue
            q = p + 1
            while q < end and q - p < limit and not self.sent[q] and self.zero[q] == self.zero[p]:
                q += 1
            yield p, q - p
            p = q

    def _next_urgent(self, now: int) -> list | None:
        while self.requests and self.requests[0][0] <= now:
            _, first, count = self.requests.popleft()
            msgs = [m for p, n in self._runs(first, count, self.chunk) for m in self._pages_message(p, n, True)]
            if msgs:
                return msgs
            self.stats["requested_already_sent"] += 1
        return None

    def _next_background(self) -> list | None:
        npages = self.spec.npages
        while self.cursor < npages and self.sent[self.cursor]:
            self.cursor += 1
        if self.cursor >= npages:
            return None
        for p, n in self._runs(self.cursor, min(self.chunk, npages - self.cursor), self.chunk):
            self.cursor = p + n
            return self._pages_message(p, n, False)
        return None

    # -- the link

    def _emit(self, bufs: list, urgent: bool, now: int) -> None:
        nbytes = sum(memoryview(b).nbytes for b in bufs)
        self.stats["bytes_sent"] += nbytes
        if self.link.unlimited:
            (self.out_urgent if urgent else self.out_stream).push(*bufs)
            return
        start = max(now, self.link_free)
        self.link_free = start + self.link.wire_ns(nbytes)
        self.seq += 1
        heapq.heappush(self.in_flight, (self.link_free + self.link.latency_ns, self.seq, urgent, bufs))

    def _deliver(self, now: int) -> None:
        while self.in_flight and self.in_flight[0][0] <= now:
            _, _, urgent, bufs = heapq.heappop(self.in_flight)
            (self.out_urgent if urgent else self.out_stream).push(*bufs)

    def _schedule(self, streaming: bool) -> None:
        """Put messages on the (modelled) wire while it is idle: urgent pages first."""
        while True:
            now = time.monotonic_ns()
            if self.link_free > now:
                return
            msgs = self._next_urgent(now)
            if msgs is not None:
                self._emit(msgs, True, now)
                continue
            if not streaming or self.out_stream.queued > BACKGROUND_AHEAD or len(self.in_flight) > 64:
                return
            msgs = self._next_background()
            if msgs is None:
                if not self.eos_sent and not self.in_flight:
                    self.out_stream.push(page_header(MSG_EOS, 0, 0, self.spec.page_size))
                    self.eos_sent = True
                return
            self._emit(msgs, False, now)

    # -- the loop

    def _serve_in_c(self) -> bool | None:
        """Demand-only phase: let C serve plain requests until something needs Python.

        Returns None when the control socket has a command, else what :meth:`_read_requests` says.
        """
        rc = lib.pch_source_serve(self.fast, self.stream.fileno(), self.control.fileno(), self._rest,
                                  len(self._rest), self._rest_len)
        if rc < 0:
            raise OSError(-rc, f"serving page requests: {os.strerror(-rc)}")
        if rc == lib.PCH_SERVE_CONTROL:
            return None
        if rc == lib.PCH_SERVE_EOF:
            return False
        return self._read_requests(bytes(ffi.buffer(self._rest, self._rest_len[0])))

    def _read_requests(self, data: bytes | None = None) -> bool:
        """Drain the return path (or take ``data`` already read from it); False at EOF or SHUT."""
        if data is None:
            try:
                data = self.stream.recv(1 << 16)
            except BlockingIOError:
                return True
        if not data:
            return False
        if self.link.unlimited and self.rp.idstr is not None and not self.rp.buf:
            # the common case, in C: a run of plain REQ_PAGES answered at once (csrc/source.c)
            used = lib.pch_source_answer(self.fast, ffi.from_buffer(data), len(data))
            if used < 0:
                raise OSError(-used, f"sending urgent pages: {os.strerror(-used)}")
            data = data[used:]
            if not data:
                return True
        requests = self.rp.feed(data)  # anything else: the full parser, with its exact errors
        self.stats["requests"] += len(requests)
        ps = self.spec.page_size
        ready = time.monotonic_ns() + self.link.latency_ns  # the request's own trip over the link
        for req in requests:  # sent by _schedule, urgent first
            self.requests.append((ready, req.offset // ps, req.length // ps))
        return self.rp.shut is None

    def run(self) -> dict:
        """Send HELLO, wait for 'go', serve until the destination shuts the return path."""
        hello = encode_hello(self.geo)
        self.out_stream.push(hello)
        self.out_urgent.push(hello)
        self.control.send(event="ready")
        streaming = False
        ctl = self.control.sock
        modelled = not self.link.unlimited
        while True:
            # what is due goes out: modelled messages whose arrival time came, then new work
            if modelled:
                self._deliver(time.monotonic_ns())
            if streaming or self.requests:
                self._schedule(streaming)
                if modelled:
                    self._deliver(time.monotonic_ns())
            urgent_done = not self.out_urgent.q or self.out_urgent.flush()
            stream_done = not self.out_stream.q or self.out_stream.flush()
            if (not modelled and not streaming and urgent_done and stream_done and self.rp.idstr is not None
                    and not self.rp.buf):
                served = self._serve_in_c()  # the demand-only hot path, until a command or an odd message
                if served is False:
                    break
                if served is True:
                    continue
            timeout = None
            if modelled and (self.in_flight or self.requests or self.link_free > time.monotonic_ns()):
                nxt = [t for t in (self.in_flight[0][0] if self.in_flight else None,
                                   self.requests[0][0] if self.requests else None, self.link_free) if t]
                timeout = max(0.0, (min(nxt) - time.monotonic_ns()) / 1e9)
            elif streaming and not self.eos_sent and stream_done:
                timeout = 0.0
            wlist = ([] if urgent_done else [self.urgent]) + ([] if stream_done else [self.stream])
            rl, _, _ = select.select([self.stream, ctl], wlist, [], timeout)
            if self.stream in rl and not self._read_requests():
                break
            if ctl in rl:
                msg = self.control.recv(0)
                if msg is None:
                    break  # the orchestrator is gone
                if msg.get("cmd") == "go":
                    streaming = msg.get("background", True)
                elif msg.get("cmd") == "stream":  # demand-only runs: send the rest now
                    streaming = True
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.stats["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 3)
        self.stats["all_sent"] = self.sent.count(0) == 0
        for key in ("requests", "pages_urgent", "pages_zero", "requested_already_sent", "bytes_sent"):
            self.stats[key] += getattr(self.fast, key)
        return self.stats


def source_main(spec: ContentSpec, geo: Geometry, stream: socket.socket, urgent: socket.socket,
                link: Link, control: ControlLine) -> int:
    """Entry point of the source process (after fork)."""
    try:
        stats = Source(spec, geo, stream, urgent, link, control).run()
    except ProtocolError as e:
        control.send(event="error", error=f"source: bad message from destination: {e}")
        return 3
    control.send(event="stats", stats=stats)
    return 0
