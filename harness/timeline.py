"""What the pictures and the Perfetto trace show, computed once from a run's or a trace's raw material.

From the event columns (faults and placements) and, when recorded, the vCPUs' own stall intervals:

* each vCPU's stall intervals as ``truth`` saw them (the vCPUs' clocks), as ``exact`` saw them (from
  the handler's fault to the page's placement) and as ``seed`` counted them (the 2018 algorithm: a
  second fault overwrites the first, so some stalls are never counted);
* the spans during which every vCPU was stalled at once;
* every placement with how the page came: ``requested`` (some fault on that page came before its
  placement, so the handler asked for it: derived, the event record does not say which channel
  carried the page; their count is the report's ``pages.requested`` = ``faults.pages-requested``)
  or ``sent ahead`` (nobody asked for it before it arrived), each possibly a zero page.

Times are nanoseconds relative to the accounting start (``TraceMeta.start_ns``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from postcopy_core.blocktime import EventColumns, TraceMeta
from postcopy_core.blocktime.events import KIND_FAULT, KIND_PLACED
from postcopy_core.blocktime.exact import ExactEngine
from postcopy_core.blocktime.seed import SeedEngine

# The seed lane replays the 2018 algorithm event by event with its O(vCPUs) scan: skipped past this.
SEED_LANE_WORK = 30_000_000
PLACE_KINDS = ("requested", "requested zero", "sent ahead", "sent ahead zero")  # bit 1: sent ahead, bit 0: zero


@dataclass
class Lanes:
    """Stall intervals of one engine: parallel arrays (vCPU, start, end, page address)."""

    vcpu: np.ndarray
    start: np.ndarray
    end: np.ndarray
    addr: np.ndarray

    def __len__(self) -> int:
        return int(self.vcpu.size)

    @classmethod
    def empty(cls) -> Lanes:
        z = np.zeros(0, np.int64)
        return cls(z.astype(np.int32), z, z, z)


@dataclass
class Timeline:
    """Everything the plots and the trace export draw, relative to ``meta.start_ns``."""

    meta: TraceMeta
    lanes: dict[str, Lanes] = field(default_factory=dict)  # engine -> its stall intervals
    all_stalled: list[tuple[int, int]] = field(default_factory=list)  # spans with every vCPU stalled
    all_stalled_by: str = ""  # the engine whose intervals gave those spans
    place_t: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    place_kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # index in PLACE_KINDS
    place_addr: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    place_requested: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # zero pages too
    fault_t: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fault_vcpu: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    notes: list[str] = field(default_factory=list)

    @property
    def end_ns(self) -> int:
        """The last instant anything happened."""
        ends = [int(la.end.max()) for la in self.lanes.values() if len(la)]
        ends += [int(a.max()) for a in (self.place_t, self.fault_t) if a.size]
        return max(ends, default=0)

    def main_lane(self) -> tuple[str, Lanes]:
        """The engine whose intervals stand for "when the vCPU was stalled": truth, else exact."""
        for name in ("truth", "exact"):
            if name in self.lanes:
                return name, self.lanes[name]
        return "", Lanes.empty()


def all_stalled_spans(n: int, lanes: Lanes) -> list[tuple[int, int]]:
    """The [start, end) spans during which each of the ``n`` vCPUs is inside one of its intervals."""
    if n <= 0 or not len(lanes) or np.unique(lanes.vcpu).size < n:
        return []
    times = np.concatenate([lanes.start, lanes.end])
    delta = np.concatenate([np.ones(len(lanes), np.int64), -np.ones(len(lanes), np.int64)])
    vc = np.concatenate([lanes.vcpu, lanes.vcpu]).astype(np.int64)
    order = np.lexsort((delta, times))  # ends first at equal times: touching intervals do not overlap
    times, delta, vc = times[order], delta[order], vc[order]
    depth = np.zeros(n, np.int64)  # open intervals per vCPU (one thread's never overlap; be safe)
    covered = 0
    spans: list[tuple[int, int]] = []
    opened = 0
    for t, d, v in zip(times.tolist(), delta.tolist(), vc.tolist(), strict=True):
        before = depth[v] > 0
        depth[v] += d
        after = depth[v] > 0
        if before == after:
            continue
        if after:
            covered += 1
            if covered == n:
                opened = t
        else:
            if covered == n and t > opened:
                spans.append((opened, t))
            covered -= 1
    return spans


def exact_lanes(meta: TraceMeta, cols: EventColumns) -> Lanes:
    """The exact engine's closed intervals (fault read by the handler -> page placed), per vCPU."""
    eng = ExactEngine(meta)
    pages: list[int] = []
    mask = ~(meta.page_size - 1)
    for ev in cols.to_events():
        if hasattr(ev, "vcpu"):
            eng.fault(ev)
        else:
            before = len(eng.iv_vcpu)
            eng.placed(ev)
            pages += [ev.addr & mask] * (len(eng.iv_vcpu) - before)
    n = len(eng.iv_vcpu)
    return Lanes(np.asarray(eng.iv_vcpu, np.int32), np.asarray(eng.iv_start, np.int64) - meta.start_ns,
                 np.asarray(eng.iv_end, np.int64) - meta.start_ns,
                 np.asarray(pages[:n] + [0] * (n - len(pages)), np.int64))


