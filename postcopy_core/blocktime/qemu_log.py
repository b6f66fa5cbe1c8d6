"""Import a QEMU destination trace log (``log`` trace backend, ``-msg timestamp=on``) as events.

Lines look like ``TID@SEC.USEC:event args``.  What the 2018-era accounting (QEMU <= 10.0) logs:

* ``mark_postcopy_blocktime_begin addr, dd, time, cpu, already_received`` -- ``time`` is the vCPU's
  fault time as a ms offset from the context start (0 when already_received);
* ``mark_postcopy_blocktime_end addr, dd, time, affected_cpu`` -- ``time`` is the running TOTAL
  blocktime, not a time: when it moves, the end happened at ``last_begin + increase``; otherwise its
  time must come from the wall-clock stamp;
* ``postcopy_ram_fault_thread_request ... pid`` and ``get_mem_fault_cpu_index cpu, pid`` -- used for
  the tid -> vCPU map and to find non-vCPU faults (a request with no begin after it);
* ``postcopy_place_page_zero host`` (before its end line) -- marks zero pages.

Reconstruction:

1. Clock.  Stamps are wall-clock microseconds; offsets are milliseconds of QEMU's realtime clock since
   the context start.  Every begin with ``time >= 2`` says ``offset_ns(stamp) in [T ms, T+1 ms)``,
   which bounds the clock difference ``K`` from both sides; so does every end whose moved total fixed
   its millisecond (known after a first pass, used in a second).  The middle of the intersection of
   the bounds within +-1 s of a stamp (so slow drift is followed) maps it to the offset clock (see
   ``_Clock``).  Every line is stamped a few microseconds after its clock read; the delays mostly
   cancel.
2. Order.  Lines of one thread are in order; the fault thread's and the placing thread's lines
   interleave by stamp, but stamps within a few ms can disagree with the order the accounting ran.
   Ends are taken in order; before each, the fault-thread lines stamped up to it are applied to a seed
   engine, and if the resulting ``affected_cpu`` and running total do not match the end line, nearby
   alternative interleavings are tried.  An end that no interleaving explains is counted as a
   mismatch and the seed's total is resynchronised to the log.
   One real race is modelled: an already-received begin whose own page's end released the slot it
   had just filled (the begin logs ``time: 0``, the end ``affected_cpu: 1``); it becomes a fault, the
   placement, and a ``received_late`` fault (the seed's second ``smp_cpus_down`` decrement).
3. Times.  Begin: inside ``[T ms, T+1 ms)``, refined by the stamp.  End with a moved total:
   ``last_begin + increase`` ms, refined by the stamp; otherwise the stamp mapped through the clock.

The seed engine replaying the result reproduces every explained end line, hence QEMU's own
``postcopy-blocktime``; ``postcopy-vcpu-blocktime`` depends on end times read from stamps, good to
about a millisecond in total.
"""

from __future__ import annotations

import bisect
import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .common import NS_PER_MS, U32
from .events import BlocktimeError, Event, Fault, Placed, TraceMeta
from .qemu_logfile import check_vcpus, read_log_lines, split_migrations
from .seed import SeedEngine

# Field widths are bounded so no number can be larger than its C type: addresses 64 bits (a log
# address above 2**63 is refused later), ms offsets and counts 32 bits, tids 32 bits.
_LINE = re.compile(r"(\d{1,10})@(\d{1,12})\.(\d{1,9}):(\w+)(?: (.*))?")
_BEGIN = re.compile(
    r"addr: 0x([0-9a-fA-F]{1,16}), dd: (\S+), time: (\d{1,10}), cpu: (-?\d{1,10}), "
    r"already_received: (-?\d{1,10})\s*"
)
_END = re.compile(r"addr: 0x([0-9a-fA-F]{1,16}), dd: (\S+), time: (\d{1,10}), affected_cpu: (-?\d{1,10})\s*")
_PLACE = re.compile(r"host=(0x[0-9a-fA-F]{1,16}|\(nil\))\s*")
_REQUEST = re.compile(
    r"Request for HVA=0x([0-9a-fA-F]{1,16}) rb=(\S*) offset=0x([0-9a-fA-F]{1,16}) pid=(\d{1,10})\s*"
)
_CPU_INDEX = re.compile(r"cpu: (-?\d{1,10}), pid: (\d{1,10})\s*")
_CLEANUP = re.compile(r"total blocktime (\d{1,10})\s*")
_BARE = re.compile(r"(mark_postcopy_blocktime_begin|mark_postcopy_blocktime_end) addr:")

