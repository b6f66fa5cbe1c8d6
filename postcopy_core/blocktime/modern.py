"""The modern engine: blocktime accounting as QEMU 10.1 does it (our own implementation).

Semantics reproduced:

* Nanosecond times; a fault on a page already received is not accounted at all (10.1 checks the
  received bitmap before it records a fault).
* Faults are kept per address as a list of (vCPU, fault time) entries; vCPU -1 is a non-vCPU thread.
* Per vCPU: a fault count and a count of faults currently pending.  When a vCPU's pending count goes
  0 -> 1, ``cpus_down`` rises and ``last_begin`` becomes that fault's time.
* A placement takes the whole list for its address, newest entry first.  Every entry adds its wait to
  the latency histogram.  A vCPU entry decrements that vCPU's pending count; only the entry that brings
  it to 0 adds ITS wait to the vCPU's blocked time (so with two overlapping faults only the last one's
  wait is counted).  A non-vCPU entry adds its wait to the non-vCPU total.
* If every vCPU was down when the placement began and it released at least one, ``now - last_begin`` is
  added to the system-wide total.
* Reported: blocktime in ms (uint32-truncated), latencies in ns: per vCPU blocked time / faults,
  overall (vCPU + non-vCPU time) / (all faults), non-vCPU time / non-vCPU faults, and 24 buckets.

Waits that would be negative (clocks of replayed logs are reconstructed) count as 0, where QEMU
would assert.

``compute_columns`` is the same algorithm written over whole arrays, for replays of long traces.
"""

from __future__ import annotations

import numpy as np

from .common import LATENCY_BUCKETS, check_vcpu, latency_bucket, latency_histogram, ms_u32
from .events import KIND_FAULT, KIND_PLACED, EventColumns, Fault, Placed, TraceMeta


