"""The truth engine: blocktime from the vCPUs' own clocks.

Every vCPU worker times each access that faulted and records its stall interval [start, end) on
CLOCK_MONOTONIC, the clock of the handler's events (``StallColumns``).  That interval includes what
no handler-side clock sees: the time the fault sat in the kernel before the handler read it, and the
wake-up after the page was placed.  From these intervals, in QEMU's ``query-migrate`` fields:

* ``postcopy-vcpu-blocktime``: each vCPU's stalled time, the measure of the union of its intervals
  (one thread's accesses never overlap, so this is the sum the worker's stall clock keeps);
* ``postcopy-blocktime``: the time during which every vCPU was stalled at once, so it is never above
  any vCPU's own (and 0 as soon as one vCPU never stalled);
* ``postcopy-vcpu-latency`` / ``postcopy-latency``: stalled time / stalled accesses, per vCPU and
  over all vCPUs;
* ``postcopy-non-vcpu-latency``: 0, the workers are all vCPUs;
* ``postcopy-latency-dist``: each stalled access's own duration in the 24 log2 buckets.

It needs no events at all, so it runs only where intervals were recorded: live runs and their traces.
"""

from __future__ import annotations

import numpy as np

from .common import NS_PER_MS, check_vcpu, latency_histogram
from .events import BlocktimeError, StallColumns, TraceMeta
from .exact import interval_measures

NAME = "truth"


def check_stalls(meta: TraceMeta, stalls: StallColumns) -> None:
    """Raise BlocktimeError for intervals that cannot come from this run."""
    v = stalls.vcpu
    if v.size == 0:
        return
    if int(v.min()) < 0:
        raise BlocktimeError(f"stall interval of vCPU {int(v.min())}: stalls are recorded by vCPUs only")
    if int(v.max()) >= meta.vcpus:
        check_vcpu(meta, int(v.max()))
    bad = np.flatnonzero(stalls.end_ns < stalls.start_ns)
    if bad.size:
        i = int(bad[0])
        raise BlocktimeError(
            f"stall interval of vCPU {int(v[i])} ends before it starts ({int(stalls.start_ns[i])} > "
            f"{int(stalls.end_ns[i])})"
        )


def compute(meta: TraceMeta, stalls: StallColumns) -> dict:
    """The truth engine's query-migrate fields from the vCPUs' stall intervals (vectorised)."""
    meta.check()
    check_stalls(meta, stalls)
    n = meta.vcpus
    vcpu = stalls.vcpu.astype(np.int64)
    start, end = stalls.start_ns, stalls.end_ns
    per, all_ns = interval_measures(n, vcpu, start, end)
    counts = np.bincount(vcpu, minlength=n).astype(np.int64)
    total_faults = int(counts.sum())
    elapsed = int(end.max()) - int(start.min()) if vcpu.size else 0
    return {
        "postcopy-blocktime": int(all_ns) // NS_PER_MS,
        "postcopy-vcpu-blocktime": (per // NS_PER_MS).tolist(),
        "postcopy-latency": int(per.sum()) // total_faults if total_faults else 0,
        "postcopy-vcpu-latency": [int(p) // int(c) if c else 0 for p, c in zip(per, counts, strict=True)],
        "postcopy-non-vcpu-latency": 0,
        "postcopy-latency-dist": latency_histogram(end - start),
        "vcpu-faults": counts.tolist(),
        "non-vcpu-faults": 0,
        "blocktime-ns": int(all_ns),
        "vcpu-blocktime-ns": per.tolist(),
        "elapsed-ns": elapsed,
    }
