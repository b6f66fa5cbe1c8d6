"""The event model shared by the live run, trace files, the QEMU-log importer and the engines.

A postcopy destination sees two kinds of event that matter for blocktime:

* a *fault*: a thread touched a page that has not arrived yet (``Fault``); ``vcpu >= 0`` for a vCPU
  thread, ``vcpu == -1`` for any other thread (QEMU 10.1 tracks those for latency only);
* a *placement*: the page arrived and was mapped in (``Placed``), which wakes whoever waits on it.

Times are integer nanoseconds on one clock; ``TraceMeta.start_ns`` is the instant the accounting
context was created (the seed engine's millisecond offsets count from there).

``EventColumns`` is the same stream as parallel numpy arrays, for the engines' fast replay path.

A live run also has what no handler-side event shows: each vCPU worker's own record of every stalled
access (``StallColumns``: vCPU, start, end on the same clock).  They travel with the event columns
(``EventColumns.stalls``) into traces and to the ``truth`` engine; QEMU logs have none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BlocktimeError",
    "Fault",
    "Placed",
    "TraceMeta",
    "Event",
    "EventColumns",
    "StallColumns",
    "KIND_FAULT",
    "KIND_PLACED",
    "AR_UNKNOWN",
    "MAX_VCPUS",
    "MAX_PAGE_SIZE",
]

# Bounds on what a trace or log may declare, checked before anything is sized by them: a crafted
# file must get one line, not a MemoryError.  4x KVM's x86 limit (4096) and the largest huge page.
MAX_VCPUS = 16384
MAX_PAGE_SIZE = 1 << 30
MAX_NS = (1 << 63) - 1  # times live in int64 columns


class BlocktimeError(ValueError):
    """Bad trace or log input; the message is one line, naming the line number where there is one."""


@dataclass(frozen=True, slots=True)
class Fault:
    """A page fault reported to the destination.

    ``vcpu`` is the vCPU index, or -1 for a non-vCPU thread.  ``tid`` is the faulting thread id when
    known (0 otherwise).  ``already_received`` records what the fault handler saw in its received
    bitmap when it processed the fault; ``None`` lets each engine decide from the placements it has
    already seen (a page counts as received once any placement covered it).

    ``received_late`` marks the second half of a fault that QEMU 7.2's accounting raced with a
    placement (only the QEMU-log importer makes these): the slot was filled by an earlier
    ``Fault(already_received=False)`` of the same vCPU, a placement released it, and only then did
    the received check run and undo a slot that was already empty.  The seed engine applies just
    that undo (``smp_cpus_down`` goes one low, as in QEMU); the other engines see an
    already-received fault.  It always has ``already_received=True``.
    """

    t_ns: int
    addr: int
    vcpu: int
    tid: int = 0
    already_received: bool | None = None
    received_late: bool = False


@dataclass(frozen=True, slots=True)
class Placed:
    """A page was placed at ``addr`` (UFFDIO_COPY or UFFDIO_ZEROPAGE succeeded)."""

    t_ns: int
    addr: int
    zero: bool = False


Event = Fault | Placed


@dataclass
class TraceMeta:
    """Run metadata every engine needs.

    ``vcpus`` is the vCPU count the accounting assumes (QEMU's ``smp_cpus``): a vCPU that never faults
    still counts, which is why the seed's total can stay 0.  ``page_size`` maps addresses to pages for
    the received check.  ``tid_map`` maps thread ids to vCPU indexes (used when a trace gives only tids).
    """

    vcpus: int
    page_size: int
    tid_map: dict[int, int] = field(default_factory=dict)
    start_ns: int = 0
    source: str = "harness"
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise BlocktimeError when the metadata cannot describe a run."""
        if not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= MAX_VCPUS:
            raise BlocktimeError(f"vcpus must be an integer in 1..{MAX_VCPUS}, got {_short(self.vcpus)}")
        ps = self.page_size
        if not isinstance(ps, int) or not 1 <= ps <= MAX_PAGE_SIZE or ps & (ps - 1):
            raise BlocktimeError(f"page_size must be a power of two up to {MAX_PAGE_SIZE}, got {_short(ps)}")
        if not isinstance(self.start_ns, int) or not 0 <= self.start_ns <= MAX_NS:
            raise BlocktimeError(f"start_ns must be an integer in 0..2^63-1, got {_short(self.start_ns)}")
        for tid, vcpu in self.tid_map.items():
            if not 0 <= tid <= MAX_NS or not -1 <= vcpu < MAX_VCPUS:
                raise BlocktimeError(f"tid_map entry {_short(tid)} -> {_short(vcpu)} is out of range")


def _short(value: object) -> str:
    """A declared value for an error line: crafted numbers can have thousands of digits."""
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


# Column encodings.
KIND_FAULT = 0
KIND_PLACED = 1
AR_UNKNOWN = -1  # ``flag`` for a fault whose already_received is None
AR_LATE = 2  # ``flag`` for a fault with received_late (counts as already received)


@dataclass
class StallColumns:
    """The vCPUs' own stall intervals: access i of vCPU ``vcpu[i]`` was stalled during
    [``start_ns[i]``, ``end_ns[i]``), on the page at ``addr[i]`` (order does not matter)."""

    vcpu: np.ndarray  # int32
    start_ns: np.ndarray  # int64
    end_ns: np.ndarray  # int64
    addr: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.vcpu.shape[0])

    @classmethod
    def from_lists(
        cls, vcpu: Sequence[int], start_ns: Sequence[int], end_ns: Sequence[int], addr: Sequence[int] | None = None
    ) -> StallColumns:
        """Build from equally long Python sequences (``addr`` defaults to 0)."""
        try:
            out = cls(
                vcpu=np.asarray(vcpu, dtype=np.int32),
                start_ns=np.asarray(start_ns, dtype=np.int64),
                end_ns=np.asarray(end_ns, dtype=np.int64),
                addr=np.asarray([0] * len(vcpu) if addr is None else addr, dtype=np.int64),
            )
        except OverflowError as exc:
            raise BlocktimeError(f"a stall time or address does not fit in 63 bits: {exc}") from None
        if not (out.vcpu.shape == out.start_ns.shape == out.end_ns.shape == out.addr.shape):
            raise BlocktimeError("stall columns must be equally long")
        return out


