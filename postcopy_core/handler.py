"""The destination: fault handler and placement in one event loop.

QEMU splits these into a fault thread (poll the uffds, ask for pages) and a listen thread (receive
pages, place them).  Here both live in one loop over epoll(uffds + stream + urgent + quit eventfd),
which keeps their shared state (waiters, received map) free of locks and the fault path free of
cross-thread wakeups.  That loop is C (``pch_dest_run`` in csrc/dest.c), since Python cannot keep
up with the kernel there; its tunables are :class:`DestPolicy` (defaults documented there), handed
to C at set-up.  This module sets the destination up, calls the C loop in
turns of a few ms (the GIL released), ships the event records it buffered, tells the orchestrator
when postcopy starts, declares a stuck run, and drives postcopy recovery:

Fault path (QEMU's postcopy_ram_fault_thread), ``read_faults`` and ``request_page``:
  read a batch of uffd_msg -> page, vCPU (ptid -> vCPU map; unknown ptid = non-vCPU fault) ->
  page already placed?  UFFDIO_WAKE that uffd at once : remember the waiter, request the page once.
Placement (QEMU's postcopy_place_page + postcopy_notify_shared_wake), ``place_page``/``place_zero``:
  UFFDIO_COPY (UFFDIO_ZEROPAGE / a zeroed huge page) through the first waiter's uffd, which wakes
  it for free; mark the page received; UFFDIO_WAKE the other uffds that may have a waiter.

Pages without a waiter go in through the destination's own mapping and uffd (the "carrier"), so
placement never depends on a worker still being alive.

Postcopy recovery (QEMU's postcopy-paused, migrate-recover): when a page channel ends before every
page is in (the source died, the link dropped), the destination goes to ``postcopy-paused`` and says
so on the control line.  It keeps every uffd open and keeps reading faults (they wait, as requests
for the next source); nothing is placed, so no vCPU ever sees a page the source did not send.  The
orchestrator answers with a new source's channels (``resume``); the destination drops what the old
source half sent, sends its received map and asks again for every page a fault waits for
(``pch_dest_reconnect``, ``postcopy-recover``), and is ``postcopy-active`` again once the new source
said HELLO on both channels.

``--place continue`` (PLACE_CONTINUE): the workers register MINOR faults too, our mapping stays
unregistered and is populated with zeroed pages at start; a page is written into the page cache
through it (big frames received straight into place) and each waiter gets UFFDIO_CONTINUE.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib
from postcopy_core.board import AccessBoard
from postcopy_core.channel import ControlLine
from postcopy_core.content import ContentSpec
from postcopy_core.kernel import KernelError, Uffd
from postcopy_core.layouts import struct_format
from postcopy_core.plant import plant_code
from postcopy_core.protocol import Geometry, ProtocolError, encode_shut
from postcopy_core.ramblock import ReceivedMap

if TYPE_CHECKING:
    from postcopy_core.precopy import GenerationMap

WAKE_WAITERS = "waiters"  # wake only uffds whose fault we have read for that page
WAKE_ALL = "all"  # wake every uffd for every placed page (QEMU's shared-wake behaviour)
WAKE_POLICIES = (WAKE_WAITERS, WAKE_ALL)

PLACE_COPY = "copy"  # UFFDIO_COPY / ZEROPAGE through a uffd: the kernel copies the page into place
PLACE_CONTINUE = "continue"  # write the page cache through our own mapping, UFFDIO_CONTINUE the waiters
PLACE_MODES = (PLACE_COPY, PLACE_CONTINUE)

# One event record for the accounting engines (csrc/dest.h, struct pch_event, the one declaration):
# t (ns), RAM offset, vcpu (-1 = non-vCPU), tid, kind, flag.  kind F = fault (flag: page already
# received), P = placed (flag: zero page).
EVENT = struct_format("struct pch_event")
EV_FAULT = ord("F")
EV_PLACED = ord("P")
LOOP_BUDGET_MS = 50  # the C loop returns this often to ship events and watch the clock
PAUSED_BUDGET_MS = 10  # paused: the loop also looks at the control line for a new source this often
ACTIVE, PAUSED, RECOVER = "postcopy-active", "postcopy-paused", "postcopy-recover"  # QEMU's state names
NO_PROGRESS_S = 30.0

STAT_FIELDS = ("faults", "faults_vcpu", "faults_already_received", "requests", "pages_requested", "placed",
               "placed_urgent", "placed_background", "placed_zero", "duplicates", "wakes", "copy_eexist",
               "dead_ports", "eos", "frames", "board_wakes", "t_last_place", "reconnects", "re_requested",
               "placed_precopy", "discarded", "precopy_rewrites", "discard_msgs", "faults_discarded",
               "requests_discarded", "t_postcopy_start", "planted",
               "direct_skipped", "rp_full", "spin_ns")

# how the destination gets a new source's channels from the orchestrator's ``resume`` message (and
# the fds it carried): a pair of connected page-channel sockets (stream, urgent)
Reconnect = Callable[[dict, list[int]], tuple[socket.socket, socket.socket]]


@dataclass(frozen=True)
class DestPolicy:
    """The destination loop's tunables (csrc/dest.h, ``struct pch_dest_policy``), with the defaults
    every run uses.  Passed to ``pch_dest_new``; the C loop has no constants of its own for these.

    rx_turn: bytes one read from a page channel may take (1 MiB).  The loop serves the uffds and the
      urgent channel between reads (and between the stream's frames), so this bounds how long a
      background burst can hold a fault back, while a read still carries many 4 KiB frames.
    direct_min: with ``--place continue``, PAGES frames of at least this many bytes (64 KiB) are
      received straight into guest RAM, without the copy through the receive buffer; after placing
      one the loop reads the faults its placement woke at once, so the source gets their requests
      while we take the rest (asked only at the end of the turn, they waited ~1 ms).
    events_ship: ``pch_dest_run`` returns once this many event-record bytes wait (1 MiB), so Python
      ships them in big batches and memory stays bounded.
    spin_ns: after a turn, look for the next event this long (40 µs, yielding the CPU between looks)
      before sleeping in epoll_wait: the next fault or answer is usually microseconds away, and a
      sleeping loop costs its sender a wake-up IPI.  Not while the stream flows.  0: sleep at once.
      40 µs rather than 20: at 8 vCPUs one spin in ten found nothing within 20 µs, and the sleep
      and wake-up that followed cost more than the longer look (2-core VM, 4 runs each,
      alternated, medians: 8 vCPUs 73k -> 82k faults/s, 128 94k -> 111k; 1 and 32 vCPUs unchanged
      within the noise; 80 µs lost at 1 vCPU).
    urgent_turns: reads in a row the urgent channel may take in one turn (16): answers come whole
      (a huge page must not come at the stream's pace) but cannot starve the uffds.
    board_scan_slots: the access board (postcopy_core/board.py) is scanned once per
      ``vCPUs / board_scan_slots`` placements (at least 1), i.e. at most this many slots (64) read
      per placed page: with few vCPUs a scan per page, with thousands one per batch.

    A run (harness/run.py) takes the defaults, changed by ``PCH_DEST_POLICY`` (``policy_from_env``)
    where it is set, and hands the handler the result.
    """

    rx_turn: int = 1 << 20
    direct_min: int = 64 << 10
    events_ship: int = 1 << 20
    spin_ns: int = 40_000
    urgent_turns: int = 16
    board_scan_slots: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.rx_turn <= lib.PCH_RX_CAP:
            raise ValueError(f"destination policy: rx_turn {self.rx_turn} must be 1..{lib.PCH_RX_CAP}")
        for name in ("direct_min", "events_ship", "urgent_turns", "board_scan_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"destination policy: {name} must be at least 1")
        if self.spin_ns < 0:
            raise ValueError("destination policy: spin_ns must be 0 or more")

    def to_c(self):
        """A ``struct pch_dest_policy *`` with these values (keep it alive while pch_dest_new runs)."""
        return ffi.new("struct pch_dest_policy *", dict(
            rx_turn=self.rx_turn, direct_min=self.direct_min, events_ship=self.events_ship,
            spin_ns=self.spin_ns, urgent_turns=self.urgent_turns, board_scan_slots=self.board_scan_slots))


def policy_from_env(text: str | None) -> DestPolicy:
    """``PCH_DEST_POLICY``, e.g. ``spin_ns=0,rx_turn=262144``: the defaults with those fields
    changed, for tuning runs and benchmarks (bench/README.md); unset or empty: the defaults."""
    if not text:
        return DestPolicy()
    fields = {f.name for f in dataclasses.fields(DestPolicy)}
    values = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise ValueError(f"PCH_DEST_POLICY: {item!r}: give name=value pairs, names {', '.join(sorted(fields))}")
        try:
            values[name] = int(value)
        except ValueError:
            raise ValueError(f"PCH_DEST_POLICY: {name}={value!r} is not a whole number") from None
    return DestPolicy(**values)


DEFAULT_POLICY = DestPolicy()


class Port:
    """A worker's uffd as the handler holds it."""

    __slots__ = ("vcpu", "pid", "uffd", "base")

    def __init__(self, vcpu: int, pid: int, uffd: Uffd, base: int) -> None:
        self.vcpu, self.pid, self.uffd, self.base = vcpu, pid, uffd, base


class HandlerError(RuntimeError):
    """The destination cannot go on (lost source, impossible kernel answer); one clear line."""


class Destination:
    """State and loop of the destination process."""

    def __init__(self, geo: Geometry, spec: ContentSpec, memfd: int, hugetlb: bool, received: ReceivedMap,
                 ports: list[Port], stream: socket.socket, urgent: socket.socket, quit_fd: int,
                 control: ControlLine, events: socket.socket | None, wake_policy: str = WAKE_WAITERS,
                 board: AccessBoard | None = None, no_progress_s: float = NO_PROGRESS_S,
                 reconnect: Reconnect | None = None, share_channels: bool = False,
                 gens: GenerationMap | None = None, place: str = PLACE_COPY, plant: str | None = None,
                 policy: DestPolicy = DEFAULT_POLICY) -> None:
        self.geo, self.spec, self.received, self.ports = geo, spec, received, ports
        self.quit_fd, self.control, self.events = quit_fd, control, events
        features = kernel.FEATURE_MISSING_HUGETLBFS if hugetlb else kernel.FEATURE_MISSING_SHMEM
        # the carrier: our own view of guest RAM, through which pages nobody waits for go in
        self.mapping = kernel.mmap_fd(memfd, geo.ram_size)
        self.carrier_uffd = Uffd.open(features)
        self.zero_page = None
        if place == PLACE_CONTINUE:
            # pages are written through this mapping, so it stays unregistered; every page is put in
            # the page cache now, zeroed, so that placing one later is one copy and no allocation (the
            # workers registered MINOR as well: they trap on every page until it is CONTINUEd to them)
            kernel.populate_write(self.mapping)
        else:
            self.carrier_uffd.register(self.mapping.addr, geo.ram_size)
            self.zero_page = kernel.mmap_anon(geo.page_size) if hugetlb else None

        self.c_ports = ffi.new("struct pch_port[]", max(1, len(ports)))
        for i, p in enumerate(ports):
            self.c_ports[i].fd, self.c_ports[i].alive, self.c_ports[i].vcpu = p.uffd.fd, 1, p.vcpu
            self.c_ports[i].pid, self.c_ports[i].base = p.pid, p.base
        self.c_carrier = ffi.new("struct pch_port *", dict(fd=self.carrier_uffd.fd, alive=1, vcpu=-1,
                                                           pid=os.getpid(), base=self.mapping.addr))
        # each worker is one single-threaded process: its pid is its vCPU thread's id; a port with
        # vcpu -1 (a non-vCPU process) stays out of the map, so its faults are non-vCPU faults
        tids = sorted((p.pid, p.vcpu) for p in ports if p.vcpu >= 0)
        self.c_tids = ffi.new("uint32_t[]", [t for t, _ in tids] or [0])
        self.c_tid_vcpu = ffi.new("int32_t[]", [v for _, v in tids] or [0])
        self.c_received = ffi.from_buffer("uint8_t[]", received.view)
        d = lib.pch_dest_new(geo.page_size, geo.npages, self.c_received, self.c_ports, len(ports), self.c_carrier,
                             self.c_tids, self.c_tid_vcpu, len(tids), int(hugetlb),
                             self.zero_page.addr if self.zero_page else 0, int(wake_policy == WAKE_ALL),
                             geo.idstr.encode(), board.slots if board else ffi.NULL, board.nvcpus if board else 0,
                             policy.to_c())
        if d == ffi.NULL:
            raise HandlerError("out of memory for the destination's page tables")
        self.d = ffi.gc(d, lib.pch_dest_free)
        if place == PLACE_CONTINUE:
            lib.pch_dest_set_continue(self.d, self.mapping.addr)
        if plant:  # run --plant-bug: misbehave on purpose (postcopy_core/plant.py)
            lib.pch_dest_set_plant(self.d, plant_code(plant))
        self.stats_c = lib.pch_dest_stats(self.d)
        self.stream, self.urgent = stream, urgent  # the return path rides the stream socket backwards
        self._len = ffi.new("uint64_t *")
        self.no_progress_s = no_progress_s  # the orchestrator's stall watch, which names who, comes first
        self.reconnect = reconnect  # None: a lost source fails the run (no recovery)
        self.share_channels = share_channels  # TCP: hand the orchestrator our channel fds (for link-drop)
        self.state = ACTIVE
        self.gen = 0  # which source the channels belong to (the orchestrator's resume counts them)
        # run --precopy: pages come before postcopy starts, DISCARDs drop some; every page is checked
        # against the generation the source published at the switchover (postcopy_core/precopy.py)
        self.gens = gens
        self.postcopy_told = gens is None
        if gens is not None:
            lib.pch_dest_set_precopy(self.d, memfd)

    def _c_failed(self, what: str) -> HandlerError:
        text = ffi.string(lib.pch_dest_error(self.d)).decode()
        if os.strerror(errno.ENOMEM) in text:  # say which resource ran out
            from postcopy_core.probe import available_memory, free_huge_pages

            text += (f" (out of huge pages: {free_huge_pages()} free; reserve more in /proc/sys/vm/nr_hugepages)"
                     if self.zero_page is not None else
                     f" (out of memory: {available_memory() >> 20} MiB available, MemAvailable in /proc/meminfo)")
        return HandlerError(f"{what}: {text}")

    # ------------------------------------------------------------ loop

    def ship_events(self) -> None:
        """Hand the event records gathered so far to the accounting (the orchestrator)."""
        ptr = lib.pch_dest_events(self.d, self._len)
        if self._len[0]:
            if self.events is not None:
                self.events.sendall(ffi.buffer(ptr, self._len[0]))
            lib.pch_dest_clear_events(self.d)

    @property
    def placed(self) -> int:
        return self.stats_c.placed

    @property
    def complete(self) -> bool:
        return self.stats_c.placed >= self.geo.npages

    # ------------------------------------------------------------ loop

    def run(self) -> dict:
        """Serve faults and place pages until told to quit and every page is in."""
        # two epoll sets (see dest.h): faults and urgent pages in `pri`, and again in `ep` with the rest
        pri, ep = select.epoll(), select.epoll()
        fds = [p.uffd.fd for p in self.ports] + [self.stream.fileno(), self.urgent.fileno(), self.quit_fd]
        port_of_fd = ffi.new("int32_t[]", [-1] * (max(fds + [pri.fileno()]) + 1))
        for i, port in enumerate(self.ports):
            port_of_fd[port.uffd.fd] = i
        for fd in [p.uffd.fd for p in self.ports] + [self.urgent.fileno()]:
            pri.register(fd, select.EPOLLIN)  # data.fd = fd, which the C loop dispatches on
            ep.register(fd, select.EPOLLIN)  # flat: one epoll_wait per wake-up (dest.h)
        for fd in (self.stream.fileno(), self.quit_fd):
            ep.register(fd, select.EPOLLIN)
        loop = ffi.new("struct pch_dest_loop *", dict(
            epfd=ep.fileno(), pri_epfd=pri.fileno(), quit_fd=self.quit_fd, stream_fd=self.stream.fileno(),
            urgent_fd=self.urgent.fileno(), port_of_fd=port_of_fd, nfds=len(port_of_fd)))
        quitting = False
        idle_since = None
        try:
            while not (quitting and self.complete):
                budget = LOOP_BUDGET_MS if self.state == ACTIVE else PAUSED_BUDGET_MS
                rc = lib.pch_dest_run(self.d, loop, budget)  # the GIL is released in there
                if rc < 0:
                    raise self._c_failed("destination")
                self.ship_events()
                if not self.postcopy_told and self.stats_c.t_postcopy_start:  # the vCPUs may start now
                    self.control.send(event="postcopy", t_ns=int(self.stats_c.t_postcopy_start))
                    self.postcopy_told = True
                quitting = quitting or bool(loop.quit_seen)
                if rc == lib.PCH_RUN_EOF and not self.complete:
                    if self.reconnect is None:
                        raise HandlerError("the source closed a page channel before every page arrived")
                    self._pause(loop, ep, pri, "a page channel ended before every page arrived")
                if self.state != ACTIVE:
                    self._recovery_turn(loop, ep, pri)
                    idle_since = None  # a pause has the orchestrator's deadline, not this one
                    continue
                # a whole turn of silence while pages are missing and the workers are done: stuck
                if quitting and loop.idle_ns >= LOOP_BUDGET_MS * 900_000:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > self.no_progress_s:
                        missing = self.geo.npages - self.placed
                        raise HandlerError(f"no page arrived for {self.no_progress_s:g} s with {missing} pages missing")
                else:
                    idle_since = None
        finally:
            ep.close()
            pri.close()
        try:
            self.stream.setblocking(True)
            self.stream.sendall(encode_shut(0))
        except OSError:
            pass  # every page is in: a source that went away meanwhile is owed nothing
        return self.finish()

    # ------------------------------------------------------------ postcopy recovery

    def _pause(self, loop, ep: select.epoll, pri: select.epoll, why: str) -> None:
        """postcopy-paused: drop the dead channels, keep serving faults, tell the orchestrator."""
        for sock, epset in ((self.stream, ep), (self.urgent, pri), (self.urgent, ep)):
            try:
                epset.unregister(sock.fileno())
            except (OSError, ValueError):
                pass  # the C loop took it out at EOF already
            sock.close()
        loop.stream_fd = loop.urgent_fd = -1
        self.state = PAUSED
        self.control.send(event="paused", gen=self.gen, why=why, placed=self.placed)

    def _recovery_turn(self, loop, ep: select.epoll, pri: select.epoll) -> None:
        """Paused: take a new source when the orchestrator gives one.  Recovering: active again
        once the new source said HELLO on both channels."""
        if self.state == RECOVER:
            if lib.pch_dest_hellos(self.d) == 2:
                self.state = ACTIVE
                msg = dict(event="resumed", gen=self.gen, placed=self.placed)
                if self.share_channels:
                    self.control.send_fds([self.stream.fileno(), self.urgent.fileno()], **msg)
                else:
                    self.control.send(**msg)
            return
        if not select.select([self.control.sock], [], [], 0)[0] and b"\n" not in self.control.buf:
            return
        msg = self.control.recv(1.0)
        if msg is None:
            raise HandlerError("the orchestrator closed the control line while the destination was paused")
        fds = self.control.take_fds(int(msg.get("nfds", 0)))
        if msg.get("cmd") != "resume":
            for fd in fds:
                os.close(fd)
            return
        self.gen = int(msg.get("gen", self.gen + 1))
        try:
            self.stream, self.urgent = self.reconnect(msg, fds)
        except OSError as e:  # ConnectionError, AuthError...: still paused, the orchestrator tries again
            self.control.send(event="paused", gen=self.gen, why=f"cannot reach the new source: {e}",
                              placed=self.placed)
            return
        loop.stream_fd, loop.urgent_fd = self.stream.fileno(), self.urgent.fileno()
        ep.register(loop.stream_fd, select.EPOLLIN)
        pri.register(loop.urgent_fd, select.EPOLLIN)
        ep.register(loop.urgent_fd, select.EPOLLIN)
        self.state = RECOVER
        rc = lib.pch_dest_reconnect(self.d, loop.stream_fd)
        if rc == -errno.EPIPE or rc < 0 and -rc in (errno.ECONNRESET, errno.ENOTCONN):
            self._pause(loop, ep, pri, "the new source went away during the resume")
        elif rc < 0:
            raise self._c_failed("resume")

    def finish(self) -> dict:
        """Sum up (the orchestrator checks every byte of RAM once every process is gone)."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        stats = {name: int(getattr(self.stats_c, name)) for name in STAT_FIELDS}
        stats["faults_non_vcpu"] = stats["faults"] - stats["faults_vcpu"]
        stats.update(eos=bool(stats["eos"]),
                     cpu_s=round(ru.ru_utime + ru.ru_stime, 3),
                     other_events=sum(self.c_ports[i].other_events for i in range(len(self.ports))))
        return stats


def destination_main(dest_args: dict) -> int:
    """Entry point of the destination process (after fork): build, run, report on the control line."""
    control: ControlLine = dest_args["control"]
    try:
        stats = Destination(**dest_args).run()
    except (ProtocolError, HandlerError, KernelError) as e:
        control.send(event="error", error=f"fault handler: {e}")
        return 3
    control.send(event="stats", stats=stats)
    return 0
