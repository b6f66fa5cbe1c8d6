"""The access board: which page each vCPU is touching right now, so a placed page wakes its waiters.

In QEMU every vCPU thread faults through one shared uffd, so the UFFDIO_COPY that places a page
wakes every thread blocked on it, whatever placed it.  Here each vCPU is a process with a uffd of
its own, and a copy wakes only the waiters of the uffd it went through: a vCPU blocked on a page
that the background stream placed through the handler's own mapping would sleep until the
handler read its fault message.  So each worker writes the page it is about to touch (page + 1;
0 = none) into its 8-byte slot, and the destination (csrc/dest.c, ``board_flush``) scans the slots
(one contiguous array) and wakes exactly the uffds whose vCPU sits on a page just placed.  It scans
once per batch of placements and at the end of every receive, not per page (the batch size is
dest.c's, ``board_batch``): a scan reads every slot, and at thousands of vCPUs one scan per page
cost more than the page.  A wake that comes before the vCPU went to sleep is lost, which
is harmless: its fault message is still queued, and the handler wakes it when it reads it.

A memfd (no name anywhere), created by the orchestrator, handed to the zygote like the results area;
the handler, forked from the orchestrator, keeps the orchestrator's mapping.
"""

from __future__ import annotations

import os

from postcopy_core import kernel
from postcopy_core._uffd import ffi, lib

SLOT = 8


def board_size(nvcpus: int) -> int:
    """Bytes of a board for ``nvcpus`` vCPUs and its finish line, whole pages."""
    return -(-(max(1, nvcpus) + 1) * SLOT // 4096) * 4096


class AccessBoard:
    """One uint64 slot per vCPU in shared memory: ``fd`` for the workers, ``slots`` for the handler."""

    def __init__(self, nvcpus: int) -> None:
        self.nvcpus = nvcpus
        size = board_size(nvcpus)
        self.fd = kernel.memfd_create("pch-board")
        os.ftruncate(self.fd, size)
        self.mapping = kernel.mmap_fd(self.fd, size)
        self.slots = ffi.cast("uint64_t *", self.mapping.addr)
        # the slot after the vCPUs': how many vCPUs are past their timed loop (see pch.h); each
        # checks its pages once all are, so no check takes the CPU from a vCPU still faulting
        self.finish_line = ffi.cast("uint32_t *", self.slots + nvcpus)

    def count_lost(self) -> None:
        """A vCPU died before its finish line: cross it on its behalf, or the others would wait for
        it (one crossing too many, for a vCPU that died after its own, only starts a check early)."""
        lib.pch_finish_line_cross(self.finish_line, self.nvcpus)

    def close(self) -> None:
        self.mapping.close()
        os.close(self.fd)


def worker_slot(fd: int, nvcpus: int, vcpu: int):
    """A worker's own slot (a ``uint64_t *``), and the mapping that keeps it alive."""
    mapping = kernel.mmap_fd(fd, board_size(nvcpus))
    return ffi.cast("uint64_t *", mapping.addr) + vcpu, mapping