@dataclass
class EventColumns:
    """An event stream as parallel arrays (index = position in the stream).

    ``flag`` holds already_received for faults (-1 unknown, 0, 1, 2 = received_late) and the zero
    flag for placements.
    ``vcpu`` and ``tid`` are 0 for placements.
    """

    kind: np.ndarray  # int8
    t_ns: np.ndarray  # int64
    addr: np.ndarray  # int64 (addresses above 2**63 are not supported)
    vcpu: np.ndarray  # int32
    tid: np.ndarray  # int64
    flag: np.ndarray  # int8
    stalls: StallColumns | None = None  # the vCPUs' own stall intervals, when recorded

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @classmethod
    def from_lists(
        cls,
        kind: Sequence[int],
        t_ns: Sequence[int],
        addr: Sequence[int],
        vcpu: Sequence[int],
        tid: Sequence[int],
        flag: Sequence[int],
    ) -> EventColumns:
        """Build from equally long Python sequences."""
        try:
            return cls(
                kind=np.asarray(kind, dtype=np.int8),
                t_ns=np.asarray(t_ns, dtype=np.int64),
                addr=np.asarray(addr, dtype=np.int64),
                vcpu=np.asarray(vcpu, dtype=np.int32),
                tid=np.asarray(tid, dtype=np.int64),
                flag=np.asarray(flag, dtype=np.int8),
            )
        except OverflowError as exc:
            raise BlocktimeError(f"a time, address or thread id does not fit in 63 bits: {exc}") from None

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> EventColumns:
        """Convert per-event objects to columns."""
        kind: list[int] = []
        t: list[int] = []
        addr: list[int] = []
        vcpu: list[int] = []
        tid: list[int] = []
        flag: list[int] = []
        for ev in events:
            t.append(ev.t_ns)
            addr.append(ev.addr)
            if type(ev) is Fault:
                kind.append(KIND_FAULT)
                vcpu.append(ev.vcpu)
                tid.append(ev.tid)
                ar = ev.already_received
                flag.append(AR_LATE if ev.received_late else AR_UNKNOWN if ar is None else int(ar))
            elif type(ev) is Placed:
                kind.append(KIND_PLACED)
                vcpu.append(0)
                tid.append(0)
                flag.append(int(ev.zero))
            else:
                raise BlocktimeError(f"not a blocktime event: {ev!r}")
        return cls.from_lists(kind, t, addr, vcpu, tid, flag)

    def to_events(self) -> list[Event]:
        """Convert back to per-event objects (for the live-style engines)."""
        out: list[Event] = []
        append = out.append
        for k, t, a, v, d, f in zip(
            self.kind.tolist(),
            self.t_ns.tolist(),
            self.addr.tolist(),
            self.vcpu.tolist(),
            self.tid.tolist(),
            self.flag.tolist(),
            strict=True,
        ):
            if k == KIND_FAULT:
                append(Fault(t, a, v, d, None if f < 0 else bool(f), f == AR_LATE))
            else:
                append(Placed(t, a, bool(f)))
        return out


def page_of(addr: int, page_size: int) -> int:
    """The page-aligned address that contains ``addr`` (page_size is a power of two)."""
    return addr & ~(page_size - 1)
