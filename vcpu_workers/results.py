"""The results area the vCPU workers write and the orchestrator reads.

A memfd (no name in /dev/shm, gone with the last fd and mapping) that the orchestrator creates and
hands to the zygote, so workers that were exec'd apart still share it.  Layout: one
``struct pch_worker_result`` per vCPU, then per vCPU ``capacity`` latencies (uint32 ns),
``capacity`` page numbers and ``capacity`` start times (uint64 CLOCK_MONOTONIC ns, the clock of the
handler's events) of its faulting accesses: each is one stall interval [start, start + latency).
Workers write it through cffi (no numpy in a
worker); the orchestrator reads it as numpy arrays.
"""

from __future__ import annotations

import os

from postcopy_core import kernel
from postcopy_core._uffd import ffi
from postcopy_core.layouts import numpy_dtype

RESULT = ffi.sizeof("struct pch_worker_result")
STATE_NONE, STATE_READY, STATE_DONE, STATE_FAILED = 0, 1, 2, 3


def layout(nvcpus: int, capacity: int) -> tuple[int, int, int, int]:
    """(offset of the latencies, of the pages, of the start times, total size) of an area."""
    lat = -(-RESULT * nvcpus // 4096) * 4096
    pages = lat + 4 * nvcpus * capacity
    starts = pages + 4 * nvcpus * capacity  # 8-aligned: lat is page-aligned, both blocks 8*n*cap long
    return lat, pages, starts, starts + 8 * nvcpus * capacity


class WorkerSlot:
    """One worker's view: its result record and its latency/page/start arrays (cffi pointers)."""

    def __init__(self, fd: int, nvcpus: int, capacity: int, vcpu: int) -> None:
        lat, pages, starts, size = layout(nvcpus, capacity)
        self.mapping = kernel.mmap_fd(fd, size)
        self.result = ffi.cast("struct pch_worker_result *", self.mapping.addr + RESULT * vcpu)
        self.lat_ns = ffi.cast("uint32_t *", self.mapping.addr + lat + 4 * capacity * vcpu)
        self.lat_page = ffi.cast("uint32_t *", self.mapping.addr + pages + 4 * capacity * vcpu)
        self.lat_start = ffi.cast("uint64_t *", self.mapping.addr + starts + 8 * capacity * vcpu)


class ResultsArea:
    """The orchestrator's side: ``summary`` (numpy records, one per vCPU) and the latencies."""

    def __init__(self, nvcpus: int, capacity: int) -> None:
        import numpy as np

        self.nvcpus, self.capacity = nvcpus, capacity
        lat, pages, starts, size = layout(nvcpus, capacity)
        self.fd = kernel.memfd_create("pch-results")
        os.ftruncate(self.fd, size)
        self.mapping = kernel.mmap_fd(self.fd, size)
        buf = self.mapping.buffer()
        dtype = numpy_dtype("struct pch_worker_result")
        self.summary = np.frombuffer(buf, dtype=dtype, count=nvcpus)
        self.lat_ns = np.frombuffer(buf, dtype=np.uint32, count=nvcpus * capacity, offset=lat).reshape(nvcpus, -1)
        self.lat_page = np.frombuffer(buf, dtype=np.uint32, count=nvcpus * capacity, offset=pages).reshape(nvcpus, -1)
        self.lat_start = np.frombuffer(buf, dtype=np.uint64, count=nvcpus * capacity, offset=starts).reshape(nvcpus, -1)

    def latencies(self, vcpu: int):
        n = int(self.summary[vcpu]["faulting"])
        return self.lat_ns[vcpu, :n]

    def stalls(self, page_size: int, nvcpus: int | None = None):
        """The stall intervals of the first ``nvcpus`` rows (default all: the vCPUs; rows after them
        are non-vCPU processes), a copy, as ``StallColumns``, addresses as RAM offsets."""
        import numpy as np

        from postcopy_core.blocktime.events import StallColumns

        nvcpus = self.nvcpus if nvcpus is None else nvcpus
        counts = self.summary["faulting"][:nvcpus].astype(np.int64)
        take = [slice(0, int(k)) for k in counts]
        start = np.concatenate([self.lat_start[v, s] for v, s in enumerate(take)]).astype(np.int64)
        lat = np.concatenate([self.lat_ns[v, s] for v, s in enumerate(take)]).astype(np.int64)
        page = np.concatenate([self.lat_page[v, s] for v, s in enumerate(take)]).astype(np.int64)
        vcpu = np.repeat(np.arange(nvcpus, dtype=np.int32), counts)
        return StallColumns(vcpu=vcpu, start_ns=start, end_ns=start + lat, addr=page * page_size)

    def close(self) -> None:
        """Unmap and close; copy out what you need first."""
        del self.summary, self.lat_ns, self.lat_page, self.lat_start
        self.mapping.close()
        os.close(self.fd)
