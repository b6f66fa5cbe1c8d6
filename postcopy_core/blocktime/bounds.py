"""Bounds on the real blocked time of an imported log, where nothing measured the truth.

A QEMU log says when each fault was recorded and when each page was placed, not when each vCPU ran
again.  A vCPU's wait can be cut short (a signal ends the wait, the vCPU runs and faults elsewhere)
while its old fault stays pending until its page arrives, so:

* **upper** -- the exact engine: the union, per vCPU, of every fault-to-placement interval.  It counts
  a vCPU as blocked until each of its pending faults is placed.
* **lower** -- only each vCPU's latest pending fault blocks it: an interval ends at its placement or
  at the same vCPU's next fault, whichever comes first (a vCPU that faults again was running).

The real value lies between them; when no wait was ever cut short the two are equal.  Both give the
system-wide figure (time when every vCPU is blocked) the same way.  Only a live run, which has each
vCPU's own clock, has a measured truth.
"""

from __future__ import annotations

import numpy as np

from .common import NS_PER_MS
from .events import AR_LATE, KIND_FAULT, EventColumns, TraceMeta
from .exact import compute_columns as exact_columns
from .exact import interval_measures
from .modern import next_placement, received_mask


def _summary(per: np.ndarray, all_ns: int) -> dict:
    return {
        "postcopy-blocktime": int(all_ns) // NS_PER_MS,
        "postcopy-vcpu-blocktime": (per // NS_PER_MS).tolist(),
        "blocktime-ns": int(all_ns),
        "vcpu-blocktime-ns": per.tolist(),
    }


def lower_bound(meta: TraceMeta, cols: EventColumns) -> dict:
    """Blocked time counting only each vCPU's latest pending fault (ms and ns, like the engines)."""
    meta.check()
    n = meta.vcpus
    if len(cols) == 0:
        return _summary(np.zeros(n, np.int64), 0)
    t = cols.t_ns
    is_fault = cols.kind == KIND_FAULT
    ar = received_mask(cols, meta.page_size)
    waits = np.flatnonzero(is_fault & ~ar & (cols.vcpu >= 0))
    page = cols.addr & ~np.int64(meta.page_size - 1)
    rpos = next_placement(cols, waits, page)
    end = np.where(rpos >= 0, t[np.where(rpos >= 0, rpos, 0)], int(t.max()))
    # The same vCPU's next fault of any kind (the second half of a raced begin is not a new fault).
    touches = np.flatnonzero(is_fault & (cols.vcpu >= 0) & (cols.flag != AR_LATE))
    v = cols.vcpu[touches].astype(np.int64)
    order = np.lexsort((touches, v))
    st, sv = touches[order], v[order]
    nxt = np.full(st.size, -1, np.int64)
    same = sv[1:] == sv[:-1]
    nxt[:-1][same] = st[1:][same]
    next_touch = np.full(len(cols), -1, np.int64)
    next_touch[st] = nxt
    nt = next_touch[waits]
    end = np.where(nt >= 0, np.minimum(end, t[np.where(nt >= 0, nt, 0)]), end)
    start = t[waits]
    end = np.maximum(end, start)
    per, all_ns = interval_measures(n, cols.vcpu[waits].astype(np.int64), start, end)
    return _summary(per, all_ns)


def blocktime_bounds(meta: TraceMeta, cols: EventColumns) -> dict:
    """``{"upper": ..., "lower": ...}`` for an imported log (see the module docstring)."""
    upper = exact_columns(meta, cols)
    return {
        "upper": {
            k: upper[k] for k in ("postcopy-blocktime", "postcopy-vcpu-blocktime", "blocktime-ns", "vcpu-blocktime-ns")
        },
        "lower": lower_bound(meta, cols),
    }
