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

from .common import NS_PER_MS, U32, check_vcpu
from .events import AR_LATE, KIND_FAULT, EventColumns, Fault, Placed, TraceMeta


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
        # The O(vCPUs) scan is the algorithm; keep it (bench/bench_replay.py measures its cost).
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


def compute_columns(meta: TraceMeta, cols: EventColumns) -> dict:
    """The seed engine over a column stream (same code path as per event, minus the objects)."""
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