CLOCK_WINDOW_NS = 1_000_000_000  # begins within +-1 s bound the clock difference for a stamp
ORDER_SLACK_NS = 2_000_000  # stamps this close may be in either order
EXTRA_CANDIDATES = 4  # also try this many fault-thread lines stamped after the window
BACKTRACK_ENDS = 8  # how many earlier ends an unexplained end may revisit
BACKTRACK_BUDGET = 64  # rewinds allowed before giving up on one end


@dataclass(slots=True)
class _Begin:
    line: int
    w: int  # stamp, ns
    addr: int
    time: int  # logged ms offset (0 when already received)
    cpu: int
    ar: bool
    pid: int


@dataclass(slots=True)
class _NonVcpu:
    line: int
    w: int
    addr: int
    pid: int


@dataclass(slots=True)
class _End:
    line: int
    w: int
    addr: int
    total: int
    affected: int
    zero: bool


@dataclass
class _Parsed:
    fault_items: list  # _Begin | _NonVcpu in fault-thread order
    ends: list[_End]
    tid_map: dict[int, int]
    dds: dict[str, int]
    cleanup_total: int | None
    placed_addrs_or: int


def _parse(path: str, lines: list[tuple[int, str]]) -> _Parsed:
    st = _ParseState(path)
    for n, line in lines:
        m = _LINE.match(line)
        if m is None:
            if _BARE.match(line):
                raise BlocktimeError(
                    f"{path}: line {n}: trace line without 'TID@SEC.USEC:' stamp "
                    "(record the log with -msg timestamp=on)"
                )
            continue
        thread, sec, usec, event, args = m.groups()
        args = args or ""
        if event not in _HANDLED:
            continue
        w = int(sec) * 1_000_000_000 + int(usec.ljust(6, "0")[:6]) * 1000
        getattr(st, _HANDLED[event])(n, w, int(thread), event, args)
    for thread in list(st.pending_req):
        st.flush_request(thread)
    return _Parsed(st.items, st.ends, st.tid_map, st.dds, st.cleanup, st.addr_or)