def build_result(
    n: int,
    total_ns: int,
    vcpu_ns: list[int],
    vcpu_faults: list[int],
    non_vcpu_ns: int,
    non_vcpu_faults: int,
    dist: list[int],
) -> dict:
    """query-migrate fields from the modern engine's counters (both paths share this)."""
    faults = sum(vcpu_faults) + non_vcpu_faults
    return {
        "postcopy-blocktime": ms_u32(total_ns),
        "postcopy-vcpu-blocktime": [ms_u32(x) for x in vcpu_ns],
        "postcopy-latency": (sum(vcpu_ns) + non_vcpu_ns) // faults if faults else 0,
        "postcopy-vcpu-latency": [t // c if c else 0 for t, c in zip(vcpu_ns, vcpu_faults, strict=True)],
        "postcopy-non-vcpu-latency": non_vcpu_ns // non_vcpu_faults if non_vcpu_faults else 0,
        "postcopy-latency-dist": list(dist),
        "vcpu-faults": list(vcpu_faults),
        "non-vcpu-faults": non_vcpu_faults,
        "blocktime-ns": total_ns,
        "vcpu-blocktime-ns": list(vcpu_ns),
    }


class ModernEngine:
    """Per-event modern engine; feed faults and placements in stream order."""

    name = "modern"

    def __init__(self, meta: TraceMeta) -> None:
        meta.check()
        self.meta = meta
        self.n = meta.vcpus
        self._page_mask = ~(meta.page_size - 1)
        self.pending: dict[int, list[tuple[int, int]]] = {}
        self.vcpu_ns = [0] * self.n
        self.vcpu_faults = [0] * self.n
        self.vcpu_current = [0] * self.n
        self.non_vcpu_ns = 0
        self.non_vcpu_faults = 0
        self.dist = [0] * LATENCY_BUCKETS
        self.total_ns = 0
        self.last_begin = 0
        self.cpus_down = 0
        self.received: set[int] = set()

    def fault(self, ev: Fault) -> None:
        """A fault: recorded only when its page has not arrived yet."""
        ar = ev.already_received
        if ar is None:
            ar = (ev.addr & self._page_mask) in self.received
        if ar:
            return
        cpu = ev.vcpu
        if cpu >= 0:
            check_vcpu(self.meta, cpu)
            self.vcpu_faults[cpu] += 1
            if self.vcpu_current[cpu] == 0:
                self.cpus_down += 1
                self.last_begin = ev.t_ns
            self.vcpu_current[cpu] += 1
        else:
            self.non_vcpu_faults += 1
        entries = self.pending.get(ev.addr)
        if entries is None:
            self.pending[ev.addr] = [(cpu, ev.t_ns)]
        else:
            entries.append((cpu, ev.t_ns))

    def placed(self, ev: Placed) -> None:
        """A placement: resolves every fault recorded at exactly this address."""
        self.received.add(ev.addr & self._page_mask)
        entries = self.pending.pop(ev.addr, None)
        if entries is None:
            return
        now = ev.t_ns
        affected = 0
        current = self.vcpu_current
        # Newest first, as QEMU walks its prepended list; it decides whose wait a vCPU is charged.
        for cpu, t in reversed(entries):
            waited = now - t if now > t else 0
            self.dist[latency_bucket(waited)] += 1
            if cpu >= 0:
                current[cpu] -= 1
                if current[cpu] == 0:
                    self.vcpu_ns[cpu] += waited
                    affected += 1
            else:
                self.non_vcpu_ns += waited
        if affected and self.cpus_down == self.n and now > self.last_begin:
            self.total_ns += now - self.last_begin
        self.cpus_down -= affected

    def result(self) -> dict:
        """query-migrate fields: blocktime in ms, latencies in ns."""
        return build_result(
            self.n,
            self.total_ns,
            self.vcpu_ns,
            self.vcpu_faults,
            self.non_vcpu_ns,
            self.non_vcpu_faults,
            self.dist,
        )


def _group_ids(keys: np.ndarray) -> np.ndarray:
    """Dense ids for equal values (a cheaper np.unique(return_inverse) for our use)."""
    return np.unique(keys, return_inverse=True)[1].reshape(-1)


def received_mask(cols: EventColumns, page_size: int) -> np.ndarray:
    """For each event: is it a fault whose page was already received when it was processed?

    Explicit flags win; an unknown flag means "a placement of that page came earlier in the stream".
    """
    n = len(cols)
    is_fault = cols.kind == KIND_FAULT
    flag = cols.flag
    out = is_fault & (flag >= 1)  # 1 = received, 2 = received_late
    unknown = is_fault & (flag < 0)
    if not unknown.any():
        return out
    page = cols.addr & ~np.int64(page_size - 1)
    pid = _group_ids(page)
    is_placed = cols.kind == KIND_PLACED
    first = np.full(int(pid.max()) + 1 if n else 0, n, dtype=np.int64)
    pos = np.flatnonzero(is_placed)
    np.minimum.at(first, pid[pos], pos)
    idx = np.arange(n, dtype=np.int64)
    out |= unknown & (first[pid] < idx)
    return out


def next_placement(cols: EventColumns, faults: np.ndarray, key: np.ndarray) -> np.ndarray:
    """For each fault position in ``faults``: the position of the first placement after it with the
    same ``key`` (per-event address or page), or -1."""
    is_placed = cols.kind == KIND_PLACED
    placed_pos = np.flatnonzero(is_placed)
    pos = np.concatenate([faults, placed_pos])
    k = key[pos]
    order = np.lexsort((pos, k))
    spos = pos[order]
    sk = k[order]
    # Nearest placement at or after each element *in sorted order*; sorted order keeps each key's
    # events together and in stream order, so it is the first placement after the fault if the key
    # matches (a placement of another key means this key has none left).
    m = spos.size
    sidx = np.arange(m, dtype=np.int64)
    cand = np.where(is_placed[spos], sidx, m)
    nxt = np.minimum.accumulate(cand[::-1])[::-1]
    ok = nxt < m
    nxt_safe = np.where(ok, nxt, 0)
    ok &= sk[nxt_safe] == sk
    res_sorted = np.where(ok, spos[nxt_safe], -1)
    out = np.empty(len(pos), dtype=np.int64)
    out[order] = res_sorted
    return out[: len(faults)]


def compute_columns(meta: TraceMeta, cols: EventColumns) -> dict:
    """The modern engine over a whole stream at once; same result as feeding ``ModernEngine``."""
    meta.check()
    n = meta.vcpus
    if len(cols) == 0:
        return build_result(n, 0, [0] * n, [0] * n, 0, 0, [0] * LATENCY_BUCKETS)
    t = cols.t_ns
    ar = received_mask(cols, meta.page_size)
    fpos = np.flatnonzero((cols.kind == KIND_FAULT) & ~ar)
    fv = cols.vcpu[fpos].astype(np.int64)
    if fv.size and (fv.max() >= n or fv.min() < -1):
        bad = int(fv.max()) if fv.max() >= n else int(fv.min())
        check_vcpu(meta, bad)
    rpos = next_placement(cols, fpos, cols.addr)
    resolved = rpos >= 0
    waited = np.maximum(t[np.where(resolved, rpos, 0)] - t[fpos], 0)
    dist = latency_histogram(waited[resolved])

    is_v = fv >= 0
    non_vcpu_faults = int((~is_v).sum())
    non_vcpu_ns = int(waited[resolved & ~is_v].sum())
    vcpu_faults = np.bincount(fv[is_v], minlength=n)

    # Per-vCPU pending counts: +1 at each fault, -1 at its placement; within one placement entries go
    # newest first.  Sort by (vcpu, position, sub-order) and run a cumulative sum per vCPU.
    vf = fpos[is_v]
    vcpu_of = fv[is_v]
    vres = resolved[is_v]
    vr = rpos[is_v][vres]
    e_cpu = np.concatenate([vcpu_of, vcpu_of[vres]])
    e_pos = np.concatenate([vf, vr])
    e_sub = np.concatenate([np.zeros(vf.size, np.int64), -vf[vres]])
    e_delta = np.concatenate([np.ones(vf.size, np.int64), -np.ones(vr.size, np.int64)])
    e_wait = np.concatenate([np.zeros(vf.size, np.int64), waited[is_v][vres]])
    e_time = np.concatenate([t[vf], t[vr]])
    order = np.lexsort((e_sub, e_pos, e_cpu))
    e_cpu, e_pos, e_delta, e_wait, e_time = (a[order] for a in (e_cpu, e_pos, e_delta, e_wait, e_time))
    cs = np.cumsum(e_delta)
    if cs.size:
        starts = np.flatnonzero(np.r_[True, e_cpu[1:] != e_cpu[:-1]])
        base = np.repeat(cs[starts] - e_delta[starts], np.diff(np.r_[starts, cs.size]))
        level = cs - base
    else:
        level = cs
    down_edge = (e_delta < 0) & (level == 0)  # this entry released its vCPU
    up_edge = (e_delta > 0) & (level == 1)  # this fault took its vCPU down
    vcpu_ns = np.zeros(n, dtype=np.int64)
    np.add.at(vcpu_ns, e_cpu[down_edge], e_wait[down_edge])

    # System-wide: walk the up/down edges in stream order.
    total_ns = 0
    if down_edge.any():
        g_pos = np.concatenate([e_pos[up_edge], e_pos[down_edge]])
        n_up, n_down = int(up_edge.sum()), int(down_edge.sum())
        g_delta = np.concatenate([np.ones(n_up, np.int64), -np.ones(n_down, np.int64)])
        g_time = np.concatenate([e_time[up_edge], e_time[down_edge]])
        order = np.argsort(g_pos, kind="stable")
        g_pos, g_delta, g_time = g_pos[order], g_delta[order], g_time[order]
        down_before = np.cumsum(g_delta) - g_delta
        idx = np.arange(g_pos.size)
        last_up = np.maximum.accumulate(np.where(g_delta > 0, idx, -1))
        first_of_pos = np.r_[True, g_pos[1:] != g_pos[:-1]] & (g_delta < 0)
        sel = first_of_pos & (down_before == n) & (last_up >= 0)
        lb = g_time[np.where(last_up >= 0, last_up, 0)]
        gain = g_time[sel] - lb[sel]
        total_ns = int(gain[gain > 0].sum())
    return build_result(
        n,
        total_ns,
        vcpu_ns.tolist(),
        vcpu_faults.tolist(),
        non_vcpu_ns,
        non_vcpu_faults,
        dist,
    )
