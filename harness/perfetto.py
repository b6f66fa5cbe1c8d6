"""``trace.json``: a run or a replay in the Chrome Trace Event format (opens in ui.perfetto.dev and
chrome://tracing).

Processes and tracks:

* ``vCPUs``: one thread track per vCPU with a slice per stall (page, wait, which engines counted
  an interval overlapping it), a track of the spans when every vCPU was stalled, and a counter of
  the vCPUs stalled at each instant (without the vCPUs' own intervals the stalls are the handler's,
  where a re-entrant fault can overlap an earlier wait: those go to a second track of that vCPU);
* ``destination``: the fault handler's faults read and pages placed (instant events), and a counter
  of the pages received;
* ``source``: the pages each channel delivered, as far as the events tell: a page some fault asked
  for before it arrived is put on the urgent channel, any other on the stream channel (derived: the
  handler's event record does not carry the channel).

Times are microseconds since the postcopy start.  Instants and counters are thinned past a cap so a
trace of a long run stays loadable; the trace's ``otherData`` says when that happened.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from harness.timeline import PLACE_KINDS, Lanes, Timeline

PID_VCPUS, PID_DEST, PID_SOURCE = 1, 2, 3
TID_ALL = 0  # the "all vCPUs stalled" track of the vCPUs process; vCPU v is thread v + 1
OVERFLOW = 100_000  # vCPU v's overlapping waits go to thread v + 1 + OVERFLOW
MAX_SLICES = 400_000
MAX_INSTANTS = 20_000
MAX_COUNTER = 5_000


def _counted_by(main: Lanes, other: Lanes) -> np.ndarray:
    """For each interval of ``main``: does ``other`` have an interval of the same vCPU overlapping it?"""
    hit = np.zeros(len(main), bool)
    for v in np.unique(main.vcpu):
        mi = np.flatnonzero(main.vcpu == v)
        oi = np.flatnonzero(other.vcpu == v)
        if oi.size == 0:
            continue
        order = np.argsort(other.start[oi], kind="stable")
        os_, oe = other.start[oi][order], np.maximum.accumulate(other.end[oi][order])
        j = np.searchsorted(os_, main.end[mi], side="left") - 1
        ok = j >= 0
        hit[mi[ok]] = oe[j[ok]] > main.start[mi[ok]]
        # a zero-length interval at the same instant still counts as the same stall
        same = (j >= 0) & (os_[np.maximum(j, 0)] == main.start[mi])
        hit[mi[same]] = True
    return hit


def _tracks(main: Lanes, keep: np.ndarray) -> np.ndarray:
    """The thread of each kept slice: vCPU v's track (v + 1), or its overflow track when the slice
    starts inside an earlier one and ends after it (a re-entrant fault in a handler-side lane): a
    track's slices must nest, or viewers drop them."""
    tid = main.vcpu[keep].astype(np.int64) + 1
    order = np.lexsort((-main.end[keep], main.start[keep], tid))
    last_end: dict[int, int] = {}
    for i in order.tolist():
        v, s, e = int(tid[i]), int(main.start[keep[i]]), int(main.end[keep[i]])
        if s < last_end.get(v, s) < e:
            tid[i] += OVERFLOW
        else:
            last_end[v] = max(last_end.get(v, e), e)
    return tid


def _thin(n: int, cap: int) -> np.ndarray:
    """Indexes of at most ``cap`` of ``n`` items, evenly spread (all of them when n <= cap)."""
    return np.arange(n) if n <= cap else np.linspace(0, n - 1, cap).astype(np.int64)


def _us(ns: np.ndarray | int) -> np.ndarray | float:
    return np.round(np.asarray(ns, dtype=np.float64) / 1e3, 3)


def _vcpus_down(main, ev: list[dict], thinned: list[str]) -> None:
    """The vCPUs-down counter: +1 at each stall start, -1 at each end."""
    if not len(main):
        return
    times = np.concatenate([main.start, main.end])
    delta = np.concatenate([np.ones(len(main), np.int64), -np.ones(len(main), np.int64)])
    order = np.lexsort((delta, times))
    times, level = times[order], np.cumsum(delta[order])
    pick = _thin(times.size, MAX_COUNTER)
    if pick.size < times.size:
        thinned.append(f"vCPUs-down counter: {pick.size:,} of {times.size:,} points")
    for t, lv in zip(_us(times[pick]).tolist(), level[pick].tolist(), strict=True):
        ev.append({"ph": "C", "pid": PID_VCPUS, "tid": 0, "ts": t, "name": "vCPUs down", "args": {"vCPUs": lv}})


def _fault_instants(tl: Timeline, ev: list[dict], thinned: list[str]) -> None:
    """One instant per fault the handler read, on its track."""
    pick = _thin(tl.fault_t.size, MAX_INSTANTS)
    if pick.size < tl.fault_t.size:
        thinned.append(f"fault instants: {pick.size:,} of {tl.fault_t.size:,}")
    for t, v in zip(_us(tl.fault_t[pick]).tolist(), tl.fault_vcpu[pick].tolist(), strict=True):
        ev.append({"ph": "i", "s": "t", "pid": PID_DEST, "tid": 1, "ts": t, "name": "fault", "args": {"vcpu": v}})


