"""The seed engine: QEMU's original (2018) postcopy blocktime accounting, reproduced to the letter.

What it does, and the flaws that must come out the same:

* Times are uint32 millisecond offsets from the context start; an offset below 1 becomes 1 (0 means
  "no fault" in the per-vCPU time slot), and the offset is masked to 32 bits, so it wraps after ~49.7
  days -- an offset of exactly 2**32 ms becomes 0 and that fault is then never ended.
* Each vCPU has ONE slot (address, fault time).  A second fault by the same vCPU before the first is
  ended overwrites the first: the first interval is lost.
* ``smp_cpus_down`` goes up when a fault lands in an empty slot; ``last_begin`` is the time of the
  latest fault of any vCPU.
* A fault on a page already received is undone: slot cleared and ``smp_cpus_down`` decremented, even
  when the slot held an earlier pending fault (which is then lost too, and the count goes low).
  ``last_begin`` is *not* undone.
* A ``received_late`` fault (only the QEMU-log importer makes them) is the received check of a begin
  that its page's placement overtook: it clears the already-released slot and decrements
  ``smp_cpus_down`` once more, so the count stays one low, as in QEMU 7.2.
* An end (placement) scans all vCPUs (O(vCPUs)); each vCPU whose slot holds this address and a
  non-zero time gets ``now - fault time`` added; if ``smp_cpus_down`` equalled the vCPU count at the
  first such vCPU, ``now - last_begin`` is added to the total.  Total, per-vCPU sums and the
  subtraction are all uint32.

Differences from the C code that change nothing observable: an empty slot is ``None`` instead of
address 0 (harness traces use RAM offsets, where 0 is a real page); non-vCPU faults are ignored, as
the C code ignores unknown threads.
"""

from __future__ import annotations

import numpy as np

from .common import NS_PER_MS, U32, check_vcpu
from .events import AR_LATE, KIND_FAULT, EventColumns, Fault, Placed, TraceMeta
from .modern import next_placement, received_mask


class SeedEngine:
    """Per-event seed engine; feed faults and placements in stream order."""

    name = "seed"

    def __init__(self, meta: TraceMeta) -> None:
        meta.check()
        self.meta = meta
        self.n = meta.vcpus
        self._start_ms = meta.start_ns // NS_PER_MS
        self._page_mask = ~(meta.page_size - 1)
        self.vcpu_addr: list[int | None] = [None] * self.n
        self.fault_time: list[int] = [0] * self.n  # page_fault_vcpu_time
        self.vcpu_blocktime: list[int] = [0] * self.n
        self.total = 0
        self.last_begin = 0
        self.cpus_down = 0
        self.received: set[int] = set()

    def offset(self, t_ns: int) -> int:
        """QEMU's get_low_time_offset: ms since context start, <1 -> 1, masked to uint32."""
        off = t_ns // NS_PER_MS - self._start_ms
        return 1 if off < 1 else off & U32

    def fault(self, ev: Fault) -> None:
        """mark_postcopy_blocktime_begin."""
        if ev.received_late:
            self.late_undo(ev.vcpu)
        else:
            self.begin(ev.t_ns, ev.addr, ev.vcpu, ev.already_received)

    def late_undo(self, cpu: int) -> None:
        """The received check of a begin that a placement overtook: it clears a slot the placement
        already released and decrements ``smp_cpus_down`` a second time (QEMU 7.2's race)."""
        if cpu < 0:
            return
        if cpu >= self.n:
            check_vcpu(self.meta, cpu)
        self.vcpu_addr[cpu] = None
        self.fault_time[cpu] = 0
        self.cpus_down -= 1

    def begin(self, t_ns: int, addr: int, cpu: int, ar: bool | None) -> None:
        """``fault()`` without the event object (the columnar replay calls this directly)."""
        if cpu < 0:
            return  # the 2018 code only tracks vCPU threads
        if cpu >= self.n:
            check_vcpu(self.meta, cpu)
        now = self.offset(t_ns)
        if self.vcpu_addr[cpu] is None:
            self.cpus_down += 1
        self.last_begin = now
        self.fault_time[cpu] = now
        self.vcpu_addr[cpu] = addr
        if ar is None:
            ar = (addr & self._page_mask) in self.received
        if ar:
            # The undo: forgets this slot whatever it held, and does not restore last_begin.
            self.vcpu_addr[cpu] = None
            self.fault_time[cpu] = 0
            self.cpus_down -= 1

    def begin_time_logged(self, cpu: int) -> int:
        """The ``time`` QEMU's begin trace line prints right after ``fault()`` (0 after the undo)."""
        return self.fault_time[cpu]

    def placed(self, ev: Placed) -> int:
        """mark_postcopy_blocktime_end; returns affected_cpu like QEMU's end trace line."""
        return self.end(ev.t_ns, ev.addr)

    def end(self, t_ns: int, addr: int) -> int:
        """``placed()`` without the event object."""
        self.received.add(addr & self._page_mask)
        now = self.offset(t_ns)
        affected = 0
        all_down = False
        vcpu_addr = self.vcpu_addr
        fault_time = self.fault_time
        # The O(vCPUs) scan, as in QEMU (the per-event reference; compute_columns avoids it).
        for i in range(self.n):
            began = fault_time[i]
            if vcpu_addr[i] != addr or began == 0:
                continue
            vcpu_addr[i] = None
            affected += 1
            if not all_down and self.cpus_down == self.n:
                all_down = True
            self.vcpu_blocktime[i] = (self.vcpu_blocktime[i] + ((now - began) & U32)) & U32
        self.cpus_down -= affected
        if all_down:
            self.total = (self.total + now - self.last_begin) & U32
        return affected

    def result(self) -> dict:
        """query-migrate fields (ms) plus a little state for diagnosis."""
        return {
            "postcopy-blocktime": self.total,
            "postcopy-vcpu-blocktime": list(self.vcpu_blocktime),
            "vcpus-down-at-end": self.cpus_down,
        }

    # Cheap state copies for the QEMU-log importer, which tries alternative interleavings.
    def snapshot(self) -> tuple:
        """Everything mutable except ``received`` (the importer passes already_received explicitly)."""
        return (
            list(self.vcpu_addr),
            list(self.fault_time),
            list(self.vcpu_blocktime),
            self.total,
            self.last_begin,
            self.cpus_down,
        )

    def restore(self, snap: tuple) -> None:
        """Undo to a ``snapshot()``."""
        va, ft, vb, self.total, self.last_begin, self.cpus_down = snap
        self.vcpu_addr, self.fault_time, self.vcpu_blocktime = list(va), list(ft), list(vb)


