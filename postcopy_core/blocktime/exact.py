"""The exact engine: what was really true, computed from intervals.

A vCPU is blocked from its fault until the first later placement of the page it faulted on.  Its
blocked time is the measure of the union of those intervals (overlapping or repeated faults are not
counted twice, and none is lost); the system-wide blocktime is the measure of the time during which
every vCPU is blocked at once.

Choices, documented because they are choices:

* A fault whose page was already received is not a stall we can measure (the placement woke the
  thread before the handler saw the fault): it gives no interval and no latency, and is counted in
  ``already-received-faults``.
* A fault never resolved within the stream stays blocked until the last event time (it really was
  blocked that long); it is counted in ``unresolved-faults`` and gives no latency sample.
* Latencies are per fault (placement time - fault time), so ``postcopy-vcpu-latency`` is the mean wait
  of that vCPU's faults, not blocked time / faults as in QEMU 10.1.
* Pages are matched by page-aligned address, so a fault anywhere in a page is resolved by its page.
"""

from __future__ import annotations

import numpy as np

from .common import NS_PER_MS, check_vcpu, latency_histogram
from .events import KIND_FAULT, EventColumns, Fault, Placed, TraceMeta
from .modern import next_placement, received_mask


def interval_measures(n: int, vcpu: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-vCPU measure of the union of [start, end) intervals, and the measure of the time every one
    of the ``n`` vCPUs is inside one of its intervals."""
    per = np.zeros(n, dtype=np.int64)
    if vcpu.size == 0:
        return per, 0
    vcpu = vcpu.astype(np.int64)
    order = np.lexsort((start, vcpu))
    v, s, e = vcpu[order], start[order], end[order]
    group_start = np.r_[True, v[1:] != v[:-1]]
    # Running max of ends within each vCPU: shift each vCPU into its own band of the number line so a
    # single cumulative max never crosses vCPUs.
    lo = int(min(s.min(), e.min()))
    span = int(max(s.max(), e.max())) - lo + 1
    if span * (n + 1) < 2**62:
        band = v * span
        runmax = np.maximum.accumulate(e - lo + band) - band + lo
    else:  # too long a trace for bands: do it per vCPU
        runmax = np.empty_like(e)
        bounds = np.r_[np.flatnonzero(group_start), v.size]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            runmax[a:b] = np.maximum.accumulate(e[a:b])
    prev = np.r_[lo, runmax[:-1]]
    prev = np.where(group_start, s, prev)
    covered = np.maximum(e - np.maximum(s, prev), 0)
    np.add.at(per, v, covered)

    # Merge each vCPU's intervals into disjoint runs, then sweep: time where all n are inside a run.
    new_run = group_start | (s > prev)
    run_first = np.flatnonzero(new_run)
    run_last = np.r_[run_first[1:] - 1, v.size - 1]
    r_start = s[run_first]
    r_end = runmax[run_last]
    keep = r_end > r_start
    r_start, r_end = r_start[keep], r_end[keep]
    if np.unique(v[run_first][keep]).size < n:
        return per, 0
    times = np.concatenate([r_start, r_end])
    delta = np.concatenate([np.ones(r_start.size, np.int64), -np.ones(r_end.size, np.int64)])
    order = np.lexsort((delta, times))  # ends before starts at equal times (no zero-width overlap)
    times, delta = times[order], delta[order]
    level = np.cumsum(delta)
    seg = np.diff(times)
    all_blocked = int(seg[level[:-1] == n].sum())
    return per, all_blocked


def build_result(
    n: int,
    per: np.ndarray,
    all_ns: int,
    lat_vcpu: np.ndarray,
    lat_ns: np.ndarray,
    vcpu_faults: np.ndarray,
    non_vcpu_faults: int,
    unresolved: int,
    already: int,
    elapsed: int,
) -> dict:
    """query-migrate-style fields from exact intervals and per-fault latencies.

    ``lat_vcpu``/``lat_ns``: vCPU index (-1 for non-vCPU) and wait of every resolved fault.
    """
    is_v = lat_vcpu >= 0
    sums = np.zeros(n, dtype=np.int64)
    np.add.at(sums, lat_vcpu[is_v], lat_ns[is_v])
    counts = np.bincount(lat_vcpu[is_v], minlength=n)
    nv = lat_ns[~is_v]
    total_faults = int(lat_ns.size)
    return {
        "postcopy-blocktime": all_ns // NS_PER_MS,
        "postcopy-vcpu-blocktime": (per // NS_PER_MS).tolist(),
        "postcopy-latency": int(lat_ns.sum()) // total_faults if total_faults else 0,
        "postcopy-vcpu-latency": [int(s) // int(c) if c else 0 for s, c in zip(sums, counts, strict=True)],
        "postcopy-non-vcpu-latency": int(nv.sum()) // nv.size if nv.size else 0,
        "postcopy-latency-dist": latency_histogram(lat_ns),
        "vcpu-faults": vcpu_faults.tolist(),
        "non-vcpu-faults": non_vcpu_faults,
        "blocktime-ns": int(all_ns),
        "vcpu-blocktime-ns": per.tolist(),
        "unresolved-faults": unresolved,
        "already-received-faults": already,
        "elapsed-ns": elapsed,
    }


class ExactEngine:
    """Per-event exact engine: collects intervals as placements close them; measures at ``result()``."""

    name = "exact"

    def __init__(self, meta: TraceMeta) -> None:
        meta.check()
        self.meta = meta
        self.n = meta.vcpus
        self._page_mask = ~(meta.page_size - 1)
        self.pending: dict[int, list[tuple[int, int]]] = {}
        self.received: set[int] = set()
        self.iv_vcpu: list[int] = []
        self.iv_start: list[int] = []
        self.iv_end: list[int] = []
        self.lat_vcpu: list[int] = []
        self.lat_ns: list[int] = []
        self.vcpu_faults = [0] * self.n
        self.non_vcpu_faults = 0
        self.already = 0
        self.t_first: int | None = None  # earliest and latest event times seen
        self.t_last: int | None = None

    def _seen(self, t: int) -> None:
        if self.t_first is None:
            self.t_first = self.t_last = t
        elif t > self.t_last:
            self.t_last = t
        elif t < self.t_first:
            self.t_first = t

    def fault(self, ev: Fault) -> None:
        """A fault opens an interval unless its page is already here."""
        self._seen(ev.t_ns)
        page = ev.addr & self._page_mask
        ar = ev.already_received
        if ar is None:
            ar = page in self.received
        if ar:
            self.already += 1
            return
        if ev.vcpu >= 0:
            check_vcpu(self.meta, ev.vcpu)
            self.vcpu_faults[ev.vcpu] += 1
        else:
            self.non_vcpu_faults += 1
        entries = self.pending.get(page)
        if entries is None:
            self.pending[page] = [(ev.vcpu, ev.t_ns)]
        else:
            entries.append((ev.vcpu, ev.t_ns))

    def placed(self, ev: Placed) -> None:
        """A placement closes every interval waiting on its page."""
        self._seen(ev.t_ns)
        page = ev.addr & self._page_mask
        self.received.add(page)
        entries = self.pending.pop(page, None)
        if entries is None:
            return
        now = ev.t_ns
        for cpu, t in entries:
            end = now if now > t else t
            if cpu >= 0:
                self.iv_vcpu.append(cpu)
                self.iv_start.append(t)
                self.iv_end.append(end)
            self.lat_vcpu.append(cpu)
            self.lat_ns.append(end - t)

    def result(self) -> dict:
        """Measures over everything seen so far (still-pending faults count as blocked until now)."""
        iv_v, iv_s, iv_e = list(self.iv_vcpu), list(self.iv_start), list(self.iv_end)
        unresolved = 0
        for entries in self.pending.values():
            for cpu, t in entries:
                unresolved += 1
                if cpu >= 0:
                    iv_v.append(cpu)
                    iv_s.append(t)
                    iv_e.append(max(t, self.t_last))
        per, all_ns = interval_measures(
            self.n, np.asarray(iv_v, np.int64), np.asarray(iv_s, np.int64), np.asarray(iv_e, np.int64)
        )
        elapsed = 0 if self.t_first is None else self.t_last - min(self.t_first, self.meta.start_ns)
        return build_result(
            self.n,
            per,
            all_ns,
            np.asarray(self.lat_vcpu, np.int64),
            np.asarray(self.lat_ns, np.int64),
            np.asarray(self.vcpu_faults, np.int64),
            self.non_vcpu_faults,
            unresolved,
            self.already,
            elapsed,
        )


def compute_columns(meta: TraceMeta, cols: EventColumns) -> dict:
    """The exact engine over a whole stream at once; same result as feeding ``ExactEngine``."""
    meta.check()
    n = meta.vcpus
    if len(cols) == 0:
        z = np.zeros(0, np.int64)
        return build_result(n, np.zeros(n, np.int64), 0, z, z, np.zeros(n, np.int64), 0, 0, 0, 0)
    t = cols.t_ns
    ar = received_mask(cols, meta.page_size)
    is_fault = cols.kind == KIND_FAULT
    already = int((is_fault & ar).sum())
    fpos = np.flatnonzero(is_fault & ~ar)
    fv = cols.vcpu[fpos].astype(np.int64)
    if fv.size and (fv.max() >= n or fv.min() < -1):
        check_vcpu(meta, int(fv.max()) if fv.max() >= n else int(fv.min()))
    page = cols.addr & ~np.int64(meta.page_size - 1)
    rpos = next_placement(cols, fpos, page)
    resolved = rpos >= 0
    t_last = int(t.max())
    tf = t[fpos]
    end = np.where(resolved, t[np.where(resolved, rpos, 0)], t_last)
    end = np.maximum(end, tf)
    is_v = fv >= 0
    per, all_ns = interval_measures(n, fv[is_v], tf[is_v], end[is_v])
    # Latencies in the order the per-event engine appends them does not matter for sums/histograms.
    lat_vcpu = fv[resolved]
    lat_ns = (end - tf)[resolved]
    vcpu_faults = np.bincount(fv[is_v], minlength=n).astype(np.int64)
    elapsed = t_last - min(int(t.min()), meta.start_ns)
    return build_result(
        n,
        per,
        all_ns,
        lat_vcpu,
        lat_ns,
        vcpu_faults,
        int((~is_v).sum()),
        int((~resolved).sum()),
        already,
        elapsed,
    )