def seed_lanes(meta: TraceMeta, cols: EventColumns) -> Lanes | None:
    """What the seed engine counted, interval by interval (ms, as it keeps time); None when too big."""
    if len(cols) * max(meta.vcpus, 1) > SEED_LANE_WORK:
        return None
    eng = SeedEngine(meta)
    start_ms = meta.start_ns // 1_000_000
    out_v: list[int] = []
    out_s: list[int] = []
    out_e: list[int] = []
    out_a: list[int] = []
    for ev in cols.to_events():
        if hasattr(ev, "vcpu"):
            eng.fault(ev)
            continue
        began = list(eng.fault_time)
        before = list(eng.vcpu_blocktime)
        eng.placed(ev)
        now = eng.offset(ev.t_ns)
        for v in range(eng.n):
            if eng.vcpu_blocktime[v] != before[v]:
                out_v.append(v)
                out_s.append((start_ms + began[v]) * 1_000_000 - meta.start_ns)
                out_e.append((start_ms + now) * 1_000_000 - meta.start_ns)
                out_a.append(ev.addr)
    return Lanes(np.asarray(out_v, np.int32), np.asarray(out_s, np.int64), np.asarray(out_e, np.int64),
                 np.asarray(out_a, np.int64))


def placements(meta: TraceMeta, cols: EventColumns) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(time, kind index in PLACE_KINDS, address, requested) of every placement.  ``requested`` is derived: a
    vCPU or non-vCPU fault on the page came before the placement."""
    mask = np.int64(~(meta.page_size - 1))
    page = cols.addr & mask
    is_p = cols.kind == KIND_PLACED
    is_f = cols.kind == KIND_FAULT
    # first fault per page, by position in the stream (the handler's order)
    pos = np.arange(len(cols))
    f_pages, f_first = np.unique(page[is_f], return_index=True)
    first_fault_pos = pos[is_f][f_first]
    p_page = page[is_p]
    idx = np.searchsorted(f_pages, p_page)
    idx_ok = np.minimum(idx, max(f_pages.size - 1, 0))
    faulted = (f_pages.size > 0) & (f_pages[idx_ok] == p_page) if f_pages.size else np.zeros(p_page.size, bool)
    requested = faulted & (first_fault_pos[idx_ok] < pos[is_p]) if f_pages.size else faulted
    kind = (np.where(requested, 0, 2) + (cols.flag[is_p] > 0)).astype(np.int8)
    return cols.t_ns[is_p] - meta.start_ns, kind, cols.addr[is_p], requested


def build_timeline(meta: TraceMeta, cols: EventColumns, engines: tuple[str, ...] = ("truth", "exact", "seed"),
                   ) -> Timeline:
    """Everything to draw for ``cols`` (stall intervals in ``cols.stalls`` give the truth lane)."""
    tl = Timeline(meta)
    if "truth" in engines and cols.stalls is not None and len(cols.stalls):
        s = cols.stalls
        tl.lanes["truth"] = Lanes(s.vcpu.astype(np.int32), s.start_ns - meta.start_ns, s.end_ns - meta.start_ns,
                                  s.addr.astype(np.int64))
    if "exact" in engines and len(cols):
        tl.lanes["exact"] = exact_lanes(meta, cols)
    if "seed" in engines and len(cols):
        lane = seed_lanes(meta, cols)
        if lane is None:
            tl.notes.append("seed lane left out: too many events x vCPUs to replay it interval by interval")
        else:
            tl.lanes["seed"] = lane
    name, main = tl.main_lane()
    tl.all_stalled, tl.all_stalled_by = all_stalled_spans(meta.vcpus, main), name
    if len(cols):
        tl.place_t, tl.place_kind, tl.place_addr, tl.place_requested = placements(meta, cols)
        f = (cols.kind == KIND_FAULT) & (cols.vcpu >= 0)
        tl.fault_t, tl.fault_vcpu = cols.t_ns[f] - meta.start_ns, cols.vcpu[f]
    return tl