class _ParseState:
    """What the lines of a QEMU 7.2 log said so far; one method per trace event it reads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list = []
        self.ends: list[_End] = []
        self.tid_map: dict[int, int] = {}
        self.dds: dict[str, int] = {}
        self.cleanup: int | None = None
        self.pending_req: dict[int, tuple[int, int, int, int]] = {}  # thread -> (line, w, addr, pid)
        self.last_zero: dict[int, int] = {}
        self.addr_or = 0

    def _match(self, pattern: re.Pattern, n: int, event: str, args: str, what: str) -> re.Match:
        a = pattern.fullmatch(args)
        if a is None:
            raise BlocktimeError(f"{self.path}: line {n}: malformed {event} ({what}): {args[:80]!r}")
        return a

    def flush_request(self, thread: int) -> None:
        req = self.pending_req.pop(thread, None)
        if req is not None and req[3] != 0 and self.tid_map.get(req[3], -1) < 0:
            self.items.append(_NonVcpu(req[0], req[1], req[2], req[3]))

    def begin(self, n: int, w: int, thread: int, event: str, args: str) -> None:
        a = self._match(_BEGIN, n, event, args, "expected 'addr: 0x.., dd: .., time: N, cpu: N, already_received: N'")
        req = self.pending_req.pop(thread, None)
        pid = req[3] if req is not None else 0
        cpu = int(a.group(4))
        if cpu >= 0:
            check_vcpus(self.path, "vCPU index", cpu, n)
        if pid and cpu >= 0:
            self.tid_map.setdefault(pid, cpu)
        self.dds[a.group(2)] = self.dds.get(a.group(2), 0) + 1
        self.items.append(_Begin(n, w, int(a.group(1), 16), int(a.group(3)), cpu, a.group(5) != "0", pid))

    def end(self, n: int, w: int, thread: int, event: str, args: str) -> None:
        a = self._match(_END, n, event, args, "expected 'addr: 0x.., dd: .., time: N, affected_cpu: N'")
        addr = int(a.group(1), 16)
        self.dds[a.group(2)] = self.dds.get(a.group(2), 0) + 1
        zero = self.last_zero.pop(thread, None) == addr
        self.addr_or |= addr
        self.ends.append(_End(n, w, addr, int(a.group(3)), int(a.group(4)), zero))

    def place_zero(self, n: int, w: int, thread: int, event: str, args: str) -> None:
        a = self._match(_PLACE, n, event, args, "expected 'host=0x..'")
        self.last_zero[thread] = 0 if a.group(1) == "(nil)" else int(a.group(1), 16)

    def request(self, n: int, w: int, thread: int, event: str, args: str) -> None:
        a = self._match(_REQUEST, n, event, args, "expected 'Request for HVA=0x.. rb=.. offset=0x.. pid=N'")
        self.flush_request(thread)
        self.pending_req[thread] = (n, w, int(a.group(1), 16), int(a.group(4)))

    def cpu_index(self, n: int, w: int, thread: int, event: str, args: str) -> None:
        a = self._match(_CPU_INDEX, n, event, args, "expected 'cpu: N, pid: N'")
        cpu, pid = int(a.group(1)), int(a.group(2))
        if cpu >= 0:
            check_vcpus(self.path, "vCPU index", cpu, n)
            self.tid_map[pid] = cpu
        else:
            self.flush_request(thread)

    def cleanup_line(self, n: int, w: int, thread: int, event: str, args: str) -> None:
        a = self._match(_CLEANUP, n, event, args, "expected 'total blocktime N'")
        self.cleanup = int(a.group(1))


# the trace events read, and the _ParseState method that reads each
_HANDLED = {
    "mark_postcopy_blocktime_begin": "begin",
    "mark_postcopy_blocktime_end": "end",
    "postcopy_place_page_zero": "place_zero",
    "postcopy_ram_fault_thread_request": "request",
    "get_mem_fault_cpu_index": "cpu_index",
    "postcopy_ram_incoming_cleanup_blocktime": "cleanup_line",
}


class _Clock:
    """Maps a wall-clock stamp (ns) to the offset clock (ns since the context start).

    Each sample is a line whose clock read fell in a known millisecond ``M`` of the offset clock (a
    begin's ``time``, or an end whose moved total fixes its millisecond): it bounds the clock
    difference ``K = stamp - offset`` to ``(stamp - (M+1) ms, stamp - M ms]``.  Intersecting the
    bounds of every sample within +-1 s (slow drift is followed) and taking the middle keeps ``K``
    within a few microseconds when the samples are many, where the smallest upper bound alone can be
    up to a millisecond off when they are sparse.  An empty intersection (a sample stamped late)
    falls back to the upper bound.
    """

    def __init__(self, begins: list[_Begin], ends_ms: list[tuple[int, int]] = ()) -> None:
        marks = [(b.w, b.time) for b in begins if not b.ar and b.time >= 2]
        if not marks:  # tiny logs: use whatever begins there are
            marks = [(b.w, max(b.time, 1)) for b in begins if not b.ar]
        if not marks:
            raise BlocktimeError("no begin line with a fault time: cannot relate stamps to QEMU's clock")
        marks.extend(ends_ms)
        marks.sort()
        self.ws = [w for w, _ in marks]
        hi = _window_extreme(self.ws, [w - m * NS_PER_MS for w, m in marks], min)
        lo = _window_extreme(self.ws, [w - (m + 1) * NS_PER_MS for w, m in marks], max)
        self.bound = [(a + b) // 2 if a < b else b for a, b in zip(lo, hi, strict=True)]
        self.samples = len(marks)

    def offset_ns(self, w: int) -> int:
        i = bisect.bisect_left(self.ws, w)
        if i == len(self.ws) or (i > 0 and w - self.ws[i - 1] <= self.ws[i] - w):
            i -= 1
        return w - self.bound[i]


def _window_extreme(ws: list[int], values: list[int], pick: Callable[[int, int], int]) -> list[int]:
    """For each sample, ``pick`` (min or max) of the values of samples within +-CLOCK_WINDOW_NS."""
    out = []
    dq: deque[int] = deque()  # indexes whose values are ever less preferred
    hi = lo = 0
    for w in ws:
        while hi < len(ws) and ws[hi] <= w + CLOCK_WINDOW_NS:
            while dq and pick(values[dq[-1]], values[hi]) == values[hi]:
                dq.pop()
            dq.append(hi)
            hi += 1
        while ws[lo] < w - CLOCK_WINDOW_NS:
            lo += 1
        while dq[0] < lo:
            dq.popleft()
        out.append(values[dq[0]])
    return out


def _clamp_ms(t_ns: int, ms: int) -> int:
    """A time inside millisecond ``ms`` (of the offset clock), as close to ``t_ns`` as possible."""
    lo = ms * NS_PER_MS
    return min(max(t_ns, lo), lo + NS_PER_MS - 1)


def _infer_page_size(addr_or: int) -> int:
    if addr_or == 0:
        return 4096
    low = addr_or & -addr_or
    return max(4096, min(low, 1 << 30))


def import_qemu_migrations(
    path: str | os.PathLike, vcpus: int | None = None
) -> list[tuple[TraceMeta, list[Event]]]:
    """Every migration in a QEMU trace log, in file order, each as (metadata, events).

    QEMU <= 10.0 logs are reconstructed as the module docstring says; QEMU 10.1+ logs (events
    ``postcopy_blocktime_*``) are read by ``qemu101_log``.  ``vcpus`` applies to every migration.
    ``meta.extra["qemu"]["migration"]`` is the 1-based position and ``first_line`` where it starts.
    """
    from .qemu101_log import import_qemu101_piece, is_qemu101

    path = os.fspath(path)
    if vcpus is not None:
        check_vcpus(path, "--vcpus", vcpus)
    pieces = split_migrations(read_log_lines(path))
    if not pieces:
        raise BlocktimeError(
            f"{path}: no mark_postcopy_blocktime_begin/end lines (enable those trace events and the "
            "postcopy-blocktime capability on the destination)"
        )
    out = []
    for k, piece in enumerate(pieces, 1):
        if is_qemu101(piece):
            meta, events = import_qemu101_piece(path, piece, vcpus)
        else:
            meta, events = _import_piece(path, piece, vcpus)
        meta.extra["qemu"].update({"migration": k, "migrations": len(pieces), "first_line": piece[0][0]})
        out.append((meta, events))
    return out


def import_qemu_log(path: str | os.PathLike, vcpus: int | None = None) -> tuple[TraceMeta, list[Event]]:
    """Reconstruct the fault/placement stream of a QEMU trace log holding one migration.

    ``vcpus`` is QEMU's smp_cpus; without it, the highest vCPU index seen + 1 is assumed (recorded as
    ``extra["qemu"]["vcpus_inferred"]``).  Diagnostics go to ``meta.extra["qemu"]``.  A log with
    several migrations is refused here: use ``import_qemu_migrations``.
    """
    found = import_qemu_migrations(path, vcpus)
    if len(found) > 1:
        raise BlocktimeError(
            f"{os.fspath(path)}: {len(found)} migrations in this log (replay them with --migration N)"
        )
    return found[0]


def _import_piece(
    path: str, lines: list[tuple[int, str]], vcpus: int | None
) -> tuple[TraceMeta, list[Event]]:
    """One QEMU <= 10.0 migration's lines -> (metadata, events)."""
    p = _parse(path, lines)
    begins = [it for it in p.fault_items if isinstance(it, _Begin)]
    if not begins and not p.ends:
        raise BlocktimeError(
            f"{path}: no mark_postcopy_blocktime_begin/end lines (enable those trace events and the "
            "postcopy-blocktime capability on the destination)"
        )
    if not begins:
        raise BlocktimeError(f"{path}: no mark_postcopy_blocktime_begin lines, only end lines")
    if len(p.dds) > 1:
        raise BlocktimeError(
            f"{path}: lines from {len(p.dds)} blocktime contexts (dd={', '.join(sorted(p.dds))}); "
            "split the log per migration"
        )
    max_cpu = max(b.cpu for b in begins)
    if max_cpu < 0:
        raise BlocktimeError(f"{path}: begin lines carry no vCPU index")
    inferred = vcpus is None
    n = max_cpu + 1 if vcpus is None else vcpus
    if n <= max_cpu:
        raise BlocktimeError(f"--vcpus {n} is smaller than the {max_cpu + 1} vCPUs the log {path} uses "
                             f"(vCPU {max_cpu} faults)")
    meta = TraceMeta(
        vcpus=n,
        page_size=_infer_page_size(p.placed_addrs_or),
        tid_map=dict(p.tid_map),
        start_ns=0,
        source="qemu-log",
    )
    clock = _Clock(begins)
    events, diag, ends_ms = _reconstruct(meta, p, clock)
    if ends_ms:
        # Second pass: the ends whose millisecond the first pass fixed sharpen the clock.
        clock = _Clock(begins, ends_ms)
        events, diag, _ = _reconstruct(meta, p, clock)
    final_logged = p.cleanup_total if p.cleanup_total is not None else (p.ends[-1].total if p.ends else 0)
    # an end that woke a vCPU for an address no begin line ever named: impossible in a whole log
    named = {b.addr for b in begins}
    orphans = [e.line for e in p.ends if e.affected > 0 and e.addr not in named]
    diag.update(
        {
            "ends_without_begin": len(orphans),
            "first_ends_without_begin": orphans[:10],
            "begin_lines": len(begins),
            "already_received_begins": sum(1 for b in begins if b.ar),
            "non_vcpu_faults": sum(1 for it in p.fault_items if isinstance(it, _NonVcpu)),
            "end_lines": len(p.ends),
            "logged_total_ms": final_logged,
            "vcpus_inferred": inferred,
            "clock_samples": clock.samples,
            "dd": next(iter(p.dds), None),
        }
    )
    meta.extra = {"qemu": diag}
    return meta, events