def trace_events(tl: Timeline, engines: dict, title: str, argv: Sequence[str] | None = None) -> dict:
    """The whole trace document (``traceEvents`` and ``otherData``)."""
    n, page_size = tl.meta.vcpus, tl.meta.page_size
    ev: list[dict] = []
    thinned: list[str] = []

    def meta(pid: int, name: str, tid: int | None = None, sort: int | None = None) -> None:
        if tid is None:
            ev.append({"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": name}})
        else:
            ev.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}})
            ev.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index",
                       "args": {"sort_index": tid if sort is None else sort}})

    meta(PID_VCPUS, "vCPUs")
    meta(PID_DEST, "destination (fault handler and placement)")
    meta(PID_SOURCE, "source (channels derived from the events)")
    meta(PID_VCPUS, "all vCPUs stalled", TID_ALL)
    for v in range(n):
        meta(PID_VCPUS, f"vCPU {v}", v + 1)
    meta(PID_DEST, "handler: faults read", 1)
    meta(PID_DEST, "placement: pages placed", 2)
    meta(PID_SOURCE, "urgent channel (requested pages)", 1)
    meta(PID_SOURCE, "stream channel (background pages)", 2)

    # stalls: one slice each, from truth when recorded, else from exact
    main_name, main = tl.main_lane()
    counted = {name: (np.ones(len(main), bool) if name == main_name else _counted_by(main, lane))
               for name, lane in tl.lanes.items()}
    keep = _thin(len(main), MAX_SLICES)
    if keep.size < len(main):
        thinned.append(f"stall slices: {keep.size:,} of {len(main):,}")
    starts, ends = main.start[keep], main.end[keep]
    ts, dur = _us(starts), _us(ends - starts)
    tids = _tracks(main, keep)
    for v in sorted({int(t) - OVERFLOW - 1 for t in tids if t > OVERFLOW}):
        meta(PID_VCPUS, f"vCPU {v}: overlapping waits", v + 1 + OVERFLOW, sort=v + 1)
    for i, k in enumerate(keep.tolist()):
        page = int(main.addr[k]) // page_size
        ev.append({"ph": "X", "pid": PID_VCPUS, "tid": int(tids[i]), "ts": float(ts[i]),
                   "dur": float(dur[i]), "name": f"stall page {page}", "cat": "stall",
                   "args": {"page": page, "wait-us": float(dur[i]), "recorded-by": main_name,
                            "counted-by": [e for e in counted if counted[e][k]]}})
    for a, b in tl.all_stalled[:MAX_SLICES]:
        ev.append({"ph": "X", "pid": PID_VCPUS, "tid": TID_ALL, "ts": float(_us(a)), "dur": float(_us(b - a)),
                   "name": "all vCPUs stalled", "cat": "blocktime", "args": {"by": tl.all_stalled_by}})
    _vcpus_down(main, ev, thinned)
    # the handler: faults read, pages placed, pages received
    _fault_instants(tl, ev, thinned)
    order = np.argsort(tl.place_t, kind="stable")
    pt, pk, pa, pr = tl.place_t[order], tl.place_kind[order], tl.place_addr[order], tl.place_requested[order]
    pick = _thin(pt.size, MAX_INSTANTS)
    if pick.size < pt.size:
        thinned.append(f"placement instants: {pick.size:,} of {pt.size:,}")
    for t, k, a, r in zip(_us(pt[pick]).tolist(), pk[pick].tolist(), pa[pick].tolist(), pr[pick].tolist(),
                          strict=True):
        page = int(a) // page_size
        args = {"page": page, "how": PLACE_KINDS[k]}
        ev.append({"ph": "i", "s": "t", "pid": PID_DEST, "tid": 2, "ts": t, "name": f"placed {PLACE_KINDS[k]}",
                   "args": args})
        ev.append({"ph": "i", "s": "t", "pid": PID_SOURCE, "tid": 1 if r else 2, "ts": t,
                   "name": "requested page" if r else "page sent ahead", "args": args})
    pick = _thin(pt.size, MAX_COUNTER)
    for t, count in zip(_us(pt[pick]).tolist(), (pick + 1).tolist(), strict=True):
        ev.append({"ph": "C", "pid": PID_DEST, "tid": 0, "ts": t, "name": "pages received", "args": {"pages": count}})

    totals = {e: r.get("postcopy-blocktime") for e, r in engines.items()}
    return {
        "traceEvents": ev,
        "displayTimeUnit": "ms",
        "otherData": {"title": title, "argv": list(argv or []), "vcpus": n, "page-size": page_size,
                      "postcopy-blocktime-ms": totals, "stalls-from": main_name, "thinned": thinned},
    }


def write_trace_json(path: str, tl: Timeline, engines: dict, title: str, argv: Sequence[str] | None = None) -> str:
    """Write ``trace.json`` (compact JSON: a long run's trace stays small)."""
    from postcopy_core.outfile import open_output

    with open_output(path, private=True) as f:  # page addresses: guest data
        # dumps, not dump: dump streams through the pure-Python encoder, several times slower
        f.write(json.dumps(trace_events(tl, engines, title, argv), separators=(",", ":")))
        f.write("\n")
    return path
