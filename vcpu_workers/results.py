"""The results area the vCPU workers write and the orchestrator reads (anonymous shared memory).

Created before the workers fork, so it needs no name and vanishes with the last process.
Per worker: one summary record, and room for the latency and page of each faulting access.
"""

from __future__ import annotations

import numpy as np

from postcopy_core import kernel

SUMMARY = np.dtype(
    [
        ("vcpu", "<i8"), ("pid", "<i8"), ("state", "<i8"), ("accesses", "<u8"), ("faulting", "<u8"),
        ("stall_ns", "<u8"), ("max_ns", "<u8"), ("all_ns", "<u8"), ("pages_checked", "<u8"),
        ("words_checked", "<u8"), ("mismatches", "<u8"), ("first_bad_page", "<i8"),
        ("t_start", "<u8"), ("t_end", "<u8"), ("t_forked", "<u8"), ("t_ready", "<u8"),
    ]
)
STATE_NONE, STATE_READY, STATE_DONE, STATE_FAILED = 0, 1, 2, 3


class ResultsArea:
    """``summary[v]`` is vCPU v's record; ``lat_ns[v]`` / ``lat_page[v]`` its faulting accesses."""

    def __init__(self, nvcpus: int, capacity: int) -> None:
        self.nvcpus, self.capacity = nvcpus, capacity
        sz = SUMMARY.itemsize * nvcpus
        lat = 4 * nvcpus * capacity
        self.mapping = kernel.mmap_anon(sz + 2 * lat, shared=True)
        buf = self.mapping.buffer()
        self.summary = np.frombuffer(buf, dtype=SUMMARY, count=nvcpus)
        self.lat_ns = np.frombuffer(buf, dtype=np.uint32, count=nvcpus * capacity, offset=sz).reshape(nvcpus, -1)
        self.lat_page = np.frombuffer(buf, dtype=np.uint32, count=nvcpus * capacity, offset=sz + lat).reshape(
            nvcpus, -1
        )

    def latencies(self, vcpu: int) -> np.ndarray:
        n = int(self.summary[vcpu]["faulting"])
        return self.lat_ns[vcpu, :n]

    def close(self) -> None:
        del self.summary, self.lat_ns, self.lat_page
        self.mapping.close()
