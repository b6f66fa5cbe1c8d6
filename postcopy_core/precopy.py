"""Precopy before postcopy (``run --precopy SECONDS --dirty-rate PAGES_PER_S``), on the source side.

What QEMU does before it switches to postcopy, in miniature:
- the source sends RAM in rounds while the guest keeps running and dirtying it.  Here the guest runs
  "on the source" only as a model: :class:`Dirtier` rewrites pages of the source's image at the given
  rate, each rewrite bumping the page's *generation*, from which its content follows (csrc/pch.c,
  ``pch_fill_page_gen``), so every page stays verifiable.  The first round sends every page; each
  later round (a dirty-log sync, at most every ``SYNC_S``) sends again the pages dirtied since they
  went, and the destination overwrites its old copy (nobody reads it yet: its vCPUs wait for postcopy).
- at the switchover the guest stops on the source; pages dirtied since they were last sent are
  stale at the destination: the source sends their ranges in DISCARD commands of at most 12 ranges
  (QEMU's batch), the destination drops them (a hole punched in guest RAM, the received map cleared)
  so that they fault again, then POSTCOPY_START.  Those pages are unsent again, so the postcopy
  stream or a request brings their final content.
- the generation of each page lives in a :class:`GenerationMap` shared by the source (writer, during
  precopy only), the vCPU workers and the fault handler's final check (readers, after the switchover):
  every page is verified against its final content.
"""

from __future__ import annotations

import os
import select
import time

import numpy as np

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.protocol import (
    DISCARD_MAX_RANGES,
    MSG_PAGES,
    MSG_ZERO,
    encode_discards,
    encode_postcopy_start,
    page_header,
)

SYNC_S = 0.1  # a new round (QEMU: a dirty-log sync) starts at most this often, once the last one is sent
DIRTY_SEED = 0xD1D7  # the dirtying's own random stream, from the run's --seed: runs repeat exactly
IDLE_S = 0.005  # with nothing to send, the loop still wakes this often to dirty on time
AHEAD = 1 << 20  # precopy bytes allowed to sit unsent in the outbox
IN_FLIGHT = 64  # messages on a modelled wire at once
MAX_DIRTY_STEP = 1 << 16  # rewrites per loop turn at most: a rate the model cannot keep up with lags, not hogs memory