class IndexedSeedEngine(SeedEngine):
    """:class:`SeedEngine` with the same numbers and O(1) placements: an index from address to the
    vCPUs whose slot holds it (with a non-zero time) replaces the scan.  What ``make_engine("seed")``
    gives (live runs, per-event replay); the QEMU-log importer drives the plain scanning engine."""

    def __init__(self, meta: TraceMeta) -> None:
        super().__init__(meta)
        self._holders: dict[int, set[int]] = {}

    def begin(self, t_ns: int, addr: int, cpu: int, ar: bool | None) -> None:
        if cpu < 0:
            return
        if cpu >= self.n:
            check_vcpu(self.meta, cpu)
        old = self.vcpu_addr[cpu]
        if old is None:
            self.cpus_down += 1
        else:
            held = self._holders.get(old)
            if held is not None:
                held.discard(cpu)
        now = self.offset(t_ns)
        self.last_begin = now
        if ar is None:
            ar = (addr & self._page_mask) in self.received
        if ar:  # the undo, as in SeedEngine.begin
            self.vcpu_addr[cpu] = None
            self.fault_time[cpu] = 0
            self.cpus_down -= 1
            return
        self.fault_time[cpu] = now
        self.vcpu_addr[cpu] = addr
        if now:  # a slot whose time wrapped to 0 is never ended
            held = self._holders.get(addr)
            if held is None:
                self._holders[addr] = {cpu}
            else:
                held.add(cpu)

    def late_undo(self, cpu: int) -> None:
        if 0 <= cpu < self.n and self.vcpu_addr[cpu] is not None:
            held = self._holders.get(self.vcpu_addr[cpu])
            if held is not None:
                held.discard(cpu)
        super().late_undo(cpu)

    def end(self, t_ns: int, addr: int) -> int:
        self.received.add(addr & self._page_mask)
        held = self._holders.pop(addr, None)
        if not held:
            return 0
        now = self.offset(t_ns)
        all_down = self.cpus_down == self.n
        vcpu_addr, fault_time, blocktime = self.vcpu_addr, self.fault_time, self.vcpu_blocktime
        for i in held:
            vcpu_addr[i] = None
            blocktime[i] = (blocktime[i] + ((now - fault_time[i]) & U32)) & U32
        self.cpus_down -= len(held)
        if all_down:
            self.total = (self.total + now - self.last_begin) & U32
        return len(held)

    def restore(self, snap: tuple) -> None:
        super().restore(snap)
        self._holders = {}
        for i, a in enumerate(self.vcpu_addr):
            if a is not None and self.fault_time[i]:
                self._holders.setdefault(a, set()).add(i)


