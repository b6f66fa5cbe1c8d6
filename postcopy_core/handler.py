"""The destination: fault handler and placement in one event loop.

QEMU splits these into a fault thread (poll the uffds, ask for pages) and a listen thread (receive
pages, place them).  Here both are methods of one loop over epoll(uffds + stream + urgent + quit
eventfd), which keeps their shared state (waiters, received map) free of locks and the fault path
free of cross-thread wakeups.

Fault path (QEMU's postcopy_ram_fault_thread):
  read a batch of uffd_msg -> page, vCPU (ptid -> vCPU map; unknown ptid = non-vCPU fault) ->
  page already placed?  UFFDIO_WAKE that uffd at once : remember the waiter, request the page once.
Placement (QEMU's postcopy_place_page + postcopy_notify_shared_wake):
  UFFDIO_COPY (UFFDIO_ZEROPAGE / a zeroed huge page) through the first waiter's uffd, which wakes
  it for free; mark the page received; UFFDIO_WAKE the other uffds that may have a waiter.

Pages without a waiter go in through the destination's own mapping and uffd (the "carrier"),
so placement never depends on a worker still being alive.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import struct
import time

from postcopy_core import kernel
from postcopy_core.channel import ControlLine, Outbox
from postcopy_core.content import ContentSpec, check_page
from postcopy_core.kernel import KernelError, Uffd
from postcopy_core.protocol import (
    FLAG_URGENT,
    MSG_EOS,
    MSG_PAGES,
    MSG_ZERO,
    FrameReader,
    Geometry,
    ProtocolError,
    encode_req_pages,
    encode_shut,
)
from postcopy_core.ramblock import ReceivedMap

WAKE_WAITERS = "waiters"  # wake only uffds whose fault we have read for that page
WAKE_ALL = "all"  # wake every uffd for every placed page (QEMU's shared-wake behaviour)
WAKE_POLICIES = (WAKE_WAITERS, WAKE_ALL)

# One event record for the accounting engines: t_ns, RAM offset, vcpu (-1 = non-vCPU), tid,
# kind, flag.  kind F = fault (flag: page already received), P = placed (flag: zero page).
EVENT = struct.Struct("<qQiIBB")
EV_FAULT = ord("F")
EV_PLACED = ord("P")


class Port:
    """A worker's uffd as the handler holds it."""

    __slots__ = ("vcpu", "pid", "uffd", "base", "alive")

    def __init__(self, vcpu: int, pid: int, uffd: Uffd, base: int) -> None:
        self.vcpu, self.pid, self.uffd, self.base = vcpu, pid, uffd, base
        self.alive = True


class HandlerError(RuntimeError):
    """The destination cannot go on (lost source, impossible kernel answer); one clear line."""