def _size(npages: int) -> int:
    """Bytes of a generation map, whole pages (vcpu_workers/worker.py maps it with the same size)."""
    return -(-max(1, npages) * 4 // 4096) * 4096


class GenerationMap:
    """One uint32 per page in a memfd: how many times the guest rewrote it during precopy.

    The orchestrator creates it (``fd`` goes to the source and the workers; the handler keeps the
    mapping over fork); ``fd`` given: map an existing one (the source, which writes it)."""

    def __init__(self, npages: int, fd: int | None = None) -> None:
        self.npages = npages
        self.owner = fd is None
        if fd is None:
            fd = kernel.memfd_create("pch-generations")
            os.ftruncate(fd, _size(npages))
        self.fd = fd
        self.mapping = kernel.mmap_fd(fd, _size(npages))
        self.pointer = ffi.cast("uint32_t *", self.mapping.addr)
        self.array = np.frombuffer(self.mapping.buffer(), dtype=np.uint32, count=npages)

    def close(self) -> None:
        self.array = None
        self.mapping.close()
        if self.owner:
            os.close(self.fd)


def stale_ranges(stale: np.ndarray) -> list[tuple[int, int]]:
    """Runs of pages marked in ``stale`` (one byte per page) as (first page, count), in order."""
    edges = np.diff(np.concatenate(([0], (np.asarray(stale) != 0).astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist(), strict=True))


class Dirtier:
    """The guest, while it still runs on the source: rewrites random pages at ``rate`` pages/s."""

    def __init__(self, src, gens: GenerationMap, rate: float, seed: int) -> None:
        self.src, self.gens, self.rate = src, gens, rate
        self.rng = np.random.default_rng([seed, DIRTY_SEED])
        self.t0 = time.monotonic()
        self.done = 0
        self.stale = np.zeros(src.spec.npages, dtype=np.uint8)  # sent, then rewritten: the copy there is old

    def next_due(self) -> float:
        """When the next rewrite is due (monotonic seconds)."""
        return self.t0 + (self.done + 1) / self.rate if self.rate > 0 else float("inf")

    def until(self, now: float) -> None:
        """Make the rewrites due by ``now``."""
        due = min(int(self.rate * (now - self.t0)) - self.done, MAX_DIRTY_STEP)
        if due <= 0:
            return
        src, spec = self.src, self.src.spec
        for page in self.rng.integers(0, spec.npages, due).tolist():
            gen = int(self.gens.array[page]) + 1
            self.gens.array[page] = gen
            write_generation(src, page, gen)
            if src.sent[page]:
                src.sent[page] = 0  # to send again: in the next round, or after a discard
                self.stale[page] = 1
        self.done += due


class Precopy:
    """The precopy phase of one source (a :class:`postcopy_core.source.Source`); :meth:`run` returns its stats."""

    def __init__(self, src, seconds: float, rate: float, gens: GenerationMap, skip_discards: int = 0) -> None:
        self.src, self.seconds, self.gens = src, seconds, gens
        self.dirtier = Dirtier(src, gens, rate, src.spec.seed)
        self.skip_discards = skip_discards  # tests only: "forget" that many ranges, which verification must catch
        self.order = np.zeros(0, dtype=np.int64)
        self.pos = 0
        self.rounds = 0
        self.last_sync = 0.0
        self.pages_sent = 0

    # -- what to send

    def _sync(self, now: float) -> bool:
        """Start a round over every unsent page (all of RAM the first time); False if none is."""
        self.order = np.flatnonzero(np.frombuffer(self.src.sent, dtype=np.uint8) == 0)
        self.pos, self.last_sync = 0, now
        if len(self.order):
            self.rounds += 1
        return bool(len(self.order))

    def _next_message(self) -> list | None:
        """Header (+ data) of the next run of consecutive unsent pages of one kind in the round."""
        src, order = self.src, self.order
        sent, zero = src.sent, src.zero
        while self.pos < len(order) and sent[order[self.pos]]:
            self.pos += 1
        if self.pos >= len(order):
            return None
        first = int(order[self.pos])
        n = 1
        while (n < src.chunk and self.pos + n < len(order) and order[self.pos + n] == first + n
               and not sent[first + n] and zero[first + n] == zero[first]):
            n += 1
        self.pos += n
        sent[first : first + n] = bytes([lib.PCH_SENT_STREAM]) * n
        self.dirtier.stale[first : first + n] = 0
        self.pages_sent += n
        ps = src.spec.page_size
        if zero[first]:
            return [page_header(MSG_ZERO, first * ps, n, ps)]
        return [page_header(MSG_PAGES, first * ps, n, ps), src.image.mapping.buffer(first * ps, n * ps)]

    # -- the wire

    def _room(self, now_ns: int) -> bool:
        src = self.src
        return src.link_free <= now_ns and src.out_stream.queued <= AHEAD and len(src.in_flight) <= IN_FLIGHT

    def _wait(self, until: float, flushed: bool) -> None:
        """Sleep until ``until`` (monotonic s), a modelled arrival, or room on the stream socket."""
        src = self.src
        t = until
        if src.in_flight:
            t = min(t, src.in_flight[0][0] / 1e9)
        if src.link_free > time.monotonic_ns():
            t = min(t, src.link_free / 1e9)
        timeout = max(0.0, t - time.monotonic())
        select.select([], [] if flushed else [src.stream], [], timeout)

    def _drain(self) -> None:
        """Everything emitted so far reaches the socket (modelled arrivals included)."""
        src = self.src
        while src.in_flight or src.out_stream.q:
            src._deliver(time.monotonic_ns())
            flushed = not src.out_stream.q or src.out_stream.flush()
            if src.in_flight or not flushed:
                self._wait(time.monotonic() + 1.0, flushed)

    # -- the phase

    def run(self) -> dict:
        src, dirtier = self.src, self.dirtier
        t_end = time.monotonic() + self.seconds
        self._sync(time.monotonic())
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            dirtier.until(now)
            now_ns = time.monotonic_ns()
            src._deliver(now_ns)
            flushed = not src.out_stream.q or src.out_stream.flush()
            if self._room(now_ns):
                msg = self._next_message()
                if msg is None and now - self.last_sync >= SYNC_S and self._sync(now):
                    msg = self._next_message()
                if msg is not None:
                    src._emit(msg, False, now_ns)
                    continue
                wake = min(t_end, dirtier.next_due(), self.last_sync + SYNC_S, now + IDLE_S)
            else:
                wake = min(t_end, dirtier.next_due(), now + IDLE_S)
            self._wait(wake, flushed)
        # the switchover: the guest stops here; what it dirtied since it was sent is dropped there
        ranges = stale_ranges(dirtier.stale)
        kept = ranges[: self.skip_discards]
        ranges = ranges[self.skip_discards :]
        commands = 0
        for i in range(0, len(ranges), DISCARD_MAX_RANGES):
            src._emit([encode_discards(ranges[i : i + DISCARD_MAX_RANGES], src.spec.page_size)], False,
                      time.monotonic_ns())
            commands += 1
        for first, count in kept:  # tests only: left stale there, yet marked as sent
            src.sent[first : first + count] = bytes([lib.PCH_SENT_STREAM]) * count
        src._emit([encode_postcopy_start()], False, time.monotonic_ns())
        self._drain()
        return dict(seconds=self.seconds, rounds=self.rounds, pages_sent=self.pages_sent, pages_dirtied=dirtier.done,
                    pages_discarded=sum(n for _, n in ranges), discard_ranges=len(ranges),
                    discard_commands=commands, pages_stale_kept=sum(n for _, n in kept))


def write_generation(src, page: int, gen: int) -> None:
    """Make ``page`` of the source's image its content at generation ``gen`` (never all zeros)."""
    spec = src.spec
    lib.pch_fill_page_gen(src.image.pointer(page), spec.seed, page, gen, spec.page_size, spec.zero_permille)
    src.zero[page] = 0


def adopt_generations(src, gens_fd: int) -> int:
    """A replacement source after precopy (postcopy recovery): rewrite its fresh image to the final
    generations the first source published, so that what it sends is what the workers check against.
    Returns the number of pages rewritten."""
    gens = GenerationMap(src.spec.npages, fd=gens_fd)
    try:
        pages = np.flatnonzero(gens.array).tolist()
        for page in pages:
            write_generation(src, page, int(gens.array[page]))
        return len(pages)
    finally:
        gens.close()


def run_precopy(src, msg: dict) -> dict:
    """The source's "precopy" command: run the phase, return its stats (the report's precopy section)."""
    gens = GenerationMap(src.spec.npages, fd=int(msg["gens_fd"]))
    try:
        return Precopy(src, float(msg["seconds"]), float(msg.get("dirty_rate", 0)), gens,
                       int(msg.get("skip_discards", 0))).run()
    finally:
        gens.close()
