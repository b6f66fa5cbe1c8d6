"""The source: owns the RAM image, answers page requests first, streams the rest in the background.

Like QEMU's source in postcopy: requested pages (the return path) jump the queue and go out on
the urgent channel; the background stream walks RAM in order and skips pages already sent.  What
goes next (the stream's order, the pages pushed after an answer, which channel answers take) is the
strategy's choice (postcopy_core/strategies.py); the loops below only carry it out.

Two loops, one per kind of link:
- unlimited (the default): the strategy picks what to stream, in batches of page numbers
  (:meth:`Strategy.stream_batches`), and the C lane (csrc/source.c, ``pch_source_pump``) moves the
  bytes: it answers plain requests the moment they arrive and writes the batch's pages as stream
  frames between them.  Python steps in only for commands, the first request (which names the RAM
  block) and anything odd, which the return-path reader reports exactly (both decode with the one
  parser, csrc/wire.h's ``pch_rp_parse``).
- modelled (``--link``): everything passes through the link model (postcopy_core.link) in Python,
  one message at a time on the modelled wire, urgent pages first.  With their own channel (preempt)
  the stream runs a few messages ahead on the wire and an answer overtakes those not yet started;
  with one channel (vanilla) the stream may run BACKGROUND_AHEAD bytes ahead, as into a socket's
  send buffer, and an answer takes its place at the end of that FIFO.

A source started for postcopy recovery (``resume=True``) first reads the destination's received map
(RECV_BITMAP ... RESUME on the return path): those pages count as sent (:meth:`Source.resume_from`),
so it answers the re-sent requests first and streams only the rest.
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
from postcopy_core.strategies import STREAM_BATCH, Preempt, Strategy, sequential_batches

BACKGROUND_CHUNK = 256 << 10  # bytes per background message: big enough to amortise, small enough to preempt
BACKGROUND_AHEAD = 1 << 20  # background bytes allowed to sit in the outbox before we wait
WIRE_SLOT_NS = 200_000  # on a modelled link an urgent page waits for at most this much stream on the wire
PREEMPT_AHEAD_SLOTS = 4  # own channel: stream messages scheduled ahead on the modelled wire (overtaken by answers)
SENT_STREAM, SENT_URGENT = lib.PCH_SENT_STREAM, lib.PCH_SENT_URGENT
REQUESTED_CAP = 4096  # requested pages the C lane records for a strategy between two returns
__all__ = ["STREAM_BATCH", "Source", "sequential_batches", "source_main"]  # the first and third moved to strategies


class Source:
    """One source process's state; :meth:`run` is its main loop."""

    def __init__(self, spec: ContentSpec, geo: Geometry, stream: socket.socket, urgent: socket.socket,
                 link: Link, control: ControlLine, strategy: Strategy | None = None,
                 resume: bool = False, plant: str | None = None) -> None:
        self.spec, self.geo, self.link, self.control = spec, geo, link, control
        self.plant = plant  # run --plant-bug (harness/plant.py): misbehave on purpose
        self.resuming = resume  # postcopy recovery: the destination's received map comes first
        self.stream, self.urgent = stream, urgent
        self.strategy = strategy or Preempt()
        self.one_channel = not self.strategy.own_channel  # answers queue behind the stream (vanilla)
        self.image = Image(spec)
        words = np.frombuffer(self.image.mapping.buffer(), dtype=np.uint64).reshape(spec.npages, -1)
        # per page, 1 byte each: which pages go as ZERO messages, which were sent (bytes index fast)
        self.zero = bytearray((~words.any(axis=1)).astype(np.uint8).tobytes())  # precopy's dirtying clears it
        self.sent = bytearray(spec.npages)
        self._rest = ffi.new("uint8_t[]", 1 << 16)  # what the C serve loop hands back to the parser
        # the C answer lane shares these maps and counts into its own struct (merged in run())
        answers = stream if self.one_channel else urgent
        self.fast = ffi.new("struct pch_source *", dict(
            fd=answers.fileno(), image=self.image.pointer(), zero=ffi.from_buffer(self.zero),
            sent=ffi.from_buffer(self.sent), page_size=spec.page_size, ram_size=spec.size))
        self.pump = ffi.new("struct pch_pump *", dict(
            rp_fd=stream.fileno(), ctl_fd=control.fileno(), stream_fd=stream.fileno(),
            rest=self._rest, cap=len(self._rest), spin=int(self.strategy.name == "demand")))
        self._batch = None  # the batch of page numbers the C lane is streaming (kept alive here)
        # see pch.h, pch_source_answer; one channel: the streamed copy is ahead of any answer anyway
        self.resend_streamed = spec.page_size < BACKGROUND_CHUNK and not self.one_channel
        self.fast.resend_streamed = int(self.resend_streamed)
        if self.strategy.wants_requests:  # only then does the C lane record requested pages
            self._requested = ffi.new("uint32_t[]", REQUESTED_CAP)
            self.fast.requested, self.fast.requested_cap = self._requested, REQUESTED_CAP
        self.rp = ReturnPathReader(geo)
        self.fast.rp = self.rp.c  # the C lane checks requests against the reader's state (one parser)
        self.out_stream, self.out_urgent = Outbox(stream), Outbox(urgent)
        self.out_answers = self.out_stream if self.one_channel else self.out_urgent  # where answers go
        self.cursor = 0  # next index of self._order the modelled stream looks at
        self._order = np.zeros(0, dtype=np.uint32)  # the modelled stream's current batch
        self._batches = iter(())
        self.pushes: deque[int] = deque()  # pages the strategy wants sent next (modelled / parser path)
        self.chunk = max(1, BACKGROUND_CHUNK // spec.page_size)
        if link.bytes_per_s is not None:  # small enough that an urgent page never waits long behind one
            self.chunk = max(1, min(self.chunk, int(link.bytes_per_s * WIRE_SLOT_NS / 1e9) // spec.page_size))
        self.pump.max_run = self.chunk
        # how far ahead of now the stream may be scheduled on a modelled wire: one channel, a send
        # buffer's worth (an answer joins its end); own channel, a few messages, so that the wire does
        # not idle while this loop wakes up (an answer overtakes them: _unschedule)
        self.overtake = not self.one_channel and not link.unlimited
        self.ahead_ns = 0 if link.unlimited else (link.wire_ns(BACKGROUND_AHEAD) if self.one_channel
                                                  else PREEMPT_AHEAD_SLOTS * WIRE_SLOT_NS)
        self.max_in_flight = 64 + (BACKGROUND_AHEAD // (self.chunk * spec.page_size) if self.ahead_ns else 0)
        self.requests: deque[tuple[int, int, int]] = deque()  # (ready_ns, first page, count)
        self.link_free = 0  # when the modelled wire is idle again
        self.delays = link.delays(spec.seed)  # each crossing's latency, jitter and loss (postcopy_core.link)
        # heap of (arrive_ns, seq, urgent channel, bufs, start_ns, overtakable, nbytes): the modelled wire
        self.in_flight: list[tuple] = []
        self.seq = 0
        self.eos_sent = False
        self.stats = dict(pages_urgent=0, pages_background=0, pages_zero=0, bytes_sent=0, requests=0,
                          requested_already_sent=0, pages_prepaged=0, strategy=self.strategy.name)

    # -- what to send

    def _pages_message(self, first: int, count: int, urgent: bool, pushed: bool = False) -> list:
        """Header (+ data) for ``count`` pages of one kind starting at ``first``; marks them sent
        (``pushed``: the strategy's pages next, on the answers' channel but not urgent)."""
        ps = self.spec.page_size
        self.sent[first : first + count] = bytes([SENT_URGENT if urgent or pushed else SENT_STREAM]) * count
        key = "pages_urgent" if urgent else "pages_prepaged" if pushed else "pages_background"
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
            if self.strategy.wants_requests:
                self._ask_strategy(np.array([first], dtype=np.uint32))
            self.stats["requested_already_sent"] += sum(1 for p in range(first, first + count) if self.sent[p])
            msgs = [m for p, n in self._runs(first, count, self.chunk, urgent=True)
                    for m in self._pages_message(p, n, True)]
            if msgs:
                return msgs
        return None

    def _ask_strategy(self, pages: np.ndarray) -> None:
        """Queue what the strategy wants sent after the answers to ``pages`` (modelled / parser path)."""
        more = self.strategy.on_request(pages, self.spec.npages)
        if more is not None:
            self.pushes.extend(more.tolist())

    def _next_push(self) -> list | None:
        """The strategy's next pages: a run of consecutive unsent pages of one kind, as one message."""
        pushes, sent, zero = self.pushes, self.sent, self.zero
        while pushes:
            first = pushes.popleft()
            if sent[first]:
                continue
            n = 1
            while pushes and n < self.chunk and pushes[0] == first + n and not sent[first + n] \
                    and zero[first + n] == zero[first]:
                pushes.popleft()
                n += 1
            return self._pages_message(first, n, False, pushed=True)
        return None

    def _next_background(self) -> list | None:
        """The next stream message: a run of unsent pages of one kind, in the strategy's order."""
        order, sent, zero = self._order, self.sent, self.zero
        while True:
            while self.cursor < len(order) and sent[order[self.cursor]]:
                self.cursor += 1
            if self.cursor < len(order):
                break
            self._order = order = next(self._batches, None)
            self.cursor = 0
            if order is None:
                self._order = np.zeros(0, dtype=np.uint32)
                return None
        first = int(order[self.cursor])
        n = 1
        while (self.cursor + n < len(order) and n < self.chunk and order[self.cursor + n] == first + n
               and not sent[first + n] and zero[first + n] == zero[first]):
            n += 1
        self.cursor += n
        return self._pages_message(first, n, False)

    # -- the link

    def _emit(self, bufs: list, urgent: bool, now: int, push: bool = False) -> None:
        """Send ``bufs`` (answers' channel if ``urgent``, else the stream), through the link model;
        an answer (urgent, not a ``push``) overtakes what has not started on the wire (preempt)."""
        overtakable = push or not urgent
        nbytes = sum(memoryview(b).nbytes for b in bufs)
        self.stats["bytes_sent"] += nbytes
        urgent = urgent and not self.one_channel  # one channel: answers join the stream's FIFO
        if self.link.unlimited:
            if not urgent and self.pump.part_len[0] + self.pump.part_len[1]:
                self._finish_frame()  # never inside the C lane's half-written frame
            (self.out_urgent if urgent else self.out_stream).push(*bufs)
            return
        later = self._unschedule(now) if self.overtake and not overtakable else []
        self._put_on_wire(bufs, nbytes, urgent, now, overtakable)
        for e in later:  # the stream (and pushes) taken back go on behind, in their order
            self._put_on_wire(e[3], e[6], e[2], now, True)

    def _put_on_wire(self, bufs: list, nbytes: int, urgent: bool, now: int, overtakable: bool) -> None:
        start = max(now, self.link_free)
        self.link_free = start + self.link.wire_ns(nbytes)
        self.seq += 1
        arrive = self.delays.arrival_ns(self.link_free, "urgent" if urgent else "stream")
        heapq.heappush(self.in_flight, (arrive, self.seq, urgent, bufs, start,
                                        overtakable, nbytes))

    def _unschedule(self, now: int) -> list:
        """Take back the messages an answer may overtake (stream, pushes) that have not started on
        the wire yet: with its own channel an answer waits only for the message being sent."""
        later = [e for e in self.in_flight if e[5] and e[4] > now]
        if not later:
            return []
        self.in_flight = [e for e in self.in_flight if not (e[5] and e[4] > now)]
        heapq.heapify(self.in_flight)
        self.link_free = min(e[4] for e in later)  # answers are never behind them (they overtook)
        return sorted(later, key=lambda e: e[1])

    def _wire_wake(self) -> int | None:
        """When the modelled wire next takes a stream message (its FIFO has room); None if it does now
        (then _schedule had nothing it could send: arrivals, requests and the sockets wake the loop)."""
        now = time.monotonic_ns()
        wake = self.link_free - self.ahead_ns
        return wake if wake > now else None

    def _deliver(self, now: int) -> None:
        while self.in_flight and self.in_flight[0][0] <= now:
            entry = heapq.heappop(self.in_flight)
            (self.out_urgent if entry[2] else self.out_stream).push(*entry[3])

    def _schedule(self, streaming: bool) -> None:
        """Put messages on the (modelled) wire while it has room: answers first (with their own channel at
        once, overtaking), then the strategy's pushes, then the stream."""
        while True:
            now = time.monotonic_ns()
            room = self.link_free <= now + self.ahead_ns  # the wire (or the stream's FIFO) takes more
            msgs = self._next_urgent(now) if room or self.overtake else None
            if msgs is not None:
                self._emit(msgs, True, now)
                continue
            if not room:
                return
            msgs = self._next_push()
            if msgs is not None:
                self._emit(msgs, True, now, push=True)
                continue
            if (not streaming or self.out_stream.queued > BACKGROUND_AHEAD
                    or len(self.in_flight) > self.max_in_flight):
                return
            msgs = self._next_background()
            if msgs is None:
                if not self.eos_sent and not self.in_flight:
                    self.out_stream.push(page_header(MSG_EOS, 0, 0, self.spec.page_size))
                    self.eos_sent = True
                return
            self._emit(msgs, False, now)

    # -- postcopy recovery

    def resume_from(self, received: bytes | bytearray) -> None:
        """A replacement source: every page the destination holds (its received map, one byte per
        page) counts as sent, so neither the stream nor an answer sends it again."""
        have = np.frombuffer(bytes(received), np.uint8) != 0
        if self.plant == "resend-overwrite":  # planted: ignore the map, stream every page again
            have[:] = False
        sent = np.frombuffer(self.sent, np.uint8)  # the bytes the C lane reads too
        sent[have & (sent == 0)] = SENT_STREAM
        self.stats["pages_skipped_resume"] = int(have.sum())

    def _await_resume(self, timeout: float = 120.0) -> bool:
        """Read the return path until the destination's received map is in (RESUME); requests that
        come with it are queued.  False if the destination went away first."""
        self.out_stream.flush()
        self.out_urgent.flush()
        deadline = time.monotonic() + timeout
        while not self.rp.resumed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError(f"no received map (RESUME) from the destination within {timeout:g} s")
            if select.select([self.stream], [], [], left)[0] and not self._read_requests():
                return False
        self.resume_from(self.rp.received)
        return True

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
        if self.link.unlimited and self.rp.idstr is not None and not self.rp.buf and not self.out_answers.q:
            # the common case, in C: a run of plain REQ_PAGES answered at once (csrc/source.c)
            self.fast.id_known = 1
            if self.one_channel:
                self._finish_frame()
            used = lib.pch_source_answer(self.fast, ffi.from_buffer(data), len(data))
            if used < 0:
                raise OSError(-used, f"sending urgent pages: {os.strerror(-used)}")
            self._push_requested()
            data = data[used:]
            if not data:
                return True
        requests = self.rp.feed(data)  # anything else: the reader (the same C parser), with its exact errors
        self.stats["requests"] += len(requests)
        ps = self.spec.page_size
        ready = self.delays.arrival_ns(time.monotonic_ns(), "requests")  # the request's own trip over the link
        for req in requests:  # sent by _schedule, urgent first
            self.requests.append((ready, req.offset // ps, req.length // ps))
        return self.rp.shut is None

    def _command(self) -> bool | None:
        """Read the control messages that are in: True = start the background stream, None = nothing,
        False = EOF."""
        start = None
        while True:  # every message already read: "go" and "stream" may come in one read
            msg = self.control.recv(0)
            if msg is None:
                return False  # the orchestrator is gone
            if msg.get("cmd") == "go" and msg.get("background", True):
                start = True
            if msg.get("cmd") == "stream":  # demand-only runs: send the rest now
                start = True
            if msg.get("cmd") == "precopy":  # run --precopy: RAM goes first while the guest dirties it
                from postcopy_core.precopy import run_precopy

                self.stats["precopy"] = run_precopy(self, msg)
                self.control.send(event="precopy-done", stats=self.stats["precopy"])
            if b"\n" not in self.control.buf:
                return start

    def _finish_frame(self) -> None:
        rc = lib.pch_pump_finish(self.pump)
        if rc < 0:
            raise OSError(-rc, f"sending pages: {os.strerror(-rc)}")

    def _push_requested(self) -> None:
        """Hand the strategy the pages the C lane answered; push what it wants next, through C."""
        n = self.fast.requested_len
        if not n:
            return
        pages = np.frombuffer(ffi.buffer(self._requested, n * 4), dtype=np.uint32).copy()
        self.fast.requested_len = 0
        more = self.strategy.on_request(pages, self.spec.npages)
        if more is None or not more.size:
            return
        more = np.ascontiguousarray(more, dtype=np.uint32)
        sent = lib.pch_source_push(self.fast, ffi.cast("uint32_t *", ffi.from_buffer(more)), len(more))
        if sent < 0:
            raise OSError(-sent, f"pushing pages: {os.strerror(-sent)}")

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
            self._push_requested()
            if rc == lib.PCH_SERVE_REST:
                if not self._read_requests(bytes(ffi.buffer(self._rest, self.pump.rest_len))):
                    return
            elif rc == lib.PCH_SERVE_CONTROL:
                cmd = self._command()
                if cmd is False:
                    return
                if cmd and not streaming and not self.eos_sent:
                    streaming = True
                    self._batches = self.strategy.stream_batches(self.spec.npages)
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
                                   self.requests[0][0] if self.requests else None, self._wire_wake()) if t]
                timeout = max(0.0, (min(nxt) - time.monotonic_ns()) / 1e9) if nxt else None
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
                if cmd and not streaming:
                    self._batches = self.strategy.stream_batches(self.spec.npages)
                streaming = streaming or bool(cmd)

    def run(self) -> dict:
        """Send HELLO, wait for 'go', serve until the destination shuts the return path."""
        hello = encode_hello(self.geo)
        self.out_stream.push(hello)
        self.out_urgent.push(hello)
        self.control.send(event="ready")
        if self.resuming and not self._await_resume():
            pass  # the destination is gone again: nothing to serve
        elif self.link.unlimited:
            self._run_direct()
        else:
            self._run_modelled()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.stats["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 3)
        self.stats["all_sent"] = self.sent.count(0) == 0
        self.stats["pages_background"] += self.fast.pages_stream
        self.stats["pages_prepaged"] += self.fast.pages_pushed
        for key in ("requests", "pages_urgent", "pages_zero", "requested_already_sent", "bytes_sent"):
            self.stats[key] += getattr(self.fast, key)
        return self.stats


def source_main(spec: ContentSpec, geo: Geometry, stream: socket.socket, urgent: socket.socket,
                link: Link, control: ControlLine, strategy: Strategy | None = None, resume: bool = False,
                gens_fd: int | None = None, plant: str | None = None) -> int:
    """Entry point of the source process (after fork); ``strategy`` defaults to preempt; ``resume``: a
    new source for a paused destination (postcopy recovery), ``gens_fd`` the generations a precopy left."""
    try:
        src = Source(spec, geo, stream, urgent, link, control, strategy, resume, plant)
        if gens_fd is not None:
            from postcopy_core.precopy import adopt_generations

            src.stats["pages_regenerated"] = adopt_generations(src, gens_fd)
        stats = src.run()
    except ProtocolError as e:
        control.send(event="error", error=f"source: bad message from destination: {e}")
        return 3
    control.send(event="stats", stats=stats)
    return 0
