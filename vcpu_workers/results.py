"""The results area the vCPU workers write and the orchestrator reads.

A memfd (no name in /dev/shm, gone with the last fd and mapping) that the orchestrator creates and
hands to the zygote, so workers that were exec'd apart still share it.  Layout: one
``struct pch_worker_result`` per vCPU, then per vCPU ``capacity`` latencies (uint32 ns) and
``capacity`` page numbers of its faulting accesses.  Workers write it through cffi (no numpy in a
worker); the orchestrator reads it as numpy arrays.
"""

from __future__ import annotations

import os

from postcopy_core import kernel
from postcopy_core._uffd import ffi

RESULT = ffi.sizeof("struct pch_worker_result")
STATE_NONE, STATE_READY, STATE_DONE, STATE_FAILED = 0, 1, 2, 3
FIELDS = ("vcpu", "pid", "state", "accesses", "faulting", "stall_ns", "max_ns", "all_ns", "pages_checked",
          "words_checked", "mismatches", "first_bad_page", "t_start", "t_end", "t_forked", "t_ready")
_SIGNED = {"vcpu", "pid", "state", "first_bad_page"}


def layout(nvcpus: int, capacity: int) -> tuple[int, int, int]:
    """(offset of the latencies, offset of the pages, total size) of an area."""
    lat = -(-RESULT * nvcpus // 4096) * 4096
    pages = lat + 4 * nvcpus * capacity
    return lat, pages, pages + 4 * nvcpus * capacity


class WorkerSlot:
    """One worker's view: its result record and its latency/page arrays (cffi pointers)."""

    def __init__(self, fd: int, nvcpus: int, capacity: int, vcpu: int) -> None:
        lat, pages, size = layout(nvcpus, capacity)
        self.mapping = kernel.mmap_fd(fd, size)
        self.result = ffi.cast("struct pch_worker_result *", self.mapping.addr + RESULT * vcpu)
        self.lat_ns = ffi.cast("uint32_t *", self.mapping.addr + lat + 4 * capacity * vcpu)
        self.lat_page = ffi.cast("uint32_t *", self.mapping.addr + pages + 4 * capacity * vcpu)


class ResultsArea:
    """The orchestrator's side: ``summary`` (numpy records, one per vCPU) and the latencies."""

    def __init__(self, nvcpus: int, capacity: int) -> None:
        import numpy as np

        self.nvcpus, self.capacity = nvcpus, capacity
        lat, pages, size = layout(nvcpus, capacity)
        self.fd = kernel.memfd_create("pch-results")
        os.ftruncate(self.fd, size)
        self.mapping = kernel.mmap_fd(self.fd, size)
        buf = self.mapping.buffer()
        dtype = np.dtype([(f, "<i8" if f in _SIGNED else "<u8") for f in FIELDS])
        assert dtype.itemsize == RESULT
        self.summary = np.frombuffer(buf, dtype=dtype, count=nvcpus)
        self.lat_ns = np.frombuffer(buf, dtype=np.uint32, count=nvcpus * capacity, offset=lat).reshape(nvcpus, -1)
        self.lat_page = np.frombuffer(buf, dtype=np.uint32, count=nvcpus * capacity, offset=pages).reshape(nvcpus, -1)

    def latencies(self, vcpu: int):
        n = int(self.summary[vcpu]["faulting"])
        return self.lat_ns[vcpu, :n]

    def close(self) -> None:
        """Unmap and close; copy out what you need first."""
        del self.summary, self.lat_ns, self.lat_page
        self.mapping.close()
        os.close(self.fd)