def _split(cand: int) -> tuple[int, int]:
    """A candidate explanation of one end line, encoded as an int: (fault-thread items applied
    before the end, 1 if the next item is an already-received begin that raced the end)."""
    return cand >> 1, cand & 1


def _reconstruct(
    meta: TraceMeta, p: _Parsed, clock: _Clock
) -> tuple[list[Event], dict, list[tuple[int, int]]]:
    """The event stream, diagnostics, and (stamp, ms) of every verified end whose total moved."""
    return _Reconstruction(meta, p, clock).run()


class _Reconstruction:
    """The search behind :func:`_reconstruct`: for each end line, the interleaving of fault-thread
    lines before it that lets the seed engine reproduce the end's numbers (stamp order first), with
    rewinds over the last few ends when nothing explains one."""

    def __init__(self, meta: TraceMeta, p: _Parsed, clock: _Clock) -> None:
        self.seed = SeedEngine(meta)
        self.p, self.clock = p, clock
        self.items = p.fault_items
        self.out: list[Event] = []
        self.mismatches: list[int] = []
        self.reordered = 0
        self.splits = 0
        self.ends_ms: dict[int, tuple[int, int]] = {}  # end index -> (stamp, its millisecond)
        self.fi = 0  # next fault-thread item not yet applied
        self.last_end_ns = 0
        self.prev_total = 0
        # Recent decisions, so that an end nothing explains can revisit the ends before it: a late
        # stamp can make an earlier end look as if it came after fault lines it really preceded.
        self.frames: deque[tuple] = deque(maxlen=BACKTRACK_ENDS)
        self.forced: dict[int, list[int]] = {}  # end index -> interleavings still to try there
        self.ends = p.ends
        self.k = 0
        self.max_k = -1
        self.budget = BACKTRACK_BUDGET
        self.checkpoint: tuple | None = None  # state when the current run of rewinds began
        self.give_up = -1  # an end to record as a mismatch without trying rewinds again

    def item_event(self, it: _Begin | _NonVcpu) -> Fault:
        clock = self.clock
        if isinstance(it, _NonVcpu):
            return Fault(clock.offset_ns(it.w), it.addr, -1, it.pid, None)
        t = clock.offset_ns(it.w)
        if not it.ar:
            t = _clamp_ms(t, it.time)
        return Fault(max(t, 0), it.addr, it.cpu, it.pid, it.ar)

    def apply_items(self, upto: int) -> list[Fault]:
        evs = [self.item_event(self.items[k]) for k in range(self.fi, upto)]
        for ev in evs:
            self.seed.fault(ev)
        return evs

    def end_event(self, e: _End) -> tuple[Placed, int, int | None]:
        """The end's time given the seed's current state, and how natural that explanation is:
        2 = as expected, 1 = needs a same-millisecond coincidence, 0 = far from its stamp; and the
        end's millisecond when the moved total fixes it."""
        seed = self.seed
        est = max(self.clock.offset_ns(e.w), self.last_end_ns)
        est_ms = est // NS_PER_MS
        delta = (e.total - self.prev_total) & U32
        releases = [i for i in range(seed.n) if seed.vcpu_addr[i] == e.addr and seed.fault_time[i]]
        if delta:
            ms = (seed.last_begin + delta) & U32
            t = _clamp_ms(est, ms)
            quality = 2 if abs(ms - est_ms) <= 2 else 0
        elif releases and seed.cpus_down == seed.n:
            # All vCPUs down and this end releases one, yet the total did not grow: it ran in the
            # same millisecond as the last begin.
            t = _clamp_ms(est, seed.last_begin)
            quality = 1 if abs(seed.last_begin - est_ms) <= 1 else 0
        else:
            t, quality = est, 2
        # A vCPU it releases faulted no later than this end.
        floor_ms = max((seed.fault_time[i] for i in releases), default=0)
        if t // NS_PER_MS < floor_ms:
            t = floor_ms * NS_PER_MS
        return Placed(t, e.addr, e.zero), quality, (seed.last_begin + delta) & U32 if delta else None

    def can_split(self, e: _End, j: int) -> bool:
        it = self.items[j] if j < len(self.items) else None
        return isinstance(it, _Begin) and it.ar and it.cpu >= 0 and it.addr == e.addr

    def verify(self, e: _End, cand: int) -> tuple[list[Fault], Placed, int, list[Fault], int | None] | None:
        """Apply candidate ``cand`` (see ``_split``) and run ``e``; the events if it explains ``e``."""
        seed = self.seed
        upto, split = _split(cand)
        evs = self.apply_items(upto)
        tail: list[Fault] = []
        if split:
            # QEMU 7.2's race: this already-received begin filled its slot, the end released it, and
            # only then did its received check run (the begin line prints time 0 after the undo).
            b = self.items[upto]
            t = min(self.clock.offset_ns(b.w), max(self.clock.offset_ns(e.w), self.last_end_ns))
            half = Fault(max(t, 0), b.addr, b.cpu, b.pid, False)
            seed.fault(half)
            evs.append(half)
            tail.append(Fault(half.t_ns, b.addr, b.cpu, b.pid, True, True))
        ev, quality, exact_ms = self.end_event(e)
        affected = seed.end(ev.t_ns, ev.addr)
        for late in tail:
            seed.fault(late)
        if affected == e.affected and seed.total == e.total:
            return evs, ev, quality, tail, exact_ms
        return None

    def window(self, e: _End, start: int) -> tuple[int, int, int]:
        """Candidate counts of fault-thread items to apply before ``e``: lo..hi, stamp order j0."""
        items = self.items
        lo = start
        while lo < len(items) and items[lo].w < e.w - ORDER_SLACK_NS:
            lo += 1
        j0 = lo
        while j0 < len(items) and (items[j0].w, items[j0].line) < (e.w, e.line):
            j0 += 1
        hi = j0
        while hi < len(items) and items[hi].w <= e.w + ORDER_SLACK_NS:
            hi += 1
        return lo, j0, min(hi + EXTRA_CANDIDATES, len(items))

    def ranked(self, e: _End, snap: tuple) -> list[int]:
        """Every interleaving in the window that explains ``e``, best first: plausible times
        first, then closest to stamp order, then the most natural explanation."""
        lo, j0, hi = self.window(e, self.fi)
        scored = []
        for j in range(lo, hi + 1):
            for split in (0, 1) if self.can_split(e, j) else (0,):
                self.seed.restore(snap)
                got = self.verify(e, 2 * j + split)
                if got is not None:
                    scored.append((got[2] == 0, split, abs(j - j0), -got[2], 2 * j + split))
        self.seed.restore(snap)
        return [j for *_, j in sorted(scored)]

    def run(self) -> tuple[list[Event], dict, list[tuple[int, int]]]:
        while self.k < len(self.ends):
            self.step()
        self.out.extend(self.item_event(self.items[k]) for k in range(self.fi, len(self.items)))
        diag = {
            "verified_ends": len(self.p.ends) - len(self.mismatches),
            "mismatched_ends": len(self.mismatches),
            "first_mismatch_lines": self.mismatches[:10],
            "reordered_ends": self.reordered,
            "raced_begins": self.splits,
        }
        return self.out, diag, list(self.ends_ms.values())

    def step(self) -> None:
        """Explain end ``k`` (or rewind to an earlier one, or record a mismatch) and move on."""
        k = self.k
        if k > self.max_k:
            self.max_k, self.budget, self.checkpoint = k, BACKTRACK_BUDGET, None
        e = self.ends[k]
        snap = self.seed.snapshot()
        frame = (k, self.fi, snap, len(self.out), self.last_end_ns, self.prev_total)
        _, j0w, _ = self.window(e, self.fi)
        j0 = 2 * j0w  # the candidate "stamp order, no split"
        upto, chosen = self.choose(e, snap, j0)
        if chosen is None and k != self.give_up:
            self.rewind(snap)
            return
        if chosen is None:
            # Nothing explains this line: keep stamp order and follow the log's total from here.
            self.mismatches.append(e.line)
            self.seed.restore(snap)
            upto = j0
            evs = self.apply_items(j0w)
            ev, _, _ = self.end_event(e)
            self.seed.end(ev.t_ns, ev.addr)
            self.seed.total = e.total
            chosen = (evs, ev, 0, [], None)
        self.record(e, frame, upto, j0, chosen)

    def choose(self, e: _End, snap: tuple, j0: int) -> tuple[int, tuple | None]:
        """The interleaving tried for end ``k`` (a forced one after a rewind, else stamp order, else
        the best ranked), and what it gives (None: it does not explain the end)."""
        forced = self.forced.get(self.k)
        if forced:
            upto = forced.pop(0)
            return upto, self.verify(e, upto)
        upto = j0
        chosen = self.verify(e, j0)
        if chosen is None or chosen[2] == 0:
            alts = self.ranked(e, snap)
            chosen = None
            if alts:
                upto = alts[0]
                chosen = self.verify(e, upto)
        return upto, chosen

    def rewind(self, snap: tuple) -> None:
        """Nothing explains end ``k``: go back to the latest earlier end that has another
        interleaving to try, or, when none has (or the budget is spent), to where the rewinds began."""
        if self.checkpoint is None:
            self.checkpoint = (self.k, self.fi, snap, list(self.out), self.last_end_ns, self.prev_total,
                               list(self.frames), dict(self.forced))
        target = None if self.budget <= 0 else -1
        here = (self.fi, self.last_end_ns, self.prev_total)
        for kk, fi0, snap0, _n, last0, prev0, used in reversed(self.frames if self.budget > 0 else ()):
            if kk not in self.forced:
                self.fi, self.last_end_ns, self.prev_total = fi0, last0, prev0
                self.forced[kk] = [j for j in self.ranked(self.ends[kk], snap0) if j != used]
                self.fi, self.last_end_ns, self.prev_total = here
            if self.forced[kk]:
                target = kk
                break
        if target is None or target < 0:
            self.back_to_checkpoint()
        else:
            self.back_to(target)

    def back_to_checkpoint(self) -> None:
        """No rewind explains it: go back to where the rewinds began and accept a mismatch there,
        rather than keep a path that only rewinds made worse."""
        self.k, self.fi, snap0, out_copy, self.last_end_ns, self.prev_total, fr, fo = self.checkpoint
        self.out[:] = out_copy
        self.frames.clear()
        self.frames.extend(fr)
        self.forced.clear()
        self.forced.update(fo)
        self.seed.restore(snap0)
        self.give_up, self.checkpoint = self.k, None

    def back_to(self, target: int) -> None:
        """Undo the ends after ``target`` and try ``target``'s next interleaving."""
        self.budget -= 1
        while True:
            kk, self.fi, snap0, out_len, self.last_end_ns, self.prev_total, _used = self.frames.pop()
            if kk == target:
                break
        del self.out[out_len:]
        self.seed.restore(snap0)
        for later in [x for x in self.forced if x > target]:
            del self.forced[later]
        self.k = target

    def record(self, e: _End, frame: tuple, upto: int, j0: int, chosen: tuple) -> None:
        """Keep end ``k``'s explanation: its events, and the state the next end starts from."""
        if upto != j0:
            self.reordered += 1
        evs, ev, _, tail, exact_ms = chosen
        if exact_ms is not None:
            self.ends_ms[self.k] = (e.w, exact_ms)
        self.frames.append((*frame, upto))
        self.out.extend(evs)
        self.out.append(ev)
        self.out.extend(tail)
        self.splits += bool(tail)
        self.fi = sum(_split(upto))
        self.last_end_ns = ev.t_ns
        self.prev_total = e.total
        self.k += 1
