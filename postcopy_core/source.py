"""The source: owns the RAM image, answers page requests first, streams the rest in the background.

Like QEMU's source in postcopy: requested pages (the return path) jump the queue and go out on
the urgent channel; the background stream walks RAM in order and skips pages already sent.

Two loops, one per kind of link:
- unlimited (the default): Python picks what to stream, in batches of page numbers
  (:func:`sequential_batches`), and the C lane (csrc/source.c, ``pch_source_pump``) moves the
  bytes: it answers plain requests the moment they arrive and writes the batch's pages as stream
  frames between them.  Python steps in only for commands, the first request (which names the RAM
  block) and anything odd, which its parser reports exactly.
- modelled (``--link``): everything passes through the link model (postcopy_core.link) in Python,
  one message at a time on the modelled wire, urgent pages first.
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
WIRE_SLOT_NS = 200_000  # on a modelled link an urgent page waits for at most this much stream on the wire
STREAM_BATCH = 1 << 16  # page numbers handed to the C lane at a time
SENT_STREAM, SENT_URGENT = lib.PCH_SENT_STREAM, lib.PCH_SENT_URGENT


def sequential_batches(npages: int, batch: int = STREAM_BATCH):
    """The background stream's order: RAM from start to end, as QEMU's postcopy does."""
    for first in range(0, npages, batch):
        yield np.arange(first, min(first + batch, npages), dtype=np.uint32)


class Source:
    """One source process's state; :meth:`run` is its main loop."""

    def __init__(self, spec: ContentSpec, geo: Geometry, stream: socket.socket, urgent: socket.socket,
                 link: Link, control: ControlLine) -> None:
        self.spec, self.geo, self.link, self.control = spec, geo, link, control
        self.stream, self.urgent = stream, urgent
        self.image = Image(spec)
        words = np.frombuffer(self.image.mapping.buffer(), dtype=np.uint64).reshape(spec.npages, -1)
        # per page, 1 byte each: which pages go as ZERO messages, which were sent (bytes index fast)
        self.zero = bytearray((~words.any(axis=1)).astype(np.uint8).tobytes())  # precopy's dirtying clears it
        self.sent = bytearray(spec.npages)
        self._rest = ffi.new("uint8_t[]", 1 << 16)  # what the C serve loop hands back to the parser
        # the C answer lane shares these maps and counts into its own struct (merged in run())
        self.fast = ffi.new("struct pch_source *", dict(
            fd=urgent.fileno(), image=self.image.pointer(), zero=ffi.from_buffer(self.zero),
            sent=ffi.from_buffer(self.sent), page_size=spec.page_size, ram_size=spec.size))
        self.pump = ffi.new("struct pch_pump *", dict(
            rp_fd=stream.fileno(), ctl_fd=control.fileno(), stream_fd=stream.fileno(),
            rest=self._rest, cap=len(self._rest)))
        self._batch = None  # the batch of page numbers the C lane is streaming (kept alive here)
        self.resend_streamed = spec.page_size < BACKGROUND_CHUNK  # see pch.h, pch_source_answer
        self.fast.resend_streamed = int(self.resend_streamed)
        self.rp = ReturnPathReader(geo)
        self.out_stream, self.out_urgent = Outbox(stream), Outbox(urgent)
        self.cursor = 0  # next page the background stream looks at
        self.chunk = max(1, BACKGROUND_CHUNK // spec.page_size)
        if not link.unlimited:  # small enough that an urgent page never waits long behind one
            self.chunk = max(1, min(self.chunk, int(link.bytes_per_s * WIRE_SLOT_NS / 1e9) // spec.page_size))
        self.pump.max_run = self.chunk
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
        self.sent[first : first + count] = bytes([SENT_URGENT if urgent else SENT_STREAM]) * count
        key = "pages_urgent" if urgent else "pages_background"
        self.stats[key] += count
        if self.zero[first]:
            self.stats["pages_zero"] += count
            return [page_header(MSG_ZERO, first * ps, count, ps, urgent)]
        data = self.image.mapping.buffer(first * ps, count * ps)
        return [page_header(MSG_PAGES, first * ps, count, ps, urgent), data]

    def _runs(self, first: int, count: int, limit: int, urgent: bool = False):
        """Split pages [first, first+count) into runs of pages to send, of one kind (zero or data).

        The stream skips every page sent; an answer of small pages skips only pages already
        answered (one that went on the stream may be stuck behind its backlog, see pch.h)."""
        sent = self.sent
        skip = (lambda p: sent[p] == SENT_URGENT) if urgent and self.resend_streamed else sent.__getitem__
        p, end = first, first + count
        while p < end:
            if skip(p):
                p += 1
                continue
            q = p + 1
            while q < end and q - p < limit and not skip(q) and self.zero[q] == self.zero[p]:
                q += 1
            yield p, q - p
            p = q

    def _next_urgent(self, now: int) -> list | None:
        while self.requests and self.requests[0][0] <= now:
            _, first, count = self.requests.popleft()
            self.stats["requested_already_sent"] += sum(1 for p in range(first, first + count) if self.sent[p])
            msgs = [m for p, n in self._runs(first, count, self.chunk, urgent=True)
                    for m in self._pages_message(p, n, True)]
            if msgs:
                return msgs
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

    # -- the loops

    def _read_requests(self, data: bytes | None = None) -> bool:
        """Drain the return path (or take ``data`` already read from it); False at EOF or SHUT."""
        if data is None:
            try:
                data = self.stream.recv(1 << 16)
            except BlockingIOError:
                return True
        if not data:
            return False
        if self.link.unlimited and self.rp.idstr is not None and not self.rp.buf and not self.out_urgent.q:
            # the common case, in C: a run of plain REQ_PAGES answered at once (csrc/source.c)
            self.fast.id_known = 1
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

    def _command(self) -> bool | None:
        """Read one control message: True = start the background stream, None = nothing, False = EOF."""
        msg = self.control.recv(0)
        if msg is None:
            return False  # the orchestrator is gone
        if msg.get("cmd") == "go":
            return bool(msg.get("background", True)) or None
        if msg.get("cmd") == "stream":  # demand-only runs: send the rest now
            return True
        if msg.get("cmd") == "precopy":  # run --precopy: RAM goes first while the guest dirties it
            from postcopy_core.precopy import run_precopy

            self.stats["precopy"] = run_precopy(self, msg)
            self.control.send(event="precopy-done", stats=self.stats["precopy"])
        return None

    def _next_batch(self) -> bool:
        """Hand the C lane the next batch of the stream order; False when the order is done."""
        self._batch = next(self._batches, None)
        p = self.pump
        if self._batch is None:
            p.order, p.norder, p.pos = ffi.NULL, 0, 0
            return False
        p.order = ffi.cast("uint32_t *", ffi.from_buffer(self._batch))
        p.norder, p.pos = len(self._batch), 0
        return True

    def _run_direct(self) -> None:
        """Unlimited link: the C lane streams and answers; Python handles the rest (see the top)."""
        sockets = {id(self.out_urgent): self.urgent, id(self.out_stream): self.stream}
        streaming = False
        while True:
            if self.requests:  # requests the Python parser took: answered through the outbox
                self._schedule(False)
            waiting = [sockets[id(o)] for o in (self.out_urgent, self.out_stream) if o.q and not o.flush()]
            if waiting:  # the C lane writes only to sockets with nothing of ours half-sent
                rl, _, _ = select.select([self.control.sock], waiting, [])
                if rl and self._command() is False:
                    return
                continue
            self.fast.id_known = int(self.rp.idstr is not None and not self.rp.buf)
            rc = lib.pch_source_pump(self.fast, self.pump)
            if rc < 0:
                raise OSError(-rc, f"sending pages: {os.strerror(-rc)}")
            if rc == lib.PCH_SERVE_EOF:
                return
            if rc == lib.PCH_SERVE_REST:
                if not self._read_requests(bytes(ffi.buffer(self._rest, self.pump.rest_len))):
                    return
            elif rc == lib.PCH_SERVE_CONTROL:
                cmd = self._command()
                if cmd is False:
                    return
                if cmd and not streaming and not self.eos_sent:
                    streaming = True
                    self._batches = sequential_batches(self.spec.npages)
                    self._next_batch()
            elif rc == lib.PCH_SERVE_MORE and not self._next_batch():
                self.out_stream.push(page_header(MSG_EOS, 0, 0, self.spec.page_size))
                self.eos_sent = True

    def _run_modelled(self) -> None:
        """A modelled link: every message waits for its slot on the wire and its arrival time."""
        streaming = False
        ctl = self.control.sock
        while True:
            # what is due goes out: modelled messages whose arrival time came, then new work
            self._deliver(time.monotonic_ns())
            if streaming or self.requests:
                self._schedule(streaming)
                self._deliver(time.monotonic_ns())
            urgent_done = not self.out_urgent.q or self.out_urgent.flush()
            stream_done = not self.out_stream.q or self.out_stream.flush()
            timeout = None
            if self.in_flight or self.requests or self.link_free > time.monotonic_ns():
                nxt = [t for t in (self.in_flight[0][0] if self.in_flight else None,
                                   self.requests[0][0] if self.requests else None, self.link_free) if t]
                timeout = max(0.0, (min(nxt) - time.monotonic_ns()) / 1e9)
            elif streaming and not self.eos_sent and stream_done:
                timeout = 0.0
            wlist = ([] if urgent_done else [self.urgent]) + ([] if stream_done else [self.stream])
            rl, _, _ = select.select([self.stream, ctl], wlist, [], timeout)
            if self.stream in rl and not self._read_requests():
                return
            if ctl in rl:
                cmd = self._command()
                if cmd is False:
                    return
                streaming = streaming or bool(cmd)

    def run(self) -> dict:
        """Send HELLO, wait for 'go', serve until the destination shuts the return path."""
        hello = encode_hello(self.geo)
        self.out_stream.push(hello)
        self.out_urgent.push(hello)
        self.control.send(event="ready")
        if self.link.unlimited:
            self._run_direct()
        else:
            self._run_modelled()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.stats["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 3)
        self.stats["all_sent"] = self.sent.count(0) == 0
        self.stats["pages_background"] += self.fast.pages_stream
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