class Destination:
    """State and loop of the destination process."""

    def __init__(self, geo: Geometry, spec: ContentSpec, memfd: int, hugetlb: bool, received: ReceivedMap,
                 ports: list[Port], stream: socket.socket, urgent: socket.socket, quit_fd: int,
                 control: ControlLine, events: socket.socket | None, wake_policy: str = WAKE_WAITERS) -> None:
        self.geo, self.spec, self.received = geo, spec, received
        self.ps = geo.page_size
        self.shift = self.ps.bit_length() - 1
        self.ports = ports
        self.tid_map = {p.pid: p.vcpu for p in ports}  # each worker is one single-threaded process
        self.stream, self.urgent, self.quit_fd, self.control = stream, urgent, quit_fd, control
        self.events = events
        self.evbuf = bytearray()
        self.wake_policy = wake_policy
        features = kernel.FEATURE_MISSING_HUGETLBFS if hugetlb else kernel.FEATURE_MISSING_SHMEM
        # the carrier: our own view of guest RAM, through which pages nobody waits for go in
        self.mapping = kernel.mmap_fd(memfd, geo.ram_size)
        self.carrier = Port(-1, os.getpid(), Uffd.open(features), self.mapping.addr)
        self.carrier.uffd.register(self.mapping.addr, geo.ram_size)
        self.hugetlb = hugetlb
        self.zero_page = kernel.mmap_anon(self.ps) if hugetlb else None
        self.waiters: dict[int, list[Port]] = {}  # page -> ports with a read fault on it (= requested)
        self.pending: list[int] = []  # pages to request at the end of this loop turn
        self.rp = Outbox(stream)  # the return path rides the stream socket backwards
        self.sent_id = False
        self.readers = {stream.fileno(): FrameReader(8 << 20), urgent.fileno(): FrameReader(8 << 20)}
        # a fixed C pointer to each receive buffer: payloads go to UFFDIO_COPY without a copy
        self.reader_ptr = {fd: kernel.ffi.from_buffer(r.buf) for fd, r in self.readers.items()}
        self.placed = 0
        self.eos = False
        self.stats = dict(faults=0, faults_vcpu=0, faults_non_vcpu=0, faults_already_received=0,
                          requests=0, pages_requested=0, placed_urgent=0, placed_background=0, placed_zero=0,
                          duplicates=0, wakes=0, copy_eexist=0, dead_ports=0, other_events=0)

    # ------------------------------------------------------------ fault path

    def on_faults(self, port: Port) -> None:
        u = port.uffd
        n = u.read_raw()
        if n == 0:
            return
        t = time.monotonic_ns()
        addrs, ptids = u.fault_addr, u.fault_ptid
        base, shift, ps = port.base, self.shift, self.ps
        recv = self.received.view
        waiters, tid_map = self.waiters, self.tid_map
        pack, evbuf = EVENT.pack, self.evbuf
        st = self.stats
        st["faults"] += n
        for i in range(n):
            addr = addrs[i]
            page = (addr - base) >> shift
            ptid = ptids[i]
            vcpu = tid_map.get(ptid, -1)
            already = recv[page]
            evbuf += pack(t, page << shift, vcpu, ptid, EV_FAULT, already)
            if already:
                # placed since the kernel queued this fault: the waiter only needs a wake
                st["faults_already_received"] += 1
                self._wake(port, base + (page << shift), ps)
                continue
            w = waiters.get(page)
            if w is None:
                waiters[page] = [port]
                self.pending.append(page)
            elif port not in w:
                w.append(port)
        st["faults_vcpu"] += sum(1 for i in range(n) if ptids[i] in tid_map)
        st["faults_non_vcpu"] = st["faults"] - st["faults_vcpu"]

    def flush_requests(self) -> None:
        """Send the pages asked for in this turn as REQ_PAGES, adjacent pages merged."""
        if not self.pending:
            return
        pages = self.pending
        self.pending = []
        ps, shift = self.ps, self.shift
        out = []
        run_start = prev = pages[0]
        for p in pages[1:] + [-2]:
            if p == prev + 1:
                prev = p
                continue
            idstr = None if self.sent_id else self.geo.idstr
            self.sent_id = True
            out.append(encode_req_pages(run_start << shift, (prev - run_start + 1) * ps, idstr))
            run_start = prev = p
        self.stats["requests"] += len(out)
        self.stats["pages_requested"] += len(pages)
        self.rp.push(b"".join(out))
        self.rp.flush()

    # ------------------------------------------------------------ placement

    def on_pages(self, fd: int) -> bool:
        """Receive and place what the channel has; False when it reached EOF."""
        reader = self.readers[fd]
        sock = self.stream if fd == self.stream.fileno() else self.urgent
        while True:
            n = reader.recv_from(sock)
            if n <= 0:
                break
            for f in reader.frames():
                if f.mtype == MSG_PAGES or f.mtype == MSG_ZERO:
                    self._place_frame(self.reader_ptr[fd], f)
                elif f.mtype == MSG_EOS:
                    self.eos = True
            if n < 1 << 16:
                break
        return not reader.eof

    def _place_frame(self, src, f) -> None:
        """Place the pages of one frame; ``src`` points at the receive buffer holding its payload."""
        recv, waiters, shift = self.received.view, self.waiters, self.shift
        zero = f.mtype == MSG_ZERO
        first = f.offset >> shift
        end = first + f.count
        p = first
        while p < end:
            if recv[p]:
                self.stats["duplicates"] += 1  # a background copy of a page that came urgently
                p += 1
                continue
            ws = waiters.pop(p, None)
            if ws is not None:
                q = p + 1
            else:  # a run nobody waits for goes in with one ioctl
                q = p + 1
                while q < end and not recv[q] and q not in waiters:
                    q += 1
            at = None if zero else f.data_at + ((p - first) << shift)
            self._place(p, q - p, src, at, ws, f.flags & FLAG_URGENT)
            p = q

    def _place(self, page: int, count: int, src, at: int | None, ws: list[Port] | None, urgent: int) -> None:
        ps, shift = self.ps, self.shift
        off = page << shift
        length = count * ps
        via = ws[0] if ws else self.carrier
        while True:
            try:
                if at is None and not self.hugetlb:
                    via.uffd.zeropage(via.base + off, length)
                elif at is None:
                    for k in range(count):
                        via.uffd.copy(via.base + off + k * ps, self.zero_page.addr, ps)
                else:
                    via.uffd.copy(via.base + off, src + at, length)
                break
            except KernelError as e:
                if e.errno == errno.EEXIST:
                    self.stats["copy_eexist"] += 1  # already in the page cache: count it, still wake
                    break
                if e.errno in (errno.ESRCH, errno.ENOENT) and via is not self.carrier:
                    self._port_dead(via)  # the waiter's process is gone; go in through the carrier
                    via = self.carrier
                    continue
                raise
        t = time.monotonic_ns()
        self.received.view[page : page + count] = b"\x01" * count
        self.placed += count
        st = self.stats
        st["placed_urgent" if urgent else "placed_background"] += count
        if at is None:
            st["placed_zero"] += count
        pack, evbuf, zero = EVENT.pack, self.evbuf, at is None
        for k in range(count):
            evbuf += pack(t, off + (k << shift), -1, 0, EV_PLACED, zero)
        # wake the sharers: the copy woke only waiters on the uffd it went through
        if self.wake_policy == WAKE_ALL:
            for port in self.ports:
                if port is not via and port.alive:
                    self._wake(port, port.base + off, length)
        elif ws:
            for port in ws[1:]:
                self._wake(port, port.base + off, length)

    def _wake(self, port: Port, addr: int, length: int) -> None:
        if not port.alive:
            return
        try:
            port.uffd.wake(addr, length)
            self.stats["wakes"] += 1
        except KernelError as e:
            if e.errno not in (errno.ESRCH, errno.ENOENT):
                raise
            self._port_dead(port)

    def _port_dead(self, port: Port) -> None:
        if port.alive:
            port.alive = False
            self.stats["dead_ports"] += 1

    # ------------------------------------------------------------ loop

    def flush_events(self) -> None:
        if self.evbuf and self.events is not None:
            self.events.sendall(self.evbuf)
        self.evbuf.clear()

    @property
    def complete(self) -> bool:
        return self.placed >= self.geo.npages

    def run(self) -> dict:
        ep = select.epoll()
        by_fd: dict[int, Port] = {}
        for port in self.ports:
            ep.register(port.uffd.fd, select.EPOLLIN)
            by_fd[port.uffd.fd] = port
        chan = {self.stream.fileno(), self.urgent.fileno()}
        for fd in chan:
            ep.register(fd, select.EPOLLIN)
        ep.register(self.quit_fd, select.EPOLLIN)
        quitting = False
        last_progress = time.monotonic()
        try:
            while not (quitting and self.complete):
                events = ep.poll(1.0)
                for fd, mask in events:
                    port = by_fd.get(fd)
                    if port is not None:
                        if mask & (select.EPOLLERR | select.EPOLLHUP):
                            ep.unregister(fd)
                            self._port_dead(port)
                        else:
                            self.on_faults(port)
                    elif fd in chan:
                        if not self.on_pages(fd):
                            ep.unregister(fd)
                            chan.discard(fd)
                            if not self.complete:
                                raise HandlerError("the source closed a page channel before every page arrived")
                    elif fd == self.quit_fd:
                        os.eventfd_read(self.quit_fd)
                        quitting = True
                self.flush_requests()
                self.flush_events()
                if events:
                    last_progress = time.monotonic()
                elif quitting and time.monotonic() - last_progress > 30:
                    raise HandlerError(f"no page arrived for 30 s with {self.geo.npages - self.placed} pages missing")
        finally:
            ep.close()
        self.rp.push(encode_shut(0))
        self.rp.sock.setblocking(True)
        self.rp.flush()
        return self.finish()

    def finish(self) -> dict:
        """Check every byte of RAM now that all pages are in, and sum up."""
        bad_pages = 0
        spec = self.spec
        ref = None
        if spec.image:
            from postcopy_core.content import Image

            ref = Image(spec)
        for page in range(self.geo.npages):
            if check_page(self.mapping.addr + (page << self.shift), spec, page, ref):
                bad_pages += 1
        if ref is not None:
            ref.close()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.stats.update(placed=self.placed, ram_pages_verified=self.geo.npages, ram_bad_pages=bad_pages,
                          cpu_s=round(ru.ru_utime + ru.ru_stime, 3), eos=self.eos,
                          other_events=sum(p.uffd.other_events for p in self.ports))
        return self.stats


def destination_main(dest_args: dict) -> int:
    """Entry point of the destination process (after fork): build, run, report on the control line."""
    control: ControlLine = dest_args["control"]
    try:
        dest = Destination(**dest_args)
        stats = dest.run()
        dest.flush_events()
    except (ProtocolError, HandlerError, KernelError) as e:
        control.send(event="error", error=f"fault handler: {e}")
        return 3
    control.send(event="stats", stats=stats)
    return 0
