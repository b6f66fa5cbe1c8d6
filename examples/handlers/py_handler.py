"""py_handler.py - a userfaultfd page server in Python on postcopy-harness's own cffi binding.

    postcopy-harness run --handler "python3 examples/handlers/py_handler.py" --vcpus 16

It speaks the harness's own hand-off (``--handoff pch``, docs/handler-protocol.md): connect to the
SOCK_SEQPACKET socket in ``$PCH_HANDLER_SOCKET``; read a ``run`` message, one ``uffd`` message per
vCPU process with its uffd attached (SCM_RIGHTS), then ``end``; say ``ready``; serve faults from the
memory file until told ``quit``, then say what it did and exit.

The ioctls go through ``postcopy_core.kernel`` (UFFDIO_COPY/ZEROPAGE/WAKE, errors as KernelError
with the errno); the uffd messages are read raw (32 bytes each, ``struct uffd_msg``) so that
events other than page faults (UFFD_EVENT_REMOVE, FORK, REMAP, UNMAP) are seen too.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import select
import socket
import struct
import sys

from postcopy_core import kernel
from postcopy_core._uffd import ffi

MSG = struct.Struct("<B3xI24s")  # struct uffd_msg: event, reserved, the event's union
PAGEFAULT = struct.Struct("<QQI4x")  # flags, address, ptid
REMOVE = struct.Struct("<QQ8x")  # start, end
FORK = struct.Struct("<I20x")  # the child's new uffd (installed in this process by the read)
REMAP = struct.Struct("<QQQ")  # from, to, len (UNMAP's body is REMOVE's: start, end)
EVENT_PAGEFAULT, EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16


REMOVED: set[int] = set()  # file offsets of pages a REMOVE event dropped: zeros from now on, whoever faults


class Port:
    """One vCPU process's uffd, the region it covers and the pieces of it mremap moved."""

    def __init__(self, fd: int, msg: dict, moved: list[tuple[int, int, int]] | None = None) -> None:
        self.uffd = kernel.Uffd.adopt(fd)
        self.msg = msg
        self.base, self.size, self.offset = msg["base_host_virt_addr"], msg["size"], msg["offset"]
        self.page_size = msg["page_size"]
        self.moved = list(moved or [])  # (new base, length, file offset): UFFD_EVENT_REMAP

    def file_offset(self, addr: int) -> int | None:
        """The memory file offset behind ``addr`` in this process, or None if nothing of ours is there."""
        for base, length, offset in self.moved:
            if base <= addr < base + length:
                return offset + addr - base
        if self.base <= addr < self.base + self.size:
            return self.offset + addr - self.base
        return None

    def remapped(self, old: int, new: int, length: int) -> None:
        """mremap moved [old, old + length) to ``new``: its faults come there now, same file offsets."""
        offset = self.file_offset(old)
        if offset is not None:
            self.moved = [m for m in self.moved if m[0] != old] + [(new, length, offset)]

    def unmapped(self, start: int, end: int) -> None:
        """[start, end) is unmapped: a moved piece there is gone; a range of the region is mapped back,
        if at all, at the same address and file offset and registered again, so it is served as before."""
        self.moved = [m for m in self.moved if m[0] >= end or m[0] + m[1] <= start]


def serve(port: Port, addr: int, mem, stats: dict) -> None:
    """Place the page holding ``addr`` through the faulting process's own uffd."""
    ps = port.page_size
    at = port.file_offset(addr)
    if at is None:  # not ours: nothing to place
        return
    dst, src = addr // ps * ps, at // ps * ps
    try:
        if src in REMOVED:  # the memory is shared: the page reads zeros through every uffd
            REMOVED.discard(src)
            port.uffd.zeropage(dst, ps)
        else:
            port.uffd.copy(dst, mem + src, ps)
        stats["placed"] += 1
    except kernel.KernelError as e:
        if e.errno == errno.EEXIST:  # placed already (through another uffd): still wake our waiter
            port.uffd.wake(dst, ps)
            stats["eexist"] += 1
        elif e.errno != errno.ESRCH:  # ESRCH: the process is gone
            raise


def read_events(port: Port, mem, stats: dict, ports: dict, poller) -> bool:
    """Handle what the uffd holds; False once the process behind it is gone."""
    while True:
        try:
            data = os.read(port.uffd.fd, MSG.size * 64)
        except BlockingIOError:
            return True
        except OSError:
            return False
        for off in range(0, len(data) - len(data) % MSG.size, MSG.size):
            event, _, body = MSG.unpack_from(data, off)
            if event == EVENT_PAGEFAULT:
                stats["faults"] += 1
                serve(port, PAGEFAULT.unpack(body)[1], mem, stats)
            elif event == EVENT_REMOVE:
                start, end = REMOVE.unpack(body)
                stats["removes"] += 1
                REMOVED.update(o for a in range(start, end, port.page_size)
                               if (o := port.file_offset(a)) is not None)
            elif event == EVENT_REMAP:
                old, new, length = REMAP.unpack(body)
                port.remapped(old, new, length)
                stats["remaps"] += 1
            elif event == EVENT_UNMAP:
                port.unmapped(*REMOVE.unpack(body))
                stats["unmaps"] += 1
            elif event == EVENT_FORK:  # the child's address space is a copy of the parent's: same region, moves
                fd = FORK.unpack(body)[0]
                os.set_blocking(fd, False)
                ports[fd] = Port(fd, port.msg, port.moved)
                poller.register(fd, select.POLLIN)
                stats["forks"] += 1


def main() -> int:
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctl.connect(os.environ["PCH_HANDLER_SOCKET"])
    ports: dict[int, Port] = {}
    mem = None
    while True:
        data, fds, _, _ = socket.recv_fds(ctl, 65536, 1)
        if not data:
            return 1
        msg = json.loads(data)
        if msg["type"] == "run":
            with open(msg["mem_file"], "rb") as f:
                mem_map = mmap.mmap(f.fileno(), msg["size"], prot=mmap.PROT_READ)
            mem = int(ffi.cast("uintptr_t", ffi.from_buffer(mem_map)))  # the file's address here
        elif msg["type"] == "uffd":
            os.set_blocking(fds[0], False)  # poll() on a uffd needs O_NONBLOCK
            ports[fds[0]] = Port(fds[0], msg)
        elif msg["type"] == "end":
            break
    ctl.send(json.dumps({"type": "ready"}).encode())
    stats = dict.fromkeys(("faults", "placed", "eexist", "removes", "forks", "remaps", "unmaps"), 0)
    poller = select.poll()
    for fd in ports:
        poller.register(fd, select.POLLIN)
    poller.register(ctl, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == ctl.fileno():
                ctl.recv(65536)  # "quit" (or EOF: the harness is gone)
                ctl.send(json.dumps({"type": "stats", **stats}).encode())
                return 0
            if not read_events(ports[fd], mem, stats, ports, poller):
                poller.unregister(fd)


if __name__ == "__main__":
    sys.exit(main())