def compute_columns_per_event(meta: TraceMeta, cols: EventColumns) -> dict:
    """The seed engine over a column stream, one event at a time through :class:`SeedEngine` (the
    reference the vectorised :func:`compute_columns` is tested against; O(vCPUs) per placement)."""
    eng = SeedEngine(meta)
    begin, end = eng.begin, eng.end
    for k, t, a, v, f in zip(
        cols.kind.tolist(),
        cols.t_ns.tolist(),
        cols.addr.tolist(),
        cols.vcpu.tolist(),
        cols.flag.tolist(),
        strict=True,
    ):
        if k == KIND_FAULT:
            if f == AR_LATE:
                eng.late_undo(v)
            else:
                begin(t, a, v, None if f < 0 else f == 1)
        else:
            end(t, a)
    return eng.result()


def compute_columns(meta: TraceMeta, cols: EventColumns) -> dict:
    """The seed engine over a whole stream at once: the same numbers as :class:`SeedEngine`, flaws
    included, without its O(vCPUs) scan per placement.

    Each vCPU's single slot is filled by one of its faults and emptied by whichever comes first: its
    next fault (overwrite, or the already_received undo) or the first placement of exactly that
    address (only if the slot's time is non-zero; a time of 0 after the uint32 wrap is never ended).
    From that, every placement's affected vCPUs, ``smp_cpus_down`` (a running sum of +1 per fault
    into an empty slot, -1 per undo, -affected per placement) and ``last_begin`` (the latest vCPU
    fault's offset) follow with whole-array operations.
    """
    meta.check()
    if (cols.flag[cols.kind == KIND_FAULT] == AR_LATE).any():
        # QEMU 7.2's raced begin (only imported logs have one): rare and short, so per event
        return compute_columns_per_event(meta, cols)
    n = meta.vcpus
    m = len(cols)
    vcpu = cols.vcpu.astype(np.int64)
    is_vf = (cols.kind == KIND_FAULT) & (vcpu >= 0)  # the 2018 code ignores non-vCPU threads
    bad = np.flatnonzero(is_vf & (vcpu >= n))
    if bad.size:
        check_vcpu(meta, int(vcpu[bad[0]]))  # the first one in stream order, as per event
    fpos = np.flatnonzero(is_vf)
    if fpos.size == 0:
        return _result(n, 0, np.zeros(n, np.int64), 0)
    # get_low_time_offset for every event
    off = cols.t_ns // NS_PER_MS - meta.start_ns // NS_PER_MS
    now = np.where(off < 1, 1, off & U32)
    ar = received_mask(cols, meta.page_size)[fpos]
    fv = vcpu[fpos]
    # each vCPU's next fault (stable sort keeps stream order within a vCPU)
    order = np.argsort(fv, kind="stable")
    sv, sp = fv[order], fpos[order]
    same = np.r_[sv[1:] == sv[:-1], False]
    nxt_sorted = np.where(same, np.r_[sp[1:], m], m)
    first_sorted = np.r_[True, ~same[:-1]]
    next_fault = np.empty_like(fpos)
    next_fault[order] = nxt_sorted
    rpos = next_placement(cols, fpos, cols.addr)
    ended = ~ar & (now[fpos] != 0) & (rpos >= 0) & (rpos < next_fault)
    # the slot is empty at a fault if it is the vCPU's first, or its previous fault left nothing
    prev_sorted = np.r_[0, order[:-1]]
    empty_sorted = first_sorted | ar[prev_sorted] | ended[prev_sorted]
    empty = np.empty_like(ar)
    empty[order] = empty_sorted

    ep = rpos[ended]
    per = np.zeros(n, np.int64)
    np.add.at(per, fv[ended], (now[ep] - now[fpos][ended]) & U32)
    affected = np.bincount(ep, minlength=m)
    delta = -affected
    delta[fpos] += empty.astype(np.int64) - ar.astype(np.int64)
    down_after = np.cumsum(delta)
    down_before = down_after - delta
    last_fault = np.maximum.accumulate(np.where(is_vf, np.arange(m), -1))
    last_begin = np.where(last_fault >= 0, now[np.maximum(last_fault, 0)], 0)
    all_down = (affected > 0) & (down_before == n)
    total = int((now[all_down] - last_begin[all_down]).sum()) & U32
    return _result(n, total, per & U32, int(down_after[-1]))


def _result(n: int, total: int, per: np.ndarray, down: int) -> dict:
    return {"postcopy-blocktime": total, "postcopy-vcpu-blocktime": per.tolist(), "vcpus-down-at-end": down}
